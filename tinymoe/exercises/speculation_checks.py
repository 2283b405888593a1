"""Exercises on the paper's contribution: the quasi-hidden state, and speculative execution.

Both run on the demo model (trained, with calibration files) over held-out text, because a
random model's routing has nothing to predict. (The learned estimator: distillation_checks.py.)
"""

import functools
import json
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from tinymoe.engine.kvcache import KVCache
from tinymoe.engine.moe import Routing
from tinymoe.exercises.exercise import (
    Exercise,
    expect,
    expect_close,
    expect_equal,
    expect_tensor,
    targets,
)
from tinymoe.exercises.fixtures import (
    DEMO,
    demo_calibration,
    demo_exact_run,
    demo_model,
    heldout_ids,
    randn,
)
from tinymoe.speculation.hook import PredictionHook
from tinymoe.speculation.predictors import RouterPredictor, quasi_hidden, recall_at_k
from tinymoe.speculation.recording import RouteRecorder

# ---------------------------------------------------------------- router-pf


def _routing(n: int, seed: int = 0) -> Routing:
    cfg = demo_model().cfg
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(cfg.num_experts, generator=g)[: cfg.top_k] for _ in range(n)])
    return Routing(ids=ids, weights=torch.softmax(torch.randn(n, cfg.top_k, generator=g), -1))


def check_qh_shape(code) -> str:
    model, D = demo_model(), demo_model().cfg.hidden_size
    q = code.quasi_hidden(model, demo_calibration().default_vectors, 2, 3, randn(5, D), _routing(5))
    expect_tensor(q, "q_l", (5, D), torch.float32)
    return "(N, D) in the activations' dtype"


def check_qh_no_vectors(code) -> str:
    model, D = demo_model(), demo_model().cfg.hidden_size
    r = randn(5, D, seed=1)
    for layer, target in ((0, 1), (2, 5)):
        with torch.no_grad():
            got = code.quasi_hidden(model, None, layer, target, r, _routing(5))
            want = quasi_hidden(model, None, layer, target, r, _routing(5))
        expect_close(
            got,
            want,
            f"q_l without default vectors (layer {layer}, target {target})",
            hint="with no vectors d_l = 0: q_l is the TARGET layer's pre-MoE norm of r_l",
        )
    return "d_l = 0: the target layer's norm of r_l"


def check_qh_values(code) -> str:
    model, D = demo_model(), demo_model().cfg.hidden_size
    dv = demo_calibration().default_vectors
    r = randn(6, D, seed=2)
    for layer, target in ((0, 1), (3, 4), (1, 4)):
        rt = _routing(6, seed=layer)
        with torch.no_grad():
            got = code.quasi_hidden(model, dv, layer, target, r, rt)
            want = quasi_hidden(model, dv, layer, target, r, rt)
        expect_close(
            got,
            want,
            f"q_l (layer {layer}, target {target})",
            atol=1e-4,
            rtol=1e-4,
            hint="d_l sums layer l's default vectors of the routed experts, weighted",
        )
    return "d_l from the routing weights and layer l's default vectors, lookaheads 1 and 3"


def _recall(quasi, default_vectors) -> list[float]:
    """Recall@K of Router-PF (lookahead 1) per target layer 1..L-1 on the held-out exact run."""
    model, run = demo_model(), demo_exact_run()
    out = []
    with torch.no_grad():
        for t in range(1, model.cfg.num_layers):
            q = quasi(model, default_vectors, t - 1, t, run.resid[t - 1], run.routing[t - 1])
            pred = model.layers[t].mlp.route(q).ids
            out.append(recall_at_k(pred, run.routing[t].ids).mean().item())
    return out


@functools.cache
def _engine_recall(with_vectors: bool) -> tuple[float, ...]:
    dv = demo_calibration().default_vectors if with_vectors else None
    return tuple(_recall(quasi_hidden, dv))


def check_qh_recall(code) -> str:
    mine = _recall(code.quasi_hidden, demo_calibration().default_vectors)
    want, bare = _engine_recall(True), _engine_recall(False)
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
        ("recall on held-out text", check_qh_recall),
    ),
)


# ---------------------------------------------------------------- speculative


class Replay:
    """A perfect predictor: replays the routing an exact run recorded, pass by pass."""

    def __init__(self, forwards: list[list[Routing]], lookahead: int) -> None:
        self.forwards, self.lookahead, self.step = forwards, lookahead, -1

    def reset(self) -> None:
        self.step = -1

    def observe(self, layer: int, resid: Tensor, u: Tensor, routing: Routing) -> Routing | None:
        self.step += layer == 0
        passes = self.forwards[self.step]
        if layer + self.lookahead >= len(passes):
            return None
        true = passes[layer + self.lookahead]
        return Routing(ids=true.ids.clone(), weights=true.weights.clone())


ROWS, SEQ = 16, 16  # held-out windows fed position by position: 256 predictions


def _teacher_forced(hook, rows: int = ROWS, seq: int = SEQ, count_routers: bool = False):
    """Feed held-out rows one position at a time through a KV cache, as decoding does:
    the logits (B, T, V) and how many times a router ran."""
    model, ids = demo_model(), heldout_ids()[:rows, :seq]
    cfg = model.cfg
    cache = KVCache(cfg.num_layers, rows, cfg.num_kv_heads, seq, cfg.head_dim, "cpu", torch.float32)
    calls = [0]
    saved, model.route_hook = model.route_hook, hook
    if count_routers:
        for b in model.layers:
            b.mlp.route = _counted(b.mlp.route, calls)  # an instance attribute, removed below
    try:
        if hasattr(hook, "reset"):
            hook.reset()
        with torch.no_grad():
            out = [model(ids[:, i : i + 1], cache=cache, start=i)[:, -1] for i in range(seq)]
    finally:
        model.route_hook = saved
        for b in model.layers:
            b.mlp.__dict__.pop("route", None)
    return torch.stack(out, dim=1), calls[0]


def _counted(route, calls: list[int]):
    def counting(u: Tensor) -> Routing:
        calls[0] += 1
        return route(u)

    return counting


@functools.cache
def _exact() -> tuple[Tensor, list[list[Routing]]]:
    recorder = RouteRecorder()
    return _teacher_forced(recorder)[0], recorder.forwards


def _perplexity(logits: Tensor) -> float:
    ids = heldout_ids()[: logits.shape[0], : logits.shape[1]]
    return math.exp(F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item())


def _router(d: int) -> RouterPredictor:
    return RouterPredictor(demo_model(), demo_calibration().default_vectors, d)


def check_exact_mode(code) -> str:
    hook = code.PredictionHook(_router(1), speculate=False)
    logits, _ = _teacher_forced(hook)
    expect_equal(
        logits,
        _exact()[0],
        "exact-mode logits",
        hint="without speculate, every layer routes with its own router",
    )
    L = demo_model().cfg.num_layers
    expect(
        set(hook.last_prediction) == set(range(1, L)),
        f"after a pass, last_prediction should hold the prediction each layer 1..{L - 1} had "
        f"(it has layers {sorted(hook.last_prediction)})",
    )
    return "logits bit-identical to no hook; every layer's guess kept for the runtime"


def check_perfect_guess(code) -> str:
    for d in (1, 2):
        hook = code.PredictionHook(Replay(_exact()[1], d), speculate=True)
        logits, calls = _teacher_forced(hook, count_routers=True)
        expect_equal(
            logits,
            _exact()[0],
            f"lookahead {d}: logits with a perfect guess",
            hint="a speculating layer runs the predicted experts with their weights",
        )
        expect(
            calls == d * SEQ,
            f"lookahead {d}: routers ran {calls // SEQ} times per pass; only "
            f"the first {d} layer(s) have nothing predicted and use their router",
        )
    return "a perfect guess is exact; only the first d layers run a router"


@functools.cache
def _speculative(hook_cls: type, d: int) -> Tensor:
    """Teacher-forced logits with Router-PF speculating at lookahead d (cached per class)."""
    return _teacher_forced(hook_cls(_router(d), speculate=True))[0]


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
    hook = code.PredictionHook(_router(1), speculate=False, read_ids=True)
    hook.reset()
    r = randn(1, 1, D, seed=5)
    u = model.layers[0].post_attention_layernorm(r).view(1, D)
    with torch.no_grad():
        routing = hook(0, r, u, model.layers[0].mlp.route)
    guess = hook.pending.get(1)
    expect(guess is not None, "after layer 0, pending[1] should hold the guess for layer 1")
    for what, rt in (("the layer's routing", routing), ("the guess for layer 1", guess)):
        expect(
            rt.host_ids == rt.ids.tolist(),
            f"read_ids, one token: {what} should come back with its ids already read to the "
            "host (host_ids), both in one transfer",
        )
    return "one token: the layer's ids and the guess's read together"


SPECULATIVE = Exercise(
    id="speculative",
    title="Speculative execution: run the predicted experts, and what it costs",
    concepts=(
        "the route hook",
        "exact vs speculative mode",
        "the first d layers route themselves",
        "perplexity cost",
        "one host read per layer",
    ),
    targets=targets("tinymoe.speculation.hook:PredictionHook.__call__"),
    minutes=40,
    prerequisites=("router-pf",),
    checks=(
        ("exact mode", check_exact_mode),
        ("a perfect guess", check_perfect_guess),
        ("the perplexity cost", check_perplexity),
        ("one read for both", check_read_ids),
    ),
)
