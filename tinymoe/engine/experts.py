"""Experts: the packed per-expert layout, the SwiGLU expert, and the expert-provider interface.

Layout. Each expert of each layer is ONE contiguous buffer of `3 * I * D` elements:

    [ gate (I x D) | up (I x D) | down (D x I) ]      (row-major, as Hugging Face stores them)

so gate and up form the fused (2I x D) matrix transformers 5 calls `gate_up_proj`, and moving an
expert between host and device is a single copy. A layer's experts are a (E, 3*I*D) tensor.

Provider. The MoE layer never indexes expert weights itself: it asks an `ExpertProvider` for the
experts it needs. `ResidentExperts` (here) keeps all of them on the compute device, the plain
reference path; the offloading engine supplies them from a device cache, the model unchanged.
"""

from collections.abc import Iterator
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

    Weights on another device than x (the offloading runtime's CPU miss handler yields an
    expert's host row) are computed where they are: x goes there and the result comes back.
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
    indexing W with the ids tensor would copy K experts in eager mode (the copy STYLE.md warns
    about), but inductor fuses the index into the matrix-vector kernels, which then read the K
    experts' rows in place. So a compiled decode step runs all K experts in a few kernels, and
    the ids never leave the device: no host sync, the step stays one graph.
    """
    E, D, I = W.shape[0], u.shape[-1], expert_dim
    gate_up = W[:, : 2 * I * D].view(E, 2 * I, D)[ids[0]]  # (K, 2I, D)
    down = W[:, 2 * I * D :].view(E, D, I)[ids[0]]  # (K, D, I)
    g, up = torch.einsum("kod,d->ko", gate_up, u[0]).chunk(2, dim=-1)  # (K, I) each
    y = torch.einsum("kdi,ki->kd", down, F.silu(g) * up)  # (K, D)
    # Scale and sum in the routing weights' dtype, k order, cast once: as moe_forward does.
    return (y * weights.view(-1, 1)).sum(dim=0, keepdim=True).to(u.dtype)  # (1, D)


class ExpertProvider(Protocol):
    """Supplies expert weights to the MoE layer.

    `experts(layer, ids)` yields `(expert_id, packed_weights)` for every id in `ids` (each once),
    in any order it likes. A yielded buffer only has to stay valid until the caller asks for the
    next one, which lets an offloading provider stream many experts through a few device slots.
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

    def experts(self, layer: int, ids: list[int]) -> Iterator[tuple[int, Tensor]]:
        w = self.weights[layer]
        for e in ids:
            yield e, w[e]
