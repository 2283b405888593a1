"""Exercises on hiding copies behind compute: the time model and Eq. 1, then the prefetcher.

The prefetch checks run the real OffloadRuntime on the demo model with the student's Scheduler
subclass in place of the engine's. Decisions are compared with the engine's exactly (they never
depend on a clock); the overlap itself is timed on the simulated link, with a wide margin.
"""

import functools

from tinymoe.engine.generate import generate
from tinymoe.exercises.exercise import Exercise, expect, patched, targets
from tinymoe.exercises.fixtures import baby_model, demo_calibration, demo_model
from tinymoe.exercises.offload_checks import (
    FAST,
    NEW_TOKENS,
    offloaded,
    prompt,
    resident_tokens,
    same_decisions,
)
from tinymoe.offload.link import PRESETS, LinkSpec
from tinymoe.offload.meter import eq1_bound_ms
from tinymoe.offload.runtime import OffloadRuntime
from tinymoe.speculation.oracle import OraclePredictor, record_routing
from tinymoe.speculation.predictors import RouterPredictor

# ---------------------------------------------------------------- time-model

# Expert sizes in bytes: the demo model's in bf16 and fp32, and Mixtral-8x7B's in bf16.
SIZES = (3 * 80 * 192 * 2, 3 * 80 * 192 * 4, 3 * 14336 * 4096 * 2)


def check_copy_time(code) -> str:
    for name, spec in PRESETS.items():
        mine = code.LinkSpec(spec.gbps, spec.latency_us, spec.name)
        for nbytes in (0, *SIZES):
            got, want = mine.seconds(nbytes), spec.seconds(nbytes)
            expect(
                isinstance(got, float) and abs(got - want) <= 1e-12 + 1e-9 * want,
                f"{name}: {nbytes} bytes take {got} s on your link, not what a link of "
                f"{spec.gbps} GB/s (1e9 bytes/s) and {spec.latency_us} us per copy takes",
            )
    demo = PRESETS["pcie4-x16"].seconds(SIZES[0]) * 1e6
    mixtral = PRESETS["pcie4-x16"].seconds(SIZES[2]) * 1e3
    return f"PCIe 4.0 x16: a demo expert (bf16) {demo:.1f} us, a Mixtral expert {mixtral:.2f} ms"


def _layers(pairs: list[tuple[float, float]]) -> list[dict]:
    return [{"copy_ms": c, "compute_ms": t, "stall_ms": 0.0} for c, t in pairs]


def check_eq1_by_hand(code) -> str:
    cases = {
        "copy-bound": (40.0, [(4.0, 1.0)] * 8),
        "compute-bound": (20.0, [(0.5, 2.0)] * 8),
        "mixed": (31.0, [(3.0, 1.0), (0.5, 2.0), (2.0, 2.0), (0.0, 1.5)]),
    }
    for what, (tpot, pairs) in cases.items():
        got, want = code.eq1_bound_ms(tpot, _layers(pairs)), eq1_bound_ms(tpot, _layers(pairs))
        expect(
            abs(got - want) < 1e-9,
            f"{what} layers: your bound is {got} ms; prefetching can at best hide each "
            "layer's copy behind that layer's compute (Eq. 1)",
        )
    return "copy-bound, compute-bound and mixed layers"


def check_eq1_measured(code) -> str:
    """An on-demand run on the simulated link made of the student's LinkSpec, then Eq. 1."""
    model = baby_model("olmoe", seed=9)
    link = code.LinkSpec(50.0, 400.0, "slow")  # 0.4 ms per copy: far above a baby memcpy
    with OffloadRuntime(model, "on-demand", link=link) as rt:
        out = generate(model, list(range(1, 9)), 5, eos_ids=())
        report = rt.report()["decode"]
    per_copy_ms = 1e3 * link.seconds(rt.store.expert_bytes)
    want_ms = model.cfg.num_layers * model.cfg.top_k * per_copy_ms  # per decode step
    expect(
        abs(report["copy_ms"] - want_ms) < 0.2 * want_ms,
        f"the link was busy {report['copy_ms']:.2f} ms per decode step; "
        f"{model.cfg.num_layers} layers x top-{model.cfg.top_k} copies of "
        f"{per_copy_ms:.3f} ms each should take {want_ms:.2f} ms",
    )
    tpot = out.tpot_ms["mean"]
    got, want = code.eq1_bound_ms(tpot, report["layers"]), eq1_bound_ms(tpot, report["layers"])
    expect(abs(got - want) < 1e-9, f"on the measured run your bound is {got:.3f} ms, not Eq. 1's")
    return f"baby model, on-demand TPOT {tpot:.2f} ms, Eq.-1 bound {got:.2f} ms"


TIME_MODEL = Exercise(
    id="time-model",
    title="Where the time goes: the link's copy time and the Eq.-1 bound",
    concepts=(
        "bandwidth and per-copy latency",
        "copy vs compute per layer",
        "the best any prefetcher can do (Eq. 1)",
    ),
    targets=targets("tinymoe.offload.link:LinkSpec.seconds", "tinymoe.offload.meter:eq1_bound_ms"),
    minutes=20,
    prerequisites=("moe-layer",),
    checks=(
        ("copy time", check_copy_time),
        ("Eq. 1 by hand", check_eq1_by_hand),
        ("a measured run", check_eq1_measured),
    ),
)


# ---------------------------------------------------------------- prefetch


@functools.cache
def _recording():
    return record_routing(demo_model(), prompt(), NEW_TOKENS, eos_ids=())[1]


def _oracle(code, link, **kwargs):
    with patched("tinymoe.offload.runtime", "Scheduler", code.Scheduler):
        return offloaded("oracle", predictor=OraclePredictor(_recording()), link=link, **kwargs)


def _router(d: int = 1, weights: bool = False) -> RouterPredictor:
    return RouterPredictor(demo_model(), demo_calibration().default_vectors, d, weights)


def check_oracle_exact(code) -> str:
    tokens, report = _oracle(code, FAST)
    expect(tokens == resident_tokens(), "with your prefetcher the oracle generated other tokens")
    expect(report["decode"]["prefetch_bytes"] > 0, "the oracle prefetched nothing")
    for layer, kinds in enumerate(report["decode_miss_kinds"][1:], 1):
        bad = {k: v for k, v in kinds.items() if k != "late"}
        expect(
            not bad,
            f"decode, layer {layer}: the oracle's prefetches should leave no miss but late "
            f"ones; got {bad} (is every guessed expert copied, or found, and reserved?)",
        )
    return "tokens equal resident's; only late misses after layer 0"


def check_prefetch_decisions(code) -> str:
    runs = [
        ("prefetch+router+lru", 1, False),
        ("prefetch+router+lru", 2, False),
        ("speculative+router", None, True),
    ]
    for policy, depth, weights in runs:
        with patched("tinymoe.offload.runtime", "Scheduler", code.Scheduler):
            tokens, mine = offloaded(
                policy, predictor=_router(weights=weights), prefetch_depth=depth
            )
        ref_tokens, ref = offloaded(
            policy, predictor=_router(weights=weights), prefetch_depth=depth
        )
        expect(tokens == ref_tokens, f"{policy}: the tokens changed")
        same_decisions(mine, ref, f"{policy} (depth {depth})")
    return "exact prefetch at depths 1 and 2 and speculative prefetch copy what the engine copies"


def check_overlap(code) -> str:
    """Copies about as long as compute: on-demand waits for every copy, the oracle hides them."""
    expert_bytes = demo_model().cfg.expert_numel * 4
    link = LinkSpec(100.0, 250.0, "slow")  # ~0.25 ms per expert: 1 ms per layer at top-4
    tokens, oracle = _oracle(code, link)
    _, on_demand = offloaded("on-demand", link=link)
    expect(tokens == resident_tokens(), "with your prefetcher the oracle generated other tokens")
    a, b = on_demand["decode"]["stall_ms"], oracle["decode"]["stall_ms"]
    expect(
        b < 0.6 * a,
        f"stall per decode step: on-demand {a:.2f} ms, the oracle with your "
        f"prefetcher {b:.2f} ms; prefetching layer l+1 while layer l computes should hide "
        "most of it",
    )
    return (
        f"stall per decode step {a:.2f} ms on demand -> {b:.2f} ms with the oracle "
        f"({link.seconds(expert_bytes) * 1e3:.2f} ms per expert copy)"
    )


PREFETCH = Exercise(
    id="prefetch",
    title="Prefetching: copy the next layer's experts while this one computes",
    concepts=(
        "reservations",
        "never evict for a guess",
        "throttled exact prefetch",
        "copy/compute overlap on a first-in first-out link",
    ),
    targets=targets("tinymoe.offload.scheduler:Scheduler._prefetch"),
    minutes=45,
    prerequisites=("eviction", "time-model"),
    checks=(
        ("the oracle, exact", check_oracle_exact),
        ("the engine's decisions", check_prefetch_decisions),
        ("copy/compute overlap", check_overlap),
    ),
)
