"""Exercises on hiding copies behind compute: the time model and Eq. 1, then the prefetcher.

The prefetch checks run the real OffloadRuntime on the demo model with the student's Scheduler
subclass in place of the engine's. Decisions are compared with the engine's exactly (they never
depend on a clock); the overlap is timed by the simulator's replay of the demo model's
routing on a virtual clock, with the student's scheduler in the engine's place.
"""

import contextlib
import functools
import io
import json

from tinymoe import bench
from tinymoe.exercises.exercise import CheckFailed, Exercise, expect, patched, targets
from tinymoe.exercises.fixtures import DEMO, demo_model, router_predictor
from tinymoe.exercises.offload_checks import (
    FAST,
    NEW_TOKENS,
    offloaded,
    on_slots,
    prompt,
    resident_tokens,
    same_as_engine,
)
from tinymoe.offload.link import PRESETS, LinkSpec
from tinymoe.offload.meter import eq1_bound_ms
from tinymoe.offload.runtime import OffloadRuntime
from tinymoe.offload.scheduler import Prefetch
from tinymoe.simulator.costs import MeasuredCosts
from tinymoe.simulator.record import LayerRecord, PassRecord, RoutingTrace, model_info
from tinymoe.simulator.replay import simulate
from tinymoe.speculation.oracle import OraclePredictor, record_routing

# ---------------------------------------------------------------- time-model

# Bytes of one expert (ModelConfig.expert_bytes): the demo model's in bf16 and in fp32 (as the
# checks load it), and Mixtral-8x7B's in bf16.
SIZES = (92_160, 184_320, 352_321_536)


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
            f"{what} layers: your bound is {got} ms, not the best TPOT a prefetcher can reach "
            "from this on-demand run (Eq. 1)",
        )
    return "copy-bound, compute-bound and mixed layers"


BENCH_LINK = (50.0, 400.0)  # GB/s and us per copy: about 0.4 ms per demo-model expert


def check_bench(code) -> str:
    """tinymoe.bench on the demo model, on demand, over a simulated link built from the
    student's LinkSpec, with the student's Eq. 1 computing the bound it reports."""
    cfg, (gbps, latency_us) = demo_model().cfg, BENCH_LINK
    per_copy_s = LinkSpec(gbps, latency_us).seconds(SIZES[1])  # the demo's experts, in fp32
    mine = code.LinkSpec(gbps, latency_us).seconds(SIZES[1])
    expect(
        isinstance(mine, float) and 0.5 * per_copy_s < mine < 2 * per_copy_s,
        "not run: with your copy time the simulated link would be far too slow or too fast "
        "(see 'copy time')",
    )
    argv = ["--model", str(DEMO), "--policies", "on-demand", "--prompt-tokens", "8"]
    argv += ["--max-new-tokens", "6", "--link-gbps", str(gbps), "--link-latency-us"]
    argv += [str(latency_us), "--json"]
    out = io.StringIO()
    with (
        patched("tinymoe.cli", "LinkSpec", code.LinkSpec),  # the link the flags describe
        patched("tinymoe.bench", "eq1_bound_ms", code.eq1_bound_ms),
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(io.StringIO()),
    ):
        bench.main(argv)
    row = json.loads(out.getvalue())["rows"][0]
    want_ms = cfg.num_layers * cfg.top_k * 1e3 * per_copy_s  # every routed expert, every step
    expect(
        # (a busy machine only adds time: a copy is never faster than its modelled time)
        0.9 * want_ms < row["copy_ms"] < 1.5 * want_ms,
        f"the link was busy {row['copy_ms']:.2f} ms per decode step; {cfg.num_layers} layers x "
        f"top-{cfg.top_k} copies at {gbps} GB/s and {latency_us} us each should take "
        f"{want_ms:.2f} ms",
    )
    want = eq1_bound_ms(row["tpot_ms"], row["layers"])
    expect(
        abs(row["eq1_bound_ms"] - want) < 1e-9,
        f"bench reports an Eq.-1 bound of {row['eq1_bound_ms']:.3f} ms for this run, not Eq. 1's",
    )
    return (
        f"demo model on demand: TPOT {row['tpot_ms']:.2f} ms, link busy {row['copy_ms']:.2f} ms "
        f"per step, Eq.-1 bound {row['eq1_bound_ms']:.2f} ms"
    )


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
        ("tinymoe.bench on your code", check_bench),
    ),
    engine_checks=("tinymoe.bench on your code",),
)


# ---------------------------------------------------------------- prefetch


@functools.cache
def _recording():
    return record_routing(demo_model(), prompt(), NEW_TOKENS, eos_ids=())[1]


def _oracle(code, link: LinkSpec) -> tuple[list[int], dict]:
    """Generate offloaded with the student's scheduler, prefetching the recorded routing."""
    with patched("tinymoe.offload.runtime", "Scheduler", code.Scheduler):
        return offloaded("oracle", predictor=lambda: OraclePredictor(_recording()), link=link)


@contextlib.contextmanager
def _scheduler(code, slots: int, depth: int | None):
    """A runtime on the demo model with the student's scheduler, outside any forward pass:
    the scheduler, and the list of (layer, expert) its prefetch copies go to, in order."""
    with patched("tinymoe.offload.runtime", "Scheduler", code.Scheduler):
        policy, predictor = "prefetch+router+lru", router_predictor()
        rt = OffloadRuntime(demo_model(), policy, predictor=predictor, slots=slots, link=FAST)
    with rt:
        sched, copies, copy = rt.scheduler, [], rt.engine.copy
        sched.depth = depth

        def logged(dst, src, slot, tag):
            if tag.kind == "prefetch":
                copies.append((tag.layer, tag.expert))
            return copy(dst, src, slot, tag)

        rt.engine.copy = logged  # an instance attribute: gone with the runtime
        yield sched, copies


def _reserved(sched, target: int) -> set:
    """The experts the scheduler recorded as reserved for `target` whose slots are reserved."""
    cache = sched.cache
    keys = set(sched.reserved.get(target, []))
    return {k for k in keys if k in cache.slot_of and cache.reserved[cache.slot_of[k]]}


def check_one_guess(code) -> str:
    """_prefetch called directly on known cache states: found experts, depth, no room."""
    with _scheduler(code, slots=8, depth=2) as (sched, copies):
        for e in (3, 7):
            sched.cache.insert((1, e))  # already in a slot (its bytes do not matter here)
        sched._prefetch(Prefetch(1, [3, 10, 11, 7, 12]))
        expect(not {(1, 3), (1, 7)} & set(copies), "an expert already in a slot was copied again")
        expect(len(copies) <= 2, f"depth 2: {len(copies)} copies were issued for one guess")
        expect(
            len(copies) == 2,
            "depth 2 limits copies: an expert found in a slot costs none, yet only "
            f"{len(copies)} copy was issued",
        )
        expect(
            copies == [(1, 10), (1, 11)],
            "depth 2: the copies issued were not the most confident guesses (the list's order)",
        )
        expect(
            _reserved(sched, 1) == {(1, 3), (1, 7), (1, 10), (1, 11)},
            "every guessed expert that is in a slot, found or copied, must be reserved for "
            "the target layer (in the cache, and in the scheduler's record of reservations)",
        )
        expect(
            sched.unused_prefetch >= {(1, 10), (1, 11)}
            and not {(1, 3), (1, 7)} & sched.unused_prefetch,
            "the experts a prefetch copied (and only those) count as unused prefetches",
        )
    with _scheduler(code, slots=4, depth=None) as (sched, copies):
        held = [(1, e) for e in range(4)]
        for key in held:
            sched.cache.reserve(sched.cache.insert(key)[0])
        sched._prefetch(Prefetch(2, [5, 6]))
        expect(
            not copies and all(k in sched.cache.slot_of for k in held),
            "a prefetch evicted a reserved slot (a guess never undoes another)",
        )
        on_slots(sched.cache, "unreserve", held[1], held[2])
        on_slots(sched.cache, "pin", held[1])
        sched._prefetch(Prefetch(2, [5, 6]))
        expect(
            copies == [(2, 5)] and held[2] not in sched.cache.slot_of,
            "with one slot neither reserved nor pinned, a prefetch of two experts should copy "
            "the first into it and skip the second",
        )
    with _scheduler(code, slots=8, depth=None) as (sched, copies):
        L = sched.num_layers
        try:  # the oracle's guess for the next pass's layer 1, made in this pass's last layer
            sched._prefetch(Prefetch(L + 1, [4, 5]))
        except (IndexError, KeyError):
            raise CheckFailed(
                f"a target of {L + 1} (>= num_layers) raised: it names layer 1 of the next pass"
            ) from None
        decode = sched.meter.stats["decode"].layers[1].prefetch_bytes
        expect(
            copies == [(1, 4), (1, 5)] and set(sched.reserved.get(L + 1, [])) == {(1, 4), (1, 5)},
            f"a target of {L + 1} (>= num_layers) is layer 1 of the next pass: its experts are "
            f"copied as layer 1's, and reserved under target {L + 1} until the pass ends",
        )
        expect(
            decode == 2 * sched.store.expert_bytes,
            "a prefetch for the next pass counts its bytes in that layer's decode figures",
        )
    return "found experts reserved, no copy; at most depth copies; no room: skipped; next pass"


def check_oracle_exact(code) -> str:
    tokens, report = _oracle(code, FAST)
    expect(tokens == resident_tokens(), "with your prefetcher the oracle generated other tokens")
    expect(report["decode"]["prefetch_bytes"] > 0, "the oracle prefetched nothing")
    for layer, kinds in enumerate(report["decode_miss_kinds"][1:], 1):
        bad = {k: v for k, v in kinds.items() if k != "late"}
        expect(
            not bad,
            f"decode, layer {layer}: the oracle's prefetches should leave no miss but late "
            f"ones; got {bad}",
        )
    return "tokens equal resident's; only late misses after layer 0"


def check_prefetch_decisions(code) -> str:
    yours = ("tinymoe.offload.runtime", "Scheduler", code.Scheduler)
    runs = (("prefetch+router+lru", 1), ("prefetch+router+lru", 2), ("speculative+router", None))
    for policy, depth in runs:
        what = f"{policy} (depth {depth})"
        same_as_engine(yours, policy, what, predictor=router_predictor, prefetch_depth=depth)
    return "exact prefetch at depths 1 and 2 and speculative prefetch copy what the engine copies"


def check_overlap(code) -> str:
    """Copies as long as compute: on-demand waits for every copy, the oracle hides them. Timed
    on the simulator's virtual clock (the engine's runtime decisions with the student's
    scheduler, replayed over the demo model's recorded routing), so a busy machine cannot
    move it."""
    info = model_info(demo_model())
    link = LinkSpec(100.0, 250.0, "slow")  # ~0.25 ms per expert: 1 ms per layer at top-4
    per_copy = link.seconds(info["expert_bytes"])
    # Fixed times, recorded as if measured: a layer computes as long as its four copies take
    # (attention and router 2 copies' time, each expert half of one).
    times = dict(attention_s=2 * per_copy, expert_s=per_copy / 2)
    passes = [
        PassRecord(
            "prefill" if f == 0 else "decode",
            [LayerRecord(experts=r.ids.tolist(), **times) for r in forward],
        )
        for f, forward in enumerate(_recording())
    ]
    trace = RoutingTrace(info, {"device": "virtual"}, 1, [], passes)
    costs = MeasuredCosts(trace, link)
    with patched("tinymoe.simulator.replay", "Scheduler", code.Scheduler):
        on_demand, oracle = (simulate(trace, p, costs) for p in ("on-demand", "oracle"))
    a, b = on_demand["stall_ms"], oracle["stall_ms"]
    expect(
        b < 0.25 * a,
        f"stall per decode step: on-demand {a:.2f} ms, the oracle with your "
        f"prefetcher {b:.2f} ms; with copies as long as compute, prefetching layer l+1 while "
        "layer l computes should hide nearly all of it",
    )
    # A prefetcher that waits for its own copies stalls nowhere, and hides nothing: TPOT says so.
    # Eq. 1 here: every layer's copies hidden behind its compute, half of on-demand's TPOT.
    ta, tb = on_demand["tpot_ms"], oracle["tpot_ms"]
    expect(
        tb < 0.6 * ta,
        f"TPOT: on-demand {ta:.2f} ms, the oracle with your prefetcher {tb:.2f} ms, though "
        "nothing stalled: does the prefetch wait for its own copies? They should run while the "
        "layers compute (Eq. 1 allows about half of on-demand's TPOT)",
    )
    return (
        f"stall per decode step {a:.2f} ms on demand -> {b:.2f} ms with the oracle, TPOT "
        f"{ta:.2f} -> {tb:.2f} ms ({per_copy * 1e3:.2f} ms per expert copy, "
        f"{4 * per_copy * 1e3:.2f} ms of compute a layer; virtual time)"
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
        ("one guess, step by step", check_one_guess),
        ("the oracle, exact", check_oracle_exact),
        ("the engine's decisions", check_prefetch_decisions),
        ("copy/compute overlap", check_overlap),
    ),
    engine_checks=("the oracle, exact", "the engine's decisions", "copy/compute overlap"),
)
