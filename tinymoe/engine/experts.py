"""Experts: the packed per-expert layout, the SwiGLU expert, and the expert-provider interface.

Layout. Each expert of each layer is ONE contiguous buffer of `3 * I * D` elements:

    [ gate (I x D) | up (I x D) | down (D x I) ]      (row-major, as Hugging Face stores them)

so gate and up form the fused (2I x D) matrix transformers 5 calls `gate_up_proj`, and moving an
expert between host and device is a single copy. A layer's experts are a (E, 3*I*D) tensor.

Provider. The MoE layer never indexes expert weights itself: it asks an `ExpertProvider` for the
experts it needs. `ResidentExperts` (here) keeps all of them on the compute device, the plain
reference path; the offloading engine supplies them from a device cache, the model unchanged.

Host experts. A provider may also yield an expert whose weights stay on the host (the offloading
runtime's CPU miss handler yields its row of the host store): it is computed there, not copied.
The MoE layer collects such experts in a `HostExperts` and, per layer, on CUDA:

    compute stream:  u, host inputs [rec written]  device experts ........  [wait landed] sum
    side stream:          [wait written] D2H inputs [rec copied]    H2D outputs [rec landed]
    host:                                      [sync copied] host experts | H2D issued

ONE copy of their inputs to the host, issued before the device's experts are queued and waiting
only for the inputs to exist (`written`, marked as the host experts are collected, before the
device's), so it does not queue behind those kernels or their copies; the host computes its
experts while they run; ONE copy brings the host's outputs back, which the compute stream waits
for before the sum. Hence the protocol's rule: host experts are yielded first. On a CPU machine
host and device are the same device: every expert is an ordinary one and nothing is copied.
"""

from collections.abc import Callable, Iterator
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def expert_views(w: Tensor, expert_dim: int, hidden: int) -> tuple[Tensor, Tensor]:
    """Split a packed buffer (3*I*D,) into views: gate_up (2I, D) and down (D, I). No copy."""
    split = 2 * expert_dim * hidden
    return w[:split].view(2 * expert_dim, hidden), w[split:].view(hidden, expert_dim)


def expert_forward(w: Tensor, x: Tensor, expert_dim: int) -> Tensor:
    """SwiGLU expert: down(silu(gate(x)) * up(x)). w: packed (3*I*D,), x: (n, D) -> (n, D).

    Weights on another device than x (a host expert, see the top) are computed where they are:
    x goes there and the result comes back, blocking. moe_forward never relies on this (it
    batches a layer's host experts, `HostExperts`); it keeps one-off callers correct.
    """
    if w.device != x.device:
        # SYNC (CUDA): x is read to the host, the host computes, the result goes back.
        return expert_forward(w, x.to(w.device), expert_dim).to(x.device)
    gate_up, down = expert_views(w, expert_dim, x.shape[-1])
    g, u = F.linear(x, gate_up).chunk(2, dim=-1)  # (n, I) each
    return F.linear(F.silu(g) * u, down)  # (n, D)


def experts_by_index(u: Tensor, ids: Tensor, weights: Tensor, W: Tensor, expert_dim: int) -> Tensor:
    """One token's K experts read straight out of a layer's packed (E, 3*I*D) weights: (1, D).

    u (1, D); ids (1, K) and weights (1, K) as the routing gives them. For torch.compile only:
    the ids never leave the device (no host sync, the step stays one graph), and inductor turns
    each W[ids] into a load inside the kernel that computes with it, so the K experts' rows are
    read in place. That needs the matrix-vector products written as what they are, a product
    and a sum: given a batched matmul (einsum, bmm), inductor hands the library its operand
    gathered first, K experts copied per layer per step, unless a decomposition rewrites it
    into this form, which it does on the CPU but on CUDA only under
    `torch._inductor.config.coordinate_descent_tuning`. Written so, no flag is needed anywhere
    (tests/test_cuda_path.py reads inductor's code on the CPU, tests/gpu_check.py on CUDA).
    Run eagerly it materialises the gathers and the (K, 2I, D) products: tests only.
    """
    E, D, I = W.shape[0], u.shape[-1], expert_dim
    acc = torch.float32  # products summed in fp32 and rounded once, as a matmul accumulates
    gate_up = W[:, : 2 * I * D].view(E, 2 * I, D)[ids[0]]  # (K, 2I, D)
    down = W[:, 2 * I * D :].view(E, D, I)[ids[0]]  # (K, D, I)
    gu = (gate_up.to(acc) * u.to(acc)).sum(dim=-1).to(u.dtype)  # (K, 2I): u (1, D) broadcasts
    g, up = gu.chunk(2, dim=-1)  # (K, I) each
    h = (F.silu(g) * up).to(acc)  # (K, I)
    y = (down.to(acc) * h[:, None, :]).sum(dim=-1).to(u.dtype)  # (K, D)
    # Scale and sum in the routing weights' dtype, k order, cast once: as moe_forward does.
    return (y * weights.view(-1, 1)).sum(dim=0, keepdim=True).to(u.dtype)  # (1, D)


class ExpertProvider(Protocol):
    """Supplies expert weights to the MoE layer.

    `experts(layer, ids)` yields `(expert_id, packed_weights)` for every id in `ids` (each once),
    in any order it likes. A yielded buffer only has to stay valid until the caller asks for the
    next one, which lets an offloading provider stream many experts through a few device slots.

    Host experts (see the top): weights on another device than the layer's input are computed
    where they are, after the compute device's experts. Such a buffer must stay valid until the
    iteration ends (a host store's row always does), and such experts should be yielded before
    the compute device's ones: the layer starts copying its inputs to the host when the first
    device expert arrives (yielded later, they are still exact, but their inputs' copy then
    waits for the device's experts: no overlap).
    """

    def experts(self, layer: int, ids: list[int]) -> Iterator[tuple[int, Tensor]]: ...


class ResidentExperts(nn.Module):
    """Every expert of every layer on the compute device: the reference provider (and trainable)."""

    def __init__(self, num_layers: int, num_experts: int, expert_numel: int) -> None:
        super().__init__()
        # One (E, 3*I*D) parameter per layer; expert e of layer l is weights[l][e], contiguous.
        self.weights = nn.ParameterList(
            [nn.Parameter(torch.empty(num_experts, expert_numel)) for _ in range(num_layers)]
        )
        # The experts' codes and scales when they were quantized (offload/quant.py); the weights
        # are then what those read back as, or empty when only the host store needs them.
        self.quantized = None

    def experts(self, layer: int, ids: list[int]) -> Iterator[tuple[int, Tensor]]:
        w = self.weights[layer]
        for e in ids:
            yield e, w[e]


# ---------------------------------------------------------------- host experts (see the top)


def on_host(w: Tensor, x: Tensor) -> bool:
    """Whether expert weights `w` are computed where they live, away from x's device."""
    return w.device != x.device


class HostExperts:
    """One layer's host experts: collected, then computed on the host with one copy each way.

    moe_forward `add`s each with the device rows it reads, calls `start` before queueing its
    first device expert (the inputs' one copy to the host), and `finish` after its last one.
    Each `add` marks the compute stream: the copy waits for that mark, not for what the stream
    queues later (the scheduler makes it wait for a device expert's copy before yielding it).
    """

    def __init__(self, expert_dim: int) -> None:
        self.expert_dim = expert_dim
        self.experts: list[tuple[int, Tensor, Tensor]] = []  # (expert, host weights, device rows)
        self.written: torch.cuda.Event | None = None  # the compute stream's mark, last add
        self.inputs: Tensor | None = None  # their rows on the host, once `start` has run
        self.shared = False  # every expert reads the same rows (a decode step's one token)
        self.wait: Callable[[], None] = _landed

    def add(self, expert: int, w: Tensor, x: Tensor) -> None:
        """Expert `expert`, weights `w` on the host, to run over x (n, D) on the device."""
        self.experts.append((expert, w, x))
        self.written = written_mark(x)

    def start(self) -> None:
        """Start the one copy of all their inputs to the host (once; a no-op without any)."""
        if self.inputs is not None or not self.experts:
            return
        xs = [x for _, _, x in self.experts]
        self.shared = all(x is xs[0] for x in xs)  # then copy the token once, not per expert
        host = self.experts[0][1].device
        self.inputs, self.wait = to_host(xs[:1] if self.shared else xs, self.written, host)

    def finish(self) -> list[tuple[int, Tensor]]:
        """Compute them on the host: [(expert, its output (n, D) on the device)], in add order."""
        if not self.experts:
            return []
        self.start()  # (all of the layer's experts were host experts: nothing to overlap)
        # SYNC (CUDA): the host waits for its inputs' copy, which waited for nothing queued after
        # it: the device's experts still run while the host computes below.
        self.wait()
        assert self.inputs is not None
        outs, row = [], 0
        for _, w, x in self.experts:
            rows = self.inputs if self.shared else self.inputs[row : row + x.shape[0]]
            row += x.shape[0]
            outs.append(expert_forward(w, rows, self.expert_dim))  # (n, D) on the host
        y = to_device(outs, self.experts[0][2].device)  # (rows, D): one copy
        ys = y.split([len(o) for o in outs])  # (n, D) each, views
        return [(e, y_e) for (e, _, _), y_e in zip(self.experts, ys, strict=True)]


_side_streams: dict[torch.device, "torch.cuda.Stream"] = {}


def _side_stream(device: torch.device) -> "torch.cuda.Stream":
    """The stream host experts' copies run on: not the compute stream, whose queue they must
    not wait behind, nor the expert copy stream, whose first-in-first-out link they would delay."""
    if device not in _side_streams:
        _side_streams[device] = torch.cuda.Stream(device)
    return _side_streams[device]


def _landed() -> None:
    """Waiting for a copy that was made synchronously (not on CUDA): nothing to do."""


def written_mark(x: Tensor) -> "torch.cuda.Event | None":
    """On CUDA, an event recorded on the compute stream now, once the kernels writing x are
    queued (no sync: a mark in the stream); elsewhere None (work there is done when queued)."""
    if x.device.type != "cuda":
        return None
    ev = torch.cuda.Event()
    ev.record(torch.cuda.current_stream(x.device))
    return ev


def to_host(
    xs: list[Tensor], written: "torch.cuda.Event | None", host: torch.device
) -> tuple[Tensor, Callable[[], None]]:
    """Start copying xs (n_i, D), stacked, to `host` in ONE copy: (the copy, a function that
    waits until it has landed).

    On CUDA the stacking and the copy run on a side stream, into pinned memory, once the compute
    stream has passed `written` (written_mark, after xs were queued): not behind anything the
    compute stream queued since. Elsewhere it is an ordinary copy (none when xs are on `host`).
    """
    if written is None:
        return (xs[0] if len(xs) == 1 else torch.cat(xs)).to(host), _landed
    side = _side_stream(xs[0].device)
    with torch.cuda.stream(side):
        # WAIT: the side stream reads xs once the compute stream has written them, and no later.
        side.wait_event(written)
        x = xs[0] if len(xs) == 1 else torch.cat(xs)  # (rows, D), stacked on the side stream
        out = torch.empty(x.shape, dtype=x.dtype, device=host, pin_memory=host.type == "cpu")
        out.copy_(x, non_blocking=True)  # into pinned memory: the DMA engine, the host goes on
        for t in xs:  # the compute stream may free them before the side stream has read them
            t.record_stream(side)
        copied = torch.cuda.Event()
        copied.record(side)
    return out, copied.synchronize


def to_device(parts: list[Tensor], device: torch.device) -> Tensor:
    """Host tensors (n_i, D) stacked into one buffer and copied to `device` in ONE copy.

    On CUDA: from pinned memory on the side stream; the compute stream's next kernels wait for
    it, the host does not.
    """
    if device.type != "cuda":
        return torch.cat(parts).to(device)
    shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
    buf = torch.cat(parts, out=torch.empty(shape, dtype=parts[0].dtype, pin_memory=True))
    side, compute = _side_stream(device), torch.cuda.current_stream(device)
    with torch.cuda.stream(side):
        out = buf.to(device, non_blocking=True)  # allocated for the side stream
        landed = torch.cuda.Event()
        landed.record(side)
    # WAIT: the compute stream uses the host's outputs once they have landed; the host goes on.
    compute.wait_event(landed)
    out.record_stream(compute)  # freed after the compute stream's use, not the side stream's
    return out
