"""simulator/validate.py: every round records its own trace, and is replayed with it."""

import argparse
import statistics

import pytest
from conftest import make_checkpoint

from tinymoe import load_model
from tinymoe.offload.link import LinkSpec
from tinymoe.simulator import validate
from tinymoe.simulator.costs import MeasuredCosts
from tinymoe.simulator.replay import simulate
from tinymoe.speculation.oracle import record_routing

PROMPT = [5, 17, 3, 42, 8, 61, 23, 7, 90, 11, 2, 33]
LINK = LinkSpec(0.05, 10.0, "test")  # slow: copies are a large, visible part of TPOT
NAMES = ["on-demand", "lru", "prefetch+router-nodefault+lru"]
SLOTS, DEPTH, NEW = 6, 2, 4


@pytest.fixture(scope="module")
def rounds(tmp_path_factory):
    """validate_rounds over 3 rounds, with every recorded trace and real run kept beside it."""
    baby = make_checkpoint(tmp_path_factory.mktemp("val") / "baby", num_layers=4)
    model = load_model(baby)
    ref, recording = record_routing(model, PROMPT, NEW, eos_ids=())
    args = argparse.Namespace(
        max_new_tokens=NEW, lookahead=1, repeat=3, expert_slots=SLOTS, prefetch_depth=DEPTH,
        model=str(baby),
    )  # fmt: skip
    traces, runs = [], []
    real_record, real_run = validate.record_run, validate.run_policy

    def record_run(*a, **kw):
        traces.append(real_record(*a, **kw))
        return traces[-1]

    def run_policy(*a, **kw):
        runs.append(real_run(*a, **kw))
        return runs[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(validate, "record_run", record_run)
        mp.setattr(validate, "run_policy", run_policy)
        rows = validate.validate_rounds(
            model, PROMPT, NAMES, args, LINK, ref, recording, None, DEPTH, ("copy", "cpu")
        )
    return rows, traces, runs


def test_one_trace_per_round_and_the_real_runs_round_robin(rounds):
    rows, traces, runs = rounds
    assert len(traces) == 3 and len({id(t) for t in traces}) == 3
    assert [r["policy"] for r in runs] == NAMES * 3  # round-robin within each round
    assert all(
        t.machine["link"] == {"gbps": LINK.gbps, "latency_us": LINK.latency_us} for t in traces
    )
    # one row per policy and handler; resident-less policies all offload, so both handlers
    assert [(r["policy"], r["miss_handler"]) for r in rows] == [
        (n, h) for n in NAMES for h in ("copy", "cpu")
    ]


def test_each_round_is_replayed_with_its_own_trace(rounds):
    """Recompute every round's ratios from the kept traces and real runs: the replay with the
    round's costs, then with the compute scaled to the real run's own; the row's medians, spreads
    and median round's fields must be those."""
    rows, traces, runs = rounds
    for row in (r for r in rows if r["miss_handler"] == "copy"):
        name = row["policy"]
        real = [r for r in runs if r["policy"] == name]
        plain = [simulate(t, name, MeasuredCosts(t, LINK), SLOTS, DEPTH) for t in traces]
        scales = [r["compute_ms"] / p["compute_ms"] for r, p in zip(real, plain, strict=True)]
        own = [
            simulate(t, name, MeasuredCosts(t, LINK, compute_scale=c), SLOTS, DEPTH)
            for t, c in zip(traces, scales, strict=True)
        ]
        sim = [o["tpot_ms"] for o in own]
        meas = [r["tpot_ms"] for r in real]
        ratios = [s / m for s, m in zip(sim, meas, strict=True)]
        plain_ratios = [p["tpot_ms"] / m for p, m in zip(plain, meas, strict=True)]
        # the scaled replay computes exactly as long as the real run did (compute is linear in
        # the costs; stalls are what the replay adds)
        for o, r in zip(own, real, strict=True):
            assert o["compute_ms"] == pytest.approx(r["compute_ms"], rel=1e-9)
        assert row["simulated_tpot_ms_rounds"] == pytest.approx(sim, rel=1e-12)
        assert row["measured_tpot_ms_rounds"] == meas
        assert row["compute_scale_rounds"] == pytest.approx(scales, rel=1e-12)
        assert row["simulated_tpot_ms"] == pytest.approx(statistics.median(sim), rel=1e-12)
        assert row["measured_tpot_ms"] == statistics.median(meas)
        assert row["ratio"] == pytest.approx(statistics.median(ratios), rel=1e-12)
        assert row["spread"] == pytest.approx([min(ratios), max(ratios)], rel=1e-12)
        assert row["spread"][0] <= row["ratio"] <= row["spread"][1]
        assert row["ratio_round_costs"] == pytest.approx(statistics.median(plain_ratios))
        assert row["spread_round_costs"] == pytest.approx([min(plain_ratios), max(plain_ratios)])
        at = row["median_round"]
        assert ratios[at] == pytest.approx(row["ratio"], rel=1e-12)  # 3 rounds: a real median
        for key in ("hit_rate", "bytes_copied", "steps", "stall_ms", "expert_slots"):
            assert row[key] == pytest.approx(own[at][key], rel=1e-12), key
        # what was copied does not depend on how long compute took (no decision reads a clock;
        # only whether a copy was late does)
        assert own[at]["bytes_copied"] == plain[at]["bytes_copied"]
        assert row["steps"] == NEW - 1 and row["expert_slots"] == SLOTS
        assert row["exact"] is True


def test_other_handlers_are_simulated_only(rounds):
    rows, traces, _ = rounds
    for row in (r for r in rows if r["miss_handler"] == "cpu"):
        assert "measured_tpot_ms" not in row and "ratio" not in row
        sim = [
            simulate(t, row["policy"], MeasuredCosts(t, LINK), SLOTS, DEPTH, "cpu")["tpot_ms"]
            for t in traces
        ]
        assert row["simulated_tpot_ms"] == pytest.approx(statistics.median(sim), rel=1e-12)
        if "router" not in row["policy"]:  # no prefetches: every miss computed on the host
            assert row["bytes_copied"] == 0 and row["host_computed"] > 0


def test_the_rows_fit_simulates_table(rounds):
    from tinymoe.simulate import format_table

    rows, _, _ = rounds
    result = {"where": "here", "decode_steps": NEW - 1, "link_gbps": 0.05, "prefetch_depth": 2}
    lines = format_table({**result, "rows": rows}).splitlines()
    assert len(lines) == 3 + len(rows)
    assert lines[3].split()[:3] == ["on-demand", "copy", str(SLOTS)]
