"""The speculative exercise: the route hook that runs a predictor and, speculating, lets a layer
run the predicted experts; what that costs in perplexity; and guesses that fail safe.

It runs on the demo model (trained, with calibration files) over held-out text, fed one position
at a time as decoding does, because a random model's routing has nothing to predict.
"""

import functools
import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from tinymoe.engine.kvcache import KVCache
from tinymoe.engine.moe import Routing
from tinymoe.exercises.exercise import (
    Exercise,
    HostReads,
    expect,
    expect_equal,
    targets,
)
from tinymoe.exercises.fixtures import (
    demo_model,
    heldout_ids,
    randn,
    router_predictor,
)
from tinymoe.speculation.context import Guess
from tinymoe.speculation.hook import PredictionHook, speculates
from tinymoe.speculation.oracle import OraclePredictor
from tinymoe.speculation.recording import RouteRecorder


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


class _Sureness:
    """Router-PF whose guesses are Guesses (context.py) with the sureness `sure(N)` says."""

    def __init__(self, sure) -> None:
        self.inner, self.sure = router_predictor(1), sure
        self.lookahead = 1

    def reset(self) -> None:
        self.inner.reset()

    def observe(self, layer: int, resid: Tensor, u: Tensor, routing: Routing) -> Guess | None:
        g = self.inner.observe(layer, resid, u, routing)
        return None if g is None else Guess(g.ids, g.weights, sure=self.sure(u.shape[0]))


SURENESS = {  # per token of the 16 rows: none sure, every one, every other one
    "every guess unsure": lambda n: torch.zeros(n, dtype=torch.bool),
    "every guess sure": lambda n: torch.ones(n, dtype=torch.bool),
    "every other token's guess sure": lambda n: torch.arange(n) % 2 == 0,
}


@functools.cache
def _fail_safe_engine(case: str) -> tuple[Tensor, float | None]:
    hook = PredictionHook(_Sureness(SURENESS[case]), speculate=True)
    return _teacher_forced(hook)[0], hook.fallback_share()


def check_fail_safe(code) -> str:
    for case, want_share in zip(SURENESS, (1.0, 0.0, 0.5), strict=True):
        hook = code.PredictionHook(_Sureness(SURENESS[case]), speculate=True)
        logits = _teacher_forced(hook)[0]
        if case == "every guess unsure":
            hint = "a token whose guess is unsure routes with the router: exact"
            expect_equal(logits, _exact()[0], f"{case}: the logits", hint)
        else:
            expect_equal(logits, _fail_safe_engine(case)[0], f"{case}: the logits")
        share = hook.fallback_share()
        expect(
            share == want_share,
            f"{case}: fallback_share() is {share}, expected {want_share}; count the tokens "
            "that ran a Guess in `guessed` and those that fell back in `fell_back`",
        )
    return _fail_safe_one_token(code) + "; unsure tokens route with their router, counted"


def _fail_safe_one_token(code) -> str:
    """A decode step (one token, read_ids): a Guess's sureness comes back with the ids, in the
    one read, so falling back at the next layer reads nothing more."""
    model = demo_model()
    hook = code.PredictionHook(_Sureness(SURENESS["every guess unsure"]), True, read_ids=True)
    hook.reset()
    routed = []
    for layer in (0, 1):
        r = randn(1, 1, model.cfg.hidden_size, seed=6 + layer)
        u = model.layers[layer].post_attention_layernorm(r).view(1, -1)

        def route(x: Tensor, layer=layer) -> Routing:
            routed.append(layer)
            return model.layers[layer].mlp.route(x)

        with torch.no_grad(), HostReads() as reads:
            hook(layer, r, u, route)
        guess = hook.pending.get(layer + 1)
        expect(
            isinstance(guess, Guess) and guess.host_sure == [False] and reads.count == 1,
            f"read_ids, one token, layer {layer}: the guess for layer {layer + 1} should come "
            f"back with its ids and its sureness read to the host (host_ids, host_sure) in the "
            f"layer's one read (it read {reads.count} times)",
        )
    expect(routed == [0, 1], "an unsure guess at layer 1 should fall back to layer 1's router")
    return "one token: the sureness read with the ids"


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
        "fail-safe guesses",
    ),
    targets=targets(
        "tinymoe.speculation.hook:speculates", "tinymoe.speculation.hook:PredictionHook.__call__"
    ),
    minutes=45,
    prerequisites=("router-pf",),
    checks=(
        ("when to speculate", check_decision),
        ("exact mode", check_exact_mode),
        ("a perfect guess", check_perfect_guess),
        ("no speculation in a prefill", check_prefill),
        ("the perplexity cost", check_perplexity),
        ("one read for both", check_read_ids),
        ("fail-safe guesses", check_fail_safe),
    ),
    engine_checks=(
        "exact mode",
        "a perfect guess",
        "no speculation in a prefill",
        "the perplexity cost",
        "fail-safe guesses",
    ),
    given=("Guess", "fail_safe"),  # a guess that knows how sure it is, and what runs it
)
