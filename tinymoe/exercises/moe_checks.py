"""Exercises on the experts: the packed SwiGLU expert, and the MoE layer that runs K of them.

The reference for the MoE layer is the plainest one there is: loop over tokens, loop over their
K experts, add up `g * expert(u)` in float64. The student's code must agree with it, ask the
provider for each used expert once, read the ids to the host at most once, and give the same
bits whatever order experts arrive in. For Mixtral in bf16 the contract fixes the rounding too:
the bf16 expert outputs scaled and summed in fp32, rounded to bf16 once.
"""

import functools
import random
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from tinymoe.engine import experts as engine_experts
from tinymoe.engine import moe as engine
from tinymoe.exercises.exercise import (
    Exercise,
    HostReads,
    expect,
    expect_close,
    expect_equal,
    expect_tensor,
    expect_view,
    targets,
)
from tinymoe.exercises.fixtures import randn, random_routing, whole_model_check

D, I, E = 32, 16, 8  # hidden, expert width, experts


# ---------------------------------------------------------------- expert


def _matrices(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """gate (I, D), up (I, D), down (D, I) as Hugging Face stores them, and their packed buffer."""
    gate, up, down = randn(I, D, seed=seed), randn(I, D, seed=seed + 1), randn(D, I, seed=seed + 2)
    return gate, up, down, torch.cat([gate.flatten(), up.flatten(), down.flatten()])


def check_views_shapes(code) -> str:
    _, _, _, w = _matrices()
    got = code.expert_views(w, I, D)
    expect(isinstance(got, tuple) and len(got) == 2, "expert_views returns (gate_up, down)")
    expect_tensor(got[0], "gate_up", (2 * I, D), w.dtype)
    expect_tensor(got[1], "down", (D, I), w.dtype)
    return "gate_up (2I, D), down (D, I)"


def check_views_layout(code) -> str:
    gate, up, down, w = _matrices()
    gate_up, dn = code.expert_views(w, I, D)
    hint = "the buffer is [gate (I x D) | up (I x D) | down (D x I)], row-major"
    expect_equal(gate_up, torch.cat([gate, up]), "gate_up", hint)
    expect_equal(dn, down, "down", hint="down is the last D*I elements, (D, I) row-major")
    return "[gate | up | down], row-major"


def check_views_no_copy(code) -> str:
    _, _, _, w = _matrices()
    copy = "is a copy: cut views of the packed buffer (an expert is moved and used as one buffer)"
    for view, what in zip(code.expert_views(w, I, D), ("gate_up", "down"), strict=True):
        expect_view(view, w, f"{what} {copy}")
    return "views of the packed buffer"


def check_swiglu(code) -> str:
    gate, up, down, w = _matrices(seed=3)
    hint = "SwiGLU is down(silu(gate x) * up x)"
    for n in (1, 5):
        x = randn(n, D, seed=n)
        want = F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)  # (n, D)
        got, what = code.expert_forward(w, x, I), f"expert_forward on {n} token(s)"
        expect_close(got, want, what, atol=1e-4, rtol=1e-4, hint=hint)
    return "down(silu(gate x) * up x) for 1 and 5 tokens"


check_expert_model = whole_model_check(
    "tinymoe.engine.moe", ("expert_forward",), ("olmoe", "mixtral"), seed=7
)


EXPERT = Exercise(
    id="expert",
    title="The packed SwiGLU expert",
    concepts=("one buffer per expert", "views without copies", "SwiGLU"),
    targets=targets("tinymoe.engine.experts:expert_views", "tinymoe.engine.experts:expert_forward"),
    minutes=15,
    prerequisites=(),
    checks=(
        ("view shapes", check_views_shapes),
        ("the packed layout", check_views_layout),
        ("no copies", check_views_no_copy),
        ("SwiGLU values", check_swiglu),
        ("the whole model on your expert", check_expert_model),
    ),
    engine_checks=("the whole model on your expert",),
)


# ---------------------------------------------------------------- moe-layer


class Provider:
    """An ExpertProvider over (E, 3*I*D) weights that yields in a chosen order and counts asks."""

    def __init__(self, weights: Tensor, order: str = "asked") -> None:
        self.weights, self.order = weights, order
        self.asked: list[int] = []

    def experts(self, layer: int, ids: list[int]) -> Iterator[tuple[int, Tensor]]:
        ids = list(ids)
        self.asked += ids
        if self.order == "reversed":
            ids.reverse()
        elif self.order == "shuffled":
            random.Random(len(self.asked)).shuffle(ids)
        for e in ids:
            yield e, self.weights[e]


def _layer(n: int, k: int = 2, seed: int = 0, dtype=torch.float32, wdtype=None):
    """u (n, D), a routing with distinct experts per token, and the experts' weights."""
    g = torch.Generator().manual_seed(seed)
    routing = random_routing(n, E, k, g, wdtype or dtype)
    experts = (0.3 * torch.randn(E, 3 * I * D, generator=g)).to(dtype)
    return randn(n, D, seed=seed + 1, dtype=dtype), routing, experts


def _loop_reference(u: Tensor, routing, experts: Tensor) -> Tensor:
    """sum_k g_k * Expert_{e_k}(u), one token and one expert at a time, in float64."""
    out = torch.zeros(u.shape, dtype=torch.float64)
    for n in range(u.shape[0]):
        for e, g in zip(routing.ids[n].tolist(), routing.weights[n].tolist(), strict=True):
            y = engine_experts.expert_forward(experts[e].double(), u[n : n + 1].double(), I)
            out[n] += g * y[0]
    return out


def check_against_loop(code, n: int) -> str:
    u, routing, experts = _layer(n, seed=n)
    got = code.moe_forward(u, routing, Provider(experts), 0, I)
    want = _loop_reference(u, routing, experts)
    what = f"the MoE output for {n} token(s)"
    hint = "each token adds up its K experts' outputs scaled by its routing weights"
    expect_close(got.double(), want, what, atol=1e-4, rtol=1e-4, hint=hint)
    expect_tensor(got, "the MoE output", (n, D), u.dtype)
    return f"{n} token(s), top-2 of {E}: matches the loop over experts"


def check_moe_asks(code) -> str:
    for n in (1, 9):
        u, routing, experts = _layer(n, seed=20 + n)
        p = Provider(experts)
        code.moe_forward(u, routing, p, 0, I)
        used = sorted(set(routing.ids.flatten().tolist()))
        expect(
            sorted(p.asked) == used,
            f"{n} token(s) use experts {used}; the provider was asked for {sorted(p.asked)}: "
            "ask for every used expert exactly once, and for no other (each one is a copy "
            "when experts are offloaded)",
        )
    return "every used expert exactly once, no other"


def check_moe_order(code) -> str:
    hint = (
        "an offloading provider yields experts as their copies land; sum each token's K "
        "contributions in a fixed order"
    )
    for n in (1, 9):
        u, routing, experts = _layer(n, k=3, seed=30 + n)
        first = code.moe_forward(u, routing, Provider(experts), 0, I)
        for order in ("reversed", "shuffled"):
            got = code.moe_forward(u, routing, Provider(experts, order), 0, I)
            what = f"the output for {n} token(s) with experts yielded {order}"
            expect_equal(got, first, what, hint)
    return "bit-identical whatever order the provider yields in"


def check_moe_host_reads(code) -> str:
    for n, read, most in ((1, True, 0), (1, False, 1), (9, False, 1)):
        u, routing, experts = _layer(n, seed=50 + n)
        if read:  # as the offloading runtime leaves them: read with its prediction's ids
            routing.host_ids = routing.ids.tolist()
        with HostReads() as reads:
            code.moe_forward(u, routing, Provider(experts), 0, I)
        what = "a token whose ids are already read (routing.ids_on_host)" if read else f"{n} tokens"
        expect(
            reads.count <= most,
            f"{what}: {reads.count} host reads ({', '.join(reads.calls)}), at most {most}; each "
            "is a host-device sync on a GPU (read the ids once, with routing.ids_on_host())",
        )
    return "ids read once per layer, not at all when already read"


def check_moe_bf16(code) -> str:
    for n in (1, 9):
        u, routing, experts = _layer(n, seed=40 + n, dtype=torch.bfloat16)
        got = code.moe_forward(u, routing, Provider(experts), 0, I)
        want = engine.moe_forward(u, routing, Provider(experts), 0, I)
        expect_close(got, want, f"bf16, {n} token(s)", atol=2e-2, rtol=2e-2)
    return "bf16 activations and routing weights"


def _expert_outputs(u: Tensor, routing, experts: Tensor) -> Tensor:
    """(N, K, D): the engine's expert output for each (token, k), in u's dtype, each expert run
    once on its tokens."""
    y = torch.empty(*routing.ids.shape, u.shape[1], dtype=u.dtype)
    for e in routing.ids.unique().tolist():
        n, k = (routing.ids == e).nonzero(as_tuple=True)
        y[n, k] = engine_experts.expert_forward(experts[e], u[n], I)
    return y


def check_moe_mixtral(code) -> str:
    """What the contract fixes: bf16 expert outputs, scaled and summed in fp32, rounded once.

    The reference is that sum in float64, rounded to bf16. A correct answer, in any summation
    order, differs on a handful of values at most (its fp32 sum sits on a bf16 rounding edge),
    by one bf16 step; one that scales or sums in bf16 differs on a fifth to a half of them.
    """
    differ = total = 0
    for n, k in ((1, 2), (9, 3), (64, 3)):
        u, routing, experts = _layer(
            n, k=k, seed=60 + n, dtype=torch.bfloat16, wdtype=torch.float32
        )
        got = code.moe_forward(u, routing, Provider(experts), 0, I)
        expect_tensor(got, f"the MoE output for {n} token(s)", (n, D), torch.bfloat16)
        y = _expert_outputs(u, routing, experts).double()
        want = (y * routing.weights.double()[..., None]).sum(dim=1).to(torch.bfloat16)
        _, exp = torch.frexp(torch.maximum(got.double().abs(), want.double().abs()))
        step = torch.ldexp(torch.ones_like(exp, dtype=torch.float64), exp - 8)  # one bf16 ulp
        far = ((got.double() - want.double()).abs() > step).sum().item()
        differ, total = differ + (got != want).sum().item(), total + got.numel()
        expect(
            far == 0,
            f"{n} token(s): {far} values more than one bf16 step from the fp32 sum rounded once "
            "(with fp32 routing weights, scale and sum in fp32)",
        )
    expect(
        differ <= total // 100,
        f"{differ} of {total} values differ from the fp32 sum rounded once to bf16: with fp32 "
        "routing weights, scale and sum in fp32 and round to u's dtype once, at the end",
    )
    return f"{total} values: fp32 scaling and sum, one rounding ({differ} on a rounding edge)"


check_moe_model = whole_model_check(
    "tinymoe.engine.model", ("moe_forward",), ("olmoe", "mixtral"), seed=8
)


MOE_LAYER = Exercise(
    id="moe-layer",
    title="The MoE layer: tokens grouped by expert, against the loop over experts",
    concepts=(
        "grouping tokens by expert",
        "the expert-provider seam",
        "order-independent sums",
        "one host sync per layer",
    ),
    targets=targets("tinymoe.engine.moe:moe_forward"),
    minutes=45,
    prerequisites=("routing", "expert"),
    checks=(
        ("one token (decode)", functools.partial(check_against_loop, n=1)),
        ("many tokens (prefill)", functools.partial(check_against_loop, n=9)),
        ("what it asks the provider for", check_moe_asks),
        ("host reads", check_moe_host_reads),
        ("order independence", check_moe_order),
        ("bf16 routing weights (OLMoE, Qwen3)", check_moe_bf16),
        ("fp32 routing weights (Mixtral, bf16)", check_moe_mixtral),
        ("the whole model on your MoE layer", check_moe_model),
    ),
    engine_checks=("the whole model on your MoE layer",),
    given=("expert_forward",),
)
