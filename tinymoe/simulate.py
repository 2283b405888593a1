"""What if: `python -m tinymoe.simulate --model DIR [--validate | --hardware NAME ...]`.

Replays a recorded run's routing under a cost model, for every policy the engine has, with the
engine's own scheduler (tinymoe/simulator/), and prints the bench's kind of table.

    --validate            run the real bench on this machine (same prompt, same link), record
                          its routing, simulate the same run, print simulated beside measured
    --hardware NAME       project onto a preset GPU host (rtx4090, a6000, h100-pcie): device
                          bandwidth, link and host memory bandwidth from published figures
    --scale-to CONFIG     ... for a model shaped like a published config.json (Mixtral-8x7B,
                          Qwen3-30B-A3B): expert size and layer count from it, routing from the
                          recording (an approximation: see simulator/costs.py)
    --trace FILE          replay a recorded trace instead of recording one (--record writes one)

Each policy is simulated with the miss handlers of --miss-handlers: `copy` (the engine's
default) and `cpu` (compute a missing expert on the host, as llama.cpp's --n-cpu-moe does).
"""

import argparse
import json
import sys
from pathlib import Path

from tinymoe import load_model
from tinymoe.bench import add_run_flags, auto_depth, prompt_ids, run_rounds, simulated_link
from tinymoe.cli import (
    OneLineParser,
    device_from_args,
    dtype_from_args,
    model_dir_from_args,
    positive_int,
    run_cli,
)
from tinymoe.engine.config import ModelConfig
from tinymoe.engine.generate import generate
from tinymoe.errors import TinyMoeError
from tinymoe.offload.link import LinkSpec
from tinymoe.offload.policy import parse_policy
from tinymoe.offload.scheduler import MISS_HANDLERS
from tinymoe.simulator.costs import HARDWARE, MeasuredCosts, RooflineCosts, scale_trace
from tinymoe.simulator.record import RoutingTrace, record_run
from tinymoe.simulator.replay import simulate
from tinymoe.speculation.calibration import load_speculation
from tinymoe.speculation.oracle import record_routing

DEFAULT_POLICIES = "on-demand,lru,prefetch+router+lru,speculative+router,oracle,resident"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser("simulate", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, metavar="DIR", help="checkpoint to record a run of")
    p.add_argument("--policies", default=DEFAULT_POLICIES, help="comma-separated policy names")
    p.add_argument("--validate", action="store_true", help="simulate beside a real bench run")
    p.add_argument("--hardware", choices=list(HARDWARE), default=None, help="project onto a GPU")
    p.add_argument("--scale-to", default=None, metavar="CONFIG", help="a published config.json")
    p.add_argument("--context", type=positive_int, default=2048, help="KV length for --hardware")
    p.add_argument("--trace", default=None, metavar="FILE", help="replay this recorded trace")
    p.add_argument("--record", default=None, metavar="FILE", help="write the recorded trace")
    p.add_argument(
        "--miss-handlers",
        default="copy",
        help=f"comma-separated, of {', '.join(MISS_HANDLERS)}: one row per policy and handler",
    )
    add_run_flags(p)  # bench's; --repeat: --validate's real runs per policy
    p.set_defaults(lookahead=1, repeat=3)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = [n.strip() for n in args.policies.split(",") if n.strip()]
    policies = [parse_policy(n) for n in names]  # a typo fails here, before any work
    handlers = [h.strip() for h in args.miss_handlers.split(",") if h.strip()]
    for h in handlers:
        if h not in MISS_HANDLERS:
            raise TinyMoeError(f"--miss-handlers: {h!r} is not one of {MISS_HANDLERS}")
    if args.validate and (args.hardware or args.scale_to or args.trace):
        raise TinyMoeError("--validate measures this machine: no --hardware, --scale-to, --trace")
    if args.scale_to and not args.hardware:
        raise TinyMoeError("--scale-to needs --hardware (the projection's GPU host)")
    target_cfg = ModelConfig.from_file(args.scale_to) if args.scale_to else None
    if args.record and Path(args.record).parent and not Path(args.record).parent.is_dir():
        raise TinyMoeError(f"--record {args.record}: no such directory")
    device = device_from_args(args)
    predictor_names = sorted({p.predictor for p in policies if p.predictor is not None})

    measured: dict[str, float] = {}
    if args.trace:
        trace = RoutingTrace.load(args.trace)
        link = LinkSpec(**trace.machine["link"], name="recorded")
        depth = args.prefetch_depth or 1
    else:
        if args.model is None:
            raise TinyMoeError("give --model DIR (to record a run) or --trace FILE")
        recorded_cfg = ModelConfig.from_file(model_dir_from_args(args) / "config.json")
        ids = prompt_ids(args, recorded_cfg.vocab_size)
        # Fits in memory? Before the weights are read. Recording runs on-demand (record_run).
        offload = [parse_policy("on-demand"), *(policies if args.validate else ())]
        dtype = dtype_from_args(args, device, len(ids) + args.max_new_tokens, offload)
        model = load_model(args.model, device=device, dtype=dtype)
        generate(model, ids[:4], 2, eos_ids=())  # warm-up
        ref, recording = record_routing(model, ids, args.max_new_tokens, eos_ids=())
        link = simulated_link(model, ids, args, recording)
        depth = args.prefetch_depth or auto_depth(model, ref, link, None)
        print(f"link: {link.gbps:.3f} GB/s + {link.latency_us} us; depth {depth}", file=sys.stderr)
        print("recording the routing ...", file=sys.stderr)
        trace = record_run(
            model, ids, args.max_new_tokens, link, predictor_names, args.model, args.lookahead
        )
        if args.validate:  # the real bench's rows: their median TPOTs
            learned = set(predictor_names) - {"oracle"}
            calibration = load_speculation(args.model, model.cfg) if learned else None
            rows = run_rounds(model, names, ids, args, link, ref, recording, calibration, depth)
            measured = {r["policy"]: r["tpot_ms"] for r in rows}
    if args.record:
        trace.save(args.record)

    costs = MeasuredCosts(trace, link)
    where = f"this machine ({trace.machine.get('device')}), measured times"
    if args.hardware:
        hw = HARDWARE[args.hardware]
        if target_cfg is not None:
            trace = scale_trace(trace, target_cfg)
        cfg = target_cfg
        if cfg is None:  # the recorded model itself, on the other hardware
            if args.model is None:
                raise TinyMoeError("--hardware with --trace needs --scale-to CONFIG.json")
            cfg = ModelConfig.from_file(Path(args.model) / "config.json")
        costs = RooflineCosts(hw, cfg, args.context)
        where = f"{hw.name}, roofline projection ({hw.source})"
    rows = []
    for name in names:
        for h in handlers:
            if h == "cpu" and not parse_policy(name).offload:
                continue
            row = simulate(trace, name, costs, args.expert_slots, depth, miss_handler=h)
            row.update(miss_handler=h, simulated_tpot_ms=row["tpot_ms"])
            if name in measured and h == "copy":
                row["measured_tpot_ms"] = measured[name]
            rows.append(row)
    result = {
        "where": where,
        "model": trace.model,
        "link_gbps": costs.link.gbps,
        "prefetch_depth": depth,
        "decode_steps": trace.decode_steps,
        "rows": [{k: v for k, v in r.items() if k != "layers"} for r in rows],
    }
    print(json.dumps(result) if args.json else format_table(result))
    return 0


def format_table(result: dict) -> str:
    lines = [
        f"{result['where']}",
        f"{result['decode_steps']} decode steps, link {result['link_gbps']:.3f} GB/s, "
        f"exact prefetch depth {result['prefetch_depth']}",
        f"{'policy':<24} {'misses':>6} {'slots':>5} {'sim TPOT':>9} {'measured':>9} "
        f"{'sim/meas':>8} {'hit':>5} {'GB/step':>8} {'stall ms':>8}",
    ]
    for r in result["rows"]:
        meas = r.get("measured_tpot_ms")
        ratio = f"{r['simulated_tpot_ms'] / meas:8.3f}" if meas else f"{'-':>8}"
        meas_s = f"{meas:9.2f}" if meas else f"{'-':>9}"
        gb = r["bytes_copied"] / max(r["steps"], 1) / 1e9
        lines.append(
            f"{r['policy']:<24} {r['miss_handler']:>6} {r['expert_slots']:>5} "
            f"{r['simulated_tpot_ms']:9.2f} {meas_s} {ratio} {r['hit_rate']:5.2f} {gb:8.4f} "
            f"{r['stall_ms']:8.2f}"
        )
    return "\n".join(lines)


def cli(argv: list[str] | None = None) -> int:
    return run_cli(main, argv)  # a user mistake: one `error: ...` line on stderr, exit status 2


if __name__ == "__main__":
    sys.exit(cli())
