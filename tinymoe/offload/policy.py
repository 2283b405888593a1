"""Offloading policies: what a policy name means, and how many expert slots it gets.

    resident    no offloading: all experts on the device (the lower bound on TPOT)
    on-demand   the paper's baseline: copy the routed experts, wait for all of them, compute.
                Default budget top-k slots, so nothing survives from one token to the next.
    lru / lfu   on-demand plus a cache across tokens. Default budget: a quarter of all experts.
    oracle      prefetch each layer's true experts one layer ahead (speculation/oracle.py).
                Default budget 2*top-k: the current layer's experts and the next layer's.
    prefetch+P[+lru|lfu]     predictor P drives prefetching; the router still decides (exact)
    speculative+P[+lru|lfu]  layer l+1 runs P's predicted experts and weights (the paper's mode)

The first three wait until all of a layer's copies have landed before computing, as the
paper's baseline does (its Eq. 1 is derived for that); every other policy computes each expert
as soon as its copy lands (`Policy.pipeline`). Prefetching needs room for two layers at once:
(1 + lookahead) * top-k slots for a decode step.
"""

from dataclasses import dataclass

from tinymoe.engine.config import ModelConfig
from tinymoe.errors import TinyMoeError


@dataclass(frozen=True)
class Policy:
    """What a policy name means: where experts live, how the cache evicts, who predicts."""

    name: str
    offload: bool = True  # False: "resident", experts stay on the device
    eviction: str = "lru"  # "lru" | "lfu"
    cache_across_tokens: bool = False  # sized to keep experts across tokens (default budget)
    predictor: str | None = None  # name of the predictor that drives prefetching
    speculate: bool = False  # route with the prediction instead of the router (lossy)
    pipeline: bool = True  # compute each expert as its copy lands (False: wait for all, see top)


BASE_POLICIES = {
    "resident": Policy("resident", offload=False),
    "on-demand": Policy("on-demand", pipeline=False),
    "lru": Policy("lru", cache_across_tokens=True, pipeline=False),
    "lfu": Policy("lfu", eviction="lfu", cache_across_tokens=True, pipeline=False),
    "oracle": Policy("oracle", predictor="oracle"),
}


def parse_policy(name: str) -> Policy:
    """A policy name -> Policy. Base names above, or MODE+PREDICTOR[+lru|lfu], e.g.
    `prefetch+router+lru` (exact: the prediction only prefetches) or `speculative+router`."""
    if name in BASE_POLICIES:
        return BASE_POLICIES[name]
    parts = name.split("+")
    if len(parts) in (2, 3) and parts[0] in ("prefetch", "speculative") and parts[1]:
        cache = parts[2] if len(parts) == 3 else None
        if cache in (None, "lru", "lfu"):
            return Policy(
                name,
                eviction=cache or "lru",
                cache_across_tokens=cache is not None,
                predictor=parts[1],
                speculate=parts[0] == "speculative",
            )
    raise TinyMoeError(
        f"unknown offload policy {name!r}; expected one of {', '.join(BASE_POLICIES)}, or "
        "prefetch+PREDICTOR[+lru|lfu] / speculative+PREDICTOR[+lru|lfu]"
    )


def resolve_slots(
    policy: Policy,
    cfg: ModelConfig,
    expert_bytes: int,
    lookahead: int,
    slots: int | None = None,
    budget_gb: float | None = None,
) -> int:
    """The slot budget: --expert-slots, or --expert-budget-gb, or the policy's default."""
    K, all_experts = cfg.top_k, cfg.num_layers * cfg.num_experts
    if slots is not None and budget_gb is not None:
        raise TinyMoeError("give --expert-slots or --expert-budget-gb, not both")
    flag = "--expert-slots"
    if budget_gb is not None:
        flag = "--expert-budget-gb"
        slots = int(budget_gb * 1e9 // expert_bytes)  # GB = 1e9 bytes
    if slots is None:
        slots = (1 + lookahead) * K  # room for this layer and the one being prefetched
        if policy.cache_across_tokens:
            slots = max(slots, all_experts // 4)
        elif policy.predictor is None:
            slots = K  # on-demand: exactly one layer's experts, no reuse across tokens
    if slots < K:
        raise TinyMoeError(
            f"{flag} gives {slots} expert slots, fewer than top-k ({K}): one token's experts "
            f"must fit (one expert is {expert_bytes / 1e6:.2f} MB)"
        )
    return min(slots, all_experts)  # more slots than experts would never be used
