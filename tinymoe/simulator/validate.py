"""Validation that holds on a shared machine: each round replayed with its own round's costs.

`tinymoe simulate --validate` compares the replay's TPOT with the real run's, per policy. The
replay takes every time from a recorded run (MeasuredCosts), so the comparison is only as good
as the recorded run is a sample of the same machine the real runs met. On a machine shared with
other work it is not: one recording, then minutes of real runs, and a busy spell that falls on
either side alone shows up as a simulator error (31% in issue 18, then 4% for the same command).

So each round r of --repeat records its own trace (record_run: its timed on-demand run *is* the
round's cost measurement), runs every policy's real run once (round-robin, as bench.run_rounds
does), and replays every policy on that round's trace, twice:

    round's costs   the recorded run's compute times as they are: does a cost measured under one
                    policy price another? (ratio_round_costs)
    own compute     the same times scaled by one factor per policy and round, so that the
                    replay computes exactly as long as that policy's real run did (the meter's
                    compute_ms, stalls excluded); what is left to compare is what the simulator
                    models: copies, stalls, overlap, the cache and the scheduler (ratio)

The second is the validation: on two busy cores a real run's compute alone moves by 10-20%
between runs seconds apart, while the stalls it models agree to a few percent (docs/results.md,
issue 18). A row reports, per policy:

    simulated_tpot_ms, measured_tpot_ms   the median over rounds of each (own compute)
    ratio                                 the median over rounds of the round's simulated/measured
    spread                                [min, max] of the rounds' ratios: how far one round
                                          alone could be off, beside the error
    ratio_round_costs, spread_round_costs the same with the round's costs as recorded
    hit_rate, bytes_copied, steps, ...    the replay's, from the round whose ratio is the median

Rows of another miss handler than `copy` have no real run (the engine measures only what it
runs), so no compute of their own: they are replayed with the round's costs, and their median
round is the one of the median simulated TPOT.
"""

import argparse
import statistics
import sys

from tinymoe.bench import run_policy
from tinymoe.engine.generate import GenerationResult
from tinymoe.engine.model import MoETransformer
from tinymoe.engine.moe import Routing
from tinymoe.offload.link import LinkSpec
from tinymoe.offload.policy import parse_policy
from tinymoe.simulator.costs import MeasuredCosts
from tinymoe.simulator.record import record_run
from tinymoe.simulator.replay import simulate
from tinymoe.speculation.calibration import Calibration


def validate_rounds(
    model: MoETransformer,
    ids: list[int],
    names: list[str],
    args: argparse.Namespace,
    link: LinkSpec | None,
    ref: GenerationResult,
    recording: list[list[Routing]],
    calibration: Calibration | None,
    depth: int,
    handlers: tuple[str, ...] | list[str] = ("copy",),
) -> list[dict]:
    """One row per policy and miss handler (see the top), from args.repeat rounds. args: simulate's
    (max_new_tokens, lookahead, repeat, expert_slots, model). link: the simulated link on a CPU,
    which each round records over and the real runs copy over; on CUDA each round's trace
    carries the real link as measured in that round, and the replay takes it. ref, recording: the
    resident run, its tokens (each real run's "exact") and routing (the oracle's)."""
    on_cpu = model.embed_tokens.weight.is_cpu
    predictors = sorted({p.predictor for n in names if (p := parse_policy(n)).predictor})
    sims: dict[tuple[str, str], list[dict]] = {}
    measured: dict[str, list[dict]] = {name: [] for name in names}
    for i in range(args.repeat):
        print(f"round {i + 1}/{args.repeat}: recording ...", file=sys.stderr)
        trace = record_run(
            model, ids, args.max_new_tokens, link if on_cpu else None, predictors, args.model,
            args.lookahead,
        )  # fmt: skip
        for name in names:  # the real runs, right after the recording that prices them
            print(f"round {i + 1}/{args.repeat}: {name} ...", file=sys.stderr)
            row = run_policy(
                model, name, ids, args.max_new_tokens, link, recording, args.expert_slots,
                None, None, calibration, args.lookahead, depth,
            )  # fmt: skip
            measured[name].append({
                "tpot_ms": row["tpot_ms"], "compute_ms": row["compute_ms"],
                "stall_ms": row["stall_ms"], "exact": row["tokens"] == ref.tokens,
            })  # fmt: skip
        # This round's link: the simulated one on a CPU, the one measured with it on CUDA.
        round_link = LinkSpec(**trace.machine["link"], name=trace.machine["link_source"])
        costs = MeasuredCosts(trace, round_link)
        for name in names:
            for h in handlers:
                if h == "cpu" and not parse_policy(name).offload:
                    continue  # nothing is offloaded: nothing to compute on the host
                sim = simulate(trace, name, costs, args.expert_slots, depth, miss_handler=h)
                if h == "copy":  # the real run's own compute (see the top)
                    scale = measured[name][-1]["compute_ms"] / sim["compute_ms"]
                    own = MeasuredCosts(trace, round_link, compute_scale=scale)
                    sim = {
                        **simulate(trace, name, own, args.expert_slots, depth),
                        "round_costs_tpot_ms": sim["tpot_ms"],
                        "compute_scale": scale,
                    }
                sims.setdefault((name, h), []).append(sim)
    return [round_row(name, h, runs, measured[name]) for (name, h), runs in sims.items()]


def round_row(name: str, handler: str, sims: list[dict], measured: list[dict]) -> dict:
    """A policy's row from its rounds: sims[r] the replay of round r's trace, measured[r] the
    real run of round r (used for the `copy` handler only: the one the engine runs)."""
    sim_ms = [s["tpot_ms"] for s in sims]
    if handler != "copy":
        at = sorted(range(len(sims)), key=lambda r: sim_ms[r])[len(sims) // 2]
        keep = {k: v for k, v in sims[at].items() if k != "layers"}
        return {
            **keep,
            "miss_handler": handler,
            "simulated_tpot_ms": statistics.median(sim_ms),
            "simulated_tpot_ms_rounds": sim_ms,
            "rounds": len(sims),
        }
    meas_ms = [m["tpot_ms"] for m in measured]
    ratios = [s / m for s, m in zip(sim_ms, meas_ms, strict=True)]
    plain = [s["round_costs_tpot_ms"] / m for s, m in zip(sims, meas_ms, strict=True)]
    at = sorted(range(len(ratios)), key=lambda r: ratios[r])[len(ratios) // 2]
    keep = {k: v for k, v in sims[at].items() if k != "layers"}
    return {
        **keep,  # policy, expert_slots, hit_rate, bytes_copied, steps, stall_ms, ...
        "miss_handler": handler,
        "simulated_tpot_ms": statistics.median(sim_ms),
        "measured_tpot_ms": statistics.median(meas_ms),
        "ratio": statistics.median(ratios),
        "spread": [min(ratios), max(ratios)],
        "ratio_round_costs": statistics.median(plain),
        "spread_round_costs": [min(plain), max(plain)],
        "median_round": at,
        "simulated_tpot_ms_rounds": sim_ms,
        "measured_tpot_ms_rounds": meas_ms,
        "ratio_rounds": ratios,
        "ratio_round_costs_rounds": plain,
        "compute_scale_rounds": [s["compute_scale"] for s in sims],
        "simulated_stall_ms_rounds": [s["stall_ms"] for s in sims],
        "measured_stall_ms_rounds": [m["stall_ms"] for m in measured],
        "exact": all(m["exact"] for m in measured),
        "rounds": len(sims),
    }
