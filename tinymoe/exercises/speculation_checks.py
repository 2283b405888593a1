"""Exercises on the paper's contribution: the quasi-hidden state, and speculative execution.

Both run on the demo model (trained, with calibration files) over held-out text, because a
random model's routing has nothing to predict. (The learned estimator: distillation_checks.py.)
"""

import functools
import itertools
import json
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from tinymoe.calibrate import router_recall
from tinymoe.engine.kvcache import KVCache
from tinymoe.engine.moe import Routing
from tinymoe.exercises.exercise import (
    Exercise,
    HostReads,
    expect,
    expect_close,
    expect_equal,
    expect_tensor,
    patched,
    targets,
)
from tinymoe.exercises.fixtures import (
    DEMO,
    baby_model,
    demo_calibration,
    demo_exact_run,
    demo_model,
    heldout_ids,
    randn,
    random_routing,
    router_predictor,
)
from tinymoe.exercises.offload_checks import same_as_engine
from tinymoe.speculation.hook import PredictionHook, speculates
from tinymoe.speculation.oracle import OraclePredictor
from tinymoe.speculation.predictors import quasi_hidden
from tinymoe.speculation.recording import RouteRecorder

# ---------------------------------------------------------------- router-pf


def _routing(n: int, seed: int = 0, experts: int = 32, k: int = 4) -> Routing:
    return random_routing(n, experts, k, torch.Generator().manual_seed(seed))


def _same_q(code, model, default_vectors, r: Tensor, cases: list, what: str, **tol) -> None:
    """The student's q_l equals the engine's for each (layer, target, routing) of `cases`."""
    for layer, target, routing in cases:
        with torch.no_grad():
            got = code.quasi_hidden(model, default_vectors, layer, target, r, routing)
            want = quasi_hidden(model, default_vectors, layer, target, r, routing)
        expect_close(got, want, f"{what} (layer {layer}, target {target})", **tol)


def check_qh_shape(code) -> str:
    model, D = demo_model(), demo_model().cfg.hidden_size
    q = code.quasi_hidden(model, demo_calibration().default_vectors, 2, 3, randn(5, D), _routing(5))
    expect_tensor(q, "q_l", (5, D), torch.float32)
    return "(N, D) in the activations' dtype"


def check_qh_no_vectors(code) -> str:
    r = randn(5, demo_model().cfg.hidden_size, seed=1)
    cases = [(0, 1, _routing(5)), (2, 5, _routing(5))]
    _same_q(code, demo_model(), None, r, cases, "q_l without default vectors")
    return "d_l = 0: a norm of r_l alone"


def check_qh_values(code) -> str:
    r = randn(6, demo_model().cfg.hidden_size, seed=2)
    cases = [(layer, target, _routing(6, seed=layer)) for layer, target in ((0, 1), (3, 4), (1, 4))]
    dv = demo_calibration().default_vectors
    _same_q(code, demo_model(), dv, r, cases, "q_l", atol=1e-4, rtol=1e-4)
    return "d_l from the routing weights and layer l's default vectors, lookaheads 1 and 3"


def check_qh_bf16(code) -> str:
    """Mixtral's convention: bf16 activations and vectors, routing weights in fp32."""
    model = baby_model("mixtral", seed=3).to(torch.bfloat16)
    cfg = model.cfg
    dv = (0.5 * randn(cfg.num_layers, cfg.num_experts, cfg.hidden_size, seed=4)).to(torch.bfloat16)
    r = randn(6, cfg.hidden_size, seed=5, dtype=torch.bfloat16)
    rt = _routing(6, seed=6, experts=cfg.num_experts, k=cfg.top_k)  # fp32 weights
    what = "q_l of bf16 activations with fp32 routing weights"
    _same_q(code, model, dv, r, [(0, 1, rt), (0, 2, rt)], what, atol=3e-2, rtol=3e-2)
    return "bf16 in, bf16 out, whatever the routing weights' dtype"


@functools.cache
def _recall(with_vectors: bool, quasi=quasi_hidden) -> tuple[float, ...]:
    """Recall@K of Router-PF (lookahead 1) per target layer 1..L-1 on the held-out exact run,
    as calibrate measures it, with `quasi` as the predictor's quasi-hidden state."""
    dv = demo_calibration().default_vectors if with_vectors else None
    with patched("tinymoe.speculation.predictors", "quasi_hidden", quasi), torch.no_grad():
        return tuple(router_recall(demo_model(), dv, demo_exact_run(), 1).values())


def check_qh_recall(code) -> str:
    want, bare = _recall(True), _recall(False)
    mine = _recall(True, code.quasi_hidden)
    for t, (got, ref) in enumerate(zip(mine, want, strict=True), 1):
        expect(
            got >= ref - 0.005,
            f"layer {t}: Router-PF with your q_l recalls {got:.3f} of "
            f"the true experts; the engine's reaches {ref:.3f}",
        )
    shipped = json.loads((DEMO / "speculation.json").read_text())["val_recall_at_k"]["1"]
    mean, n = sum(mine) / len(mine), len(mine)
    return (
        f"recall@4 {mean:.3f} over layers 1-{n} (without default vectors {sum(bare) / n:.3f}; "
        f"layer 1: {bare[0]:.2f} -> {mine[0]:.2f}); calibration measured "
        f"{sum(shipped['router'][1:]) / n:.3f} on its own held-out text"
    )


def check_qh_runtime(code) -> str:
    """The offloading runtime predicts with the student's q_l (RouterPredictor calls it)."""
    yours, notes = ("tinymoe.speculation.predictors", "quasi_hidden", code.quasi_hidden), []
    for policy in ("prefetch+router+lru", "speculative+router"):
        mine = same_as_engine(yours, policy, policy, predictor=router_predictor)
        notes.append(f"{policy} hit rate {mine['decode']['hit_rate']:.2f}")
    return "demo model, offloaded, 12 tokens: " + ", ".join(notes)


ROUTER_PF = Exercise(
    id="router-pf",
    title="Router-PF: predict the next layer's experts from the quasi-hidden state",
    concepts=(
        "the residual r_l before the MoE output",
        "default vectors",
        "q_l = Norm_t(r_l + d_l)",
        "recall@k",
    ),
    targets=targets("tinymoe.speculation.predictors:quasi_hidden"),
    minutes=30,
    prerequisites=("routing", "moe-layer"),
    checks=(
        ("shape", check_qh_shape),
        ("without default vectors", check_qh_no_vectors),
        ("with default vectors", check_qh_values),
        ("bf16 activations, fp32 routing weights", check_qh_bf16),
        ("recall on held-out text", check_qh_recall),
        ("the runtime on your q_l", check_qh_runtime),
    ),
    engine_checks=("recall on held-out text", "the runtime on your q_l"),
)


# ---------------------------------------------------------------- speculative


def check_decision(code) -> str:
    guess = Routing(ids=torch.zeros(1, 4, dtype=torch.long), weights=torch.ones(1, 4))
    cases = itertools.product((True, False), ("decode", "prefill"), range(4), (1, 2), (guess, None))
    for speculate, phase, layer, d, g in cases:
        got = code.speculates(speculate, phase, layer, d, g)
        want = speculates(speculate, phase, layer, d, g)
        expect(
            isinstance(got, bool) and got == want,
            f"speculates(speculate={speculate}, phase={phase!r}, layer={layer}, lookahead={d}, "
            f"guess={'a routing' if g is not None else None}) returned {got!r}, against the "
            "rules in its docstring",
        )
    return "speculative mode, decode only, with a guess, from layer lookahead on"


ROWS, SEQ = 16, 16  # held-out windows fed position by position: 256 predictions


def _teacher_forced(hook) -> tuple[Tensor, int]:
    """Feed held-out rows one position at a time through a KV cache, as decoding does (the hook
    told of each new pass, as the runtime does): the logits (B, T, V), and how many times the
    hook ran a router."""
    model, ids = demo_model(), heldout_ids()[:ROWS, :SEQ]
    cfg, routers_run = model.cfg, []
    cache = KVCache(cfg.num_layers, ROWS, cfg.num_kv_heads, SEQ, cfg.head_dim, "cpu", torch.float32)

    def counting(layer: int, resid: Tensor, u: Tensor, router) -> Routing:
        def route(x: Tensor) -> Routing:
            routers_run.append(layer)
            return router(x)

        return hook(layer, resid, u, route)

    if hasattr(hook, "reset"):
        hook.reset()
    out = []
    with torch.no_grad(), model.routed_by(counting):
        for i in range(SEQ):
            if hasattr(hook, "next_forward"):
                hook.next_forward(cfg.num_layers)
            out.append(model(ids[:, i : i + 1], cache=cache, start=i)[:, -1])
    return torch.stack(out, dim=1), len(routers_run)


@functools.cache
def _exact() -> tuple[Tensor, list[list[Routing]]]:
    recorder = RouteRecorder()
    return _teacher_forced(recorder)[0], recorder.forwards


def _perplexity(logits: Tensor) -> float:
    ids = heldout_ids()[: logits.shape[0], : logits.shape[1]]
    return math.exp(F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item())


def check_exact_mode(code) -> str:
    hook = code.PredictionHook(router_predictor(), speculate=False)
    logits, _ = _teacher_forced(hook)
    expect_equal(logits, _exact()[0], "exact-mode logits")
    L = demo_model().cfg.num_layers
    expect(
        set(hook.last_prediction) == set(range(1, L)),
        f"after a pass, last_prediction should hold the prediction each layer 1..{L - 1} had "
        f"(it has layers {sorted(hook.last_prediction)})",
    )
    return "logits bit-identical to no hook; every layer's guess kept for the runtime"


def check_perfect_guess(code) -> str:
    for d in (1, 2):  # the oracle also guesses the next pass's first layers (for prefetching)
        hook = code.PredictionHook(OraclePredictor(_exact()[1], d), speculate=True)
        logits, calls = _teacher_forced(hook)
        expect_equal(logits, _exact()[0], f"lookahead {d}: logits with a perfect guess")
        expect(
            calls == d * SEQ,
            f"lookahead {d}: routers ran {calls / SEQ:g} times per pass; only the first {d} "
            "layer(s) may route themselves",
        )
    return "a perfect guess is exact; only the first d layers run a router"


def check_prefill(code) -> str:
    model, ids = demo_model(), heldout_ids()[:4, :16]
    hook = code.PredictionHook(router_predictor(), speculate=True)
    hook.reset()
    hook.phase = "prefill"  # as the runtime sets it for a prompt's forward pass
    with torch.no_grad():
        want = model(ids)
        with model.routed_by(hook):
            got = model(ids)
    expect_equal(got, want, "a speculative hook's logits in a prefill")
    return "a prefill routes with the routers, in speculative mode too"


@functools.cache
def _speculative(hook_cls: type, d: int) -> Tensor:
    """Teacher-forced logits with Router-PF speculating at lookahead d (cached per class)."""
    return _teacher_forced(hook_cls(router_predictor(d), speculate=True))[0]


def check_perplexity(code) -> str:
    exact = _exact()[0]
    notes = [f"exact {_perplexity(exact):.2f}"]
    for d in (1, 2):
        logits = _speculative(code.PredictionHook, d)
        got, want = _perplexity(logits), _perplexity(_speculative(PredictionHook, d))
        expect(
            abs(got - want) < 1e-3 * want,
            f"lookahead {d}: speculative perplexity {got:.3f} with your hook, {want:.3f} with "
            "the engine's",
        )
        agree = (logits.argmax(-1) == exact.argmax(-1)).float().mean().item()
        notes.append(f"Router-PF d={d} {got:.2f} (top-1 agreement {agree:.2f})")
    return "held-out perplexity: " + ", ".join(notes)


def check_read_ids(code) -> str:
    model = demo_model()
    D = model.cfg.hidden_size
    hook = code.PredictionHook(router_predictor(), speculate=False, read_ids=True)
    hook.reset()
    r = randn(1, 1, D, seed=5)
    u = model.layers[0].post_attention_layernorm(r).view(1, D)
    with torch.no_grad(), HostReads() as reads:
        routing = hook(0, r, u, model.layers[0].mlp.route)
    guess = hook.pending.get(1)
    expect(guess is not None, "after layer 0, pending[1] should hold the guess for layer 1")
    for what, rt in (("the layer's routing", routing), ("the guess for layer 1", guess)):
        expect(
            rt.host_ids == rt.ids.tolist(),
            f"read_ids, one token: {what} should come back with its ids read to the host "
            "(host_ids)",
        )
    expect(
        reads.count == 1,
        f"read_ids, one token: the layer read tensor values to the host {reads.count} times "
        f"({', '.join(reads.calls) or 'none'}); the layer's ids and the guess's take one read",
    )
    return "one token: the layer's ids and the guess's, in one host read"


SPECULATIVE = Exercise(
    id="speculative",
    title="Speculative execution: run the predicted experts, and what it costs",
    concepts=(
        "the route hook",
        "exact vs speculative mode",
        "the first d layers route themselves",
        "never in a prefill",
        "perplexity cost",
        "one host read per layer",
    ),
    targets=targets(
        "tinymoe.speculation.hook:speculates", "tinymoe.speculation.hook:PredictionHook.__call__"
    ),
    minutes=40,
    prerequisites=("router-pf",),
    checks=(
        ("when to speculate", check_decision),
        ("exact mode", check_exact_mode),
        ("a perfect guess", check_perfect_guess),
        ("no speculation in a prefill", check_prefill),
        ("the perplexity cost", check_perplexity),
        ("one read for both", check_read_ids),
    ),
    engine_checks=(
        "exact mode",
        "a perfect guess",
        "no speculation in a prefill",
        "the perplexity cost",
    ),
)
