"""Routing and the MoE layer: which experts each token uses, and running them.

    u = RMSNorm_moe(r)                          (N, D), N = B*T tokens
    routing = top-K of softmax(router(u))       ids (N, K), weights g (N, K), softmax in fp32
    y = sum_k g_k * Expert_{e_k}(u)             (N, D); the decoder adds it to the residual r

The weights g are computed in fp32. Mixtral scales the experts' outputs by them in fp32 and
rounds the sum to the activation dtype once; OLMoE and Qwen3-MoE round g to the activation dtype
first (as transformers does; `ModelConfig.fp32_routing_weights` names the switch). In fp32 the
two agree; in bf16 they differ in the last bit, and tinymoe matches each bit for bit.

This is the seam the offloading and speculation code use: a `RouteHook` may see each layer's
state and replace the router's choice, and `moe_forward` asks an `ExpertProvider` (experts.py)
for the experts' weights, wherever they live. The decoder that calls both is model.py.
"""

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from tinymoe.engine.config import ModelConfig
from tinymoe.engine.experts import (
    ExpertProvider,
    HostExperts,
    ResidentExperts,
    expert_forward,
    experts_by_index,
    on_host,
)


@dataclass
class Routing:
    """Which experts each token uses, and with what weights."""

    ids: Tensor  # (N, K) long
    # (N, K), in routing_weights_dtype (fp32 for Mixtral, else the activations'); None for a
    # guess that names experts only (RouterPredictor.guess_ids: exact prefetch never runs it)
    weights: Tensor | None
    logits: Tensor | None = None  # (N, E) the router's logits; None when the routing was predicted
    host_ids: list[list[int]] | None = None  # ids as read to the host, once (see ids_on_host)

    def ids_on_host(self) -> list[list[int]]:
        """The ids as Python lists (N lists of K), read from the device the first time only.

        A predicted routing is read when its experts are prefetched, one layer early; the layer
        that runs it (speculating) and the miss accounting reuse that read instead of syncing
        again, so each routing costs at most one host-device sync.
        """
        if self.host_ids is None:
            self.host_ids = self.ids.tolist()  # SYNC: the host needs the ids to fetch experts
        return self.host_ids


def routing_weights_dtype(cfg: ModelConfig, activation_dtype: torch.dtype) -> torch.dtype:
    """The dtype the routing weights scale expert outputs in (pass it to route_topk)."""
    return torch.float32 if cfg.fp32_routing_weights else activation_dtype


def route_topk(logits: Tensor, top_k: int, normalise: bool, dtype: torch.dtype) -> Routing:
    """fp32 softmax over all E experts, top-K, optionally renormalised over the K.

    logits (N, E) -> Routing(ids (N, K) long, most probable first; weights (N, K) in `dtype`;
    logits as given). dtype: from routing_weights_dtype (the ids do not depend on it).
    """
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)  # (N, E), fp32 whatever the logits
    weights, ids = torch.topk(probs, top_k, dim=-1)  # (N, K) each
    if normalise:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return Routing(
        ids=ids, weights=weights if weights.dtype == dtype else weights.to(dtype), logits=logits
    )


class MoE(nn.Module):
    """The router. The experts themselves live in an ExpertProvider, not in this module."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)

    def route(self, u: Tensor) -> Routing:
        """u: (N, D) normed hidden states -> the router's top-K routing."""
        dtype = routing_weights_dtype(self.cfg, u.dtype)
        return route_topk(self.gate(u), self.cfg.top_k, self.cfg.norm_topk_prob, dtype)


def moe_forward(
    u: Tensor, routing: Routing, provider: ExpertProvider, layer: int, expert_dim: int
) -> Tensor:
    """Run the routed experts over u: (N, D) -> (N, D).

    Tokens are grouped by expert (one matmul per expert, never a gathered per-token weight), and
    the K contributions of each token are summed in a fixed order at the end, so the result is
    bit-identical whatever order the provider yields experts in. A single token (a decode step)
    takes a shorter path with the same contract, and, only inside a compiled forward pass with
    the resident experts, reads them by index instead (experts_by_index).

    Each contribution and the sum are in the dtype of expert output times routing weight: fp32
    when the weights are fp32 (Mixtral), rounded to u's dtype once at the end, as transformers
    does; else u's dtype throughout (the final cast is then a no-op).

    The ids are read to the host once (the layer's one sync: it must know which experts to ask
    for), or not at all for one token whose ids are already read (`routing.ids_on_host()`).

    Host experts (weights the provider yields from the host, experts.py): only collected as they
    come; their inputs' one copy to the host starts before the first device expert is queued,
    the host computes them after the last, and their outputs, copied back once, are scaled and
    summed with the others as if computed here (on a CUDA device, one more host sync).
    """
    N, K = routing.ids.shape
    if N == 1 and torch.compiler.is_compiling() and isinstance(provider, ResidentExperts):
        # Compiled decode: the ids stay on the device, no sync (see experts_by_index).
        return experts_by_index(
            u, routing.ids, routing.weights, provider.weights[layer], expert_dim
        )
    if N == 1:  # decode: one token, so skip the grouping machinery (per-op overhead dominates)
        ids = routing.ids_on_host()[0]  # (the layer's one sync, unless already read)
        host, y = None, {}  # host: made at the first host expert (the CPU miss handler's)
        for e, w in provider.experts(layer, sorted(ids)):
            if on_host(w, u):
                host = host or HostExperts(expert_dim)
                host.add(e, w, u)
                continue
            if host:  # before the first device expert, so its copy does not queue behind it
                host.start()
            y[e] = expert_forward(w, u, expert_dim)
        if host:
            y.update(host.finish())  # (1, D) each, on u's device
        if len(y) != K:
            raise RuntimeError(f"expert provider did not supply experts {ids} of layer {layer}")
        ys = torch.stack([y[e] for e in ids])  # (K, 1, D) in k order, whatever the yield order
        y = (ys * routing.weights.view(K, 1, 1)).sum(dim=0)  # (1, D)
        return y if y.dtype == u.dtype else y.to(u.dtype)
    flat = routing.ids.reshape(-1)  # (N*K,)
    order = torch.argsort(flat, stable=True)  # (N*K,) slots grouped by expert
    # SYNC: the host must know which experts are used (and how many tokens each) to fetch them.
    counts = torch.bincount(flat).tolist()  # counts[e] = slots routed to expert e
    starts = [0, *itertools.accumulate(counts)]  # expert e's slots are order[starts[e]:starts[e+1]]
    used = [e for e, c in enumerate(counts) if c]
    token_of = order // K  # (N*K,) token index of each sorted slot
    w_sorted = routing.weights.reshape(-1)[order]  # (N*K,)
    parts: dict[int, Tensor] = {}
    host = None  # made at the first host expert, as above
    for e, w in provider.experts(layer, used):
        a, b = starts[e], starts[e + 1]
        x_e = u[token_of[a:b]]  # (n_e, D)
        if on_host(w, u):
            host = host or HostExperts(expert_dim)
            host.add(e, w, x_e)
            continue
        if host:  # before the first device expert, so its copy does not queue behind it
            host.start()
        parts[e] = expert_forward(w, x_e, expert_dim) * w_sorted[a:b, None]  # (n_e, D)
    for e, y_e in host.finish() if host else ():  # (n_e, D) each, on u's device
        parts[e] = y_e * w_sorted[starts[e] : starts[e + 1], None]
    if len(parts) != len(used):
        missing = sorted(set(used) - set(parts))
        raise RuntimeError(f"expert provider did not supply experts {missing} of layer {layer}")
    y_sorted = torch.cat([parts[e] for e in used])  # (N*K, D) in sorted-slot order
    y = torch.empty_like(y_sorted).index_copy(0, order, y_sorted)  # (N*K, D) in (token, k) order
    return y.view(N, K, -1).sum(dim=1).to(u.dtype)  # (N, D)


class RouteHook(Protocol):
    """Decides each layer's routing. `router(u)` computes the true one; a hook may predict instead.

    resid is r_l (B, T, D), the residual after attention; u is RMSNorm_moe(r_l) flattened (N, D).
    """

    def __call__(
        self, layer: int, resid: Tensor, u: Tensor, router: Callable[[Tensor], Routing]
    ) -> Routing: ...
