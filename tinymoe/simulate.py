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
import copy
import itertools
import json
import sys
from pathlib import Path

import torch

from tinymoe import load_model
from tinymoe.bench import add_run_flags, auto_depth, prompt_ids, simulated_link
from tinymoe.cli import (
    OneLineParser,
    check_output_file,
    check_positions,
    check_real_link,
    device_from_args,
    dtype_from_args,
    model_dir_from_args,
    open_fraction,
    positive_int,
    run_cli,
)
from tinymoe.engine.config import ModelConfig
from tinymoe.engine.generate import generate
from tinymoe.errors import TinyMoeError
from tinymoe.offload.link import LinkSpec
from tinymoe.offload.policy import parse_policy
from tinymoe.offload.quant import quant_format
from tinymoe.offload.scheduler import MISS_HANDLERS
from tinymoe.plot import pyplot
from tinymoe.quant_flags import add_quant_flags, quant_from_args
from tinymoe.simulator.costs import (
    EXPERT_DTYPES,
    HARDWARE,
    MeasuredCosts,
    RooflineCosts,
    projected_depth,
    quant_dtype,
    scale_trace,
)
from tinymoe.simulator.record import RoutingTrace, record_run, recorded_quant
from tinymoe.simulator.replay import simulate
from tinymoe.simulator.sweep import format_sweep, plot_sweep, sweep_result
from tinymoe.simulator.validate import validate_rounds
from tinymoe.speculation.calibration import load_speculation
from tinymoe.speculation.oracle import record_routing
from tinymoe.speculation.predictors import check_lookahead

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
    p.add_argument(
        "--expert-dtype",
        choices=list(EXPERT_DTYPES),
        default="bfloat16",
        help="with --hardware: the experts' storage format, for their bytes (docs/simulator.md)",
    )
    add_quant_flags(p)  # with --hardware: --expert-dtype tinymoe's intB-gG (costs.quant_dtype)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--sweep",
        type=sweep_flag,
        action="append",
        default=[],
        metavar="AXIS=V1,V2",
        help=f"simulate every combination: AXIS one of {', '.join(SWEEP_AXES)}; repeat for "
        "several axes (one table, a row per policy and point)",
    )
    p.add_argument("--plot", metavar="FILE", help="with --sweep: draw it (needs matplotlib)")
    return p


def hardware_name(s: str) -> str:
    if s not in HARDWARE:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(HARDWARE)}, got {s!r}")
    return s


# --sweep's axes: each the flag it sets, and that flag's type
SWEEP_AXES = {
    "expert-slots": positive_int,  # the same trace, replayed with each cache size
    "lookahead": positive_int,  # a trace recorded per lookahead (its guesses depend on it)
    "copy-share": open_fraction,  # the link calibrated again, and a trace recorded over it
    "hardware": hardware_name,  # the same trace, projected onto each preset
}


def sweep_flag(s: str) -> tuple[str, list]:
    """--sweep's argparse type: AXIS=V1,V2,... -> (AXIS, [values])."""
    axis, _, values = s.partition("=")
    if axis not in SWEEP_AXES or not values:
        raise argparse.ArgumentTypeError(
            f"expected AXIS=V1,V2,... with AXIS one of {', '.join(SWEEP_AXES)}, got {s!r}"
        )
    return axis, [SWEEP_AXES[axis](v.strip()) for v in values.split(",")]


def check_sweep(args: argparse.Namespace) -> dict[str, list]:
    """--sweep's axes {axis: values}, checked against the other flags before any work."""
    sweep: dict[str, list] = {}
    for axis, values in args.sweep:
        if axis in sweep:
            raise TinyMoeError(f"--sweep {axis} given twice: one --sweep per axis")
        if axis != "lookahead" and getattr(args, axis.replace("-", "_")) is not None:
            raise TinyMoeError(f"--sweep {axis} and --{axis}: give one of them")
        sweep[axis] = values
    if sweep and (args.validate or args.record):
        raise TinyMoeError("--sweep simulates many points: no --validate, no --record")
    if args.plot and not sweep:
        raise TinyMoeError("--plot draws a sweep: add --sweep AXIS=V1,V2")
    if args.trace and "copy-share" in sweep:
        raise TinyMoeError("--sweep copy-share calibrates the link on a run: --model, not --trace")
    if args.trace and "lookahead" in sweep:
        raise TinyMoeError("--sweep lookahead records a trace per lookahead: --model, not --trace")
    if args.plot:  # before the work: a missing matplotlib or folder would waste it
        pyplot()
        check_output_file(args.plot, "--plot")
    return sweep


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = [n.strip() for n in args.policies.split(",") if n.strip()]
    for n in names:
        parse_policy(n)  # a typo fails here, before any work
    handlers = [h.strip() for h in args.miss_handlers.split(",") if h.strip()]
    for h in handlers:
        if h not in MISS_HANDLERS:
            raise TinyMoeError(f"--miss-handlers: {h!r} is not one of {MISS_HANDLERS}")
    if args.validate and (args.hardware or args.scale_to or args.trace):
        raise TinyMoeError("--validate measures this machine: no --hardware, --scale-to, --trace")
    sweep = check_sweep(args)
    if args.scale_to and not (args.hardware or "hardware" in sweep):
        raise TinyMoeError("--scale-to needs --hardware (the projection's GPU host)")
    target_cfg = ModelConfig.from_file(args.scale_to) if args.scale_to else None
    if args.record and Path(args.record).parent and not Path(args.record).parent.is_dir():
        raise TinyMoeError(f"--record {args.record}: no such directory")
    if args.expert_quant != "none":  # recorded with these experts, projected with their bytes
        if args.expert_dtype != "bfloat16" or args.validate:
            raise TinyMoeError(
                "--expert-quant records the quantized experts and sets --expert-dtype: no "
                "--expert-dtype, no --validate (tinymoe bench --expert-quant measures them)"
            )
        fmt = quant_format(args.expert_quant, args.expert_group_size)
        if args.model is not None and not args.trace:  # checked against the experts, now
            quant_from_args(args, ModelConfig.from_file(model_dir_from_args(args) / "config.json"))
        if args.hardware or "hardware" in sweep:
            args.expert_dtype = quant_dtype(fmt)
            if args.expert_dtype not in EXPERT_DTYPES:
                raise TinyMoeError(
                    f"--expert-group-size {fmt.group_size}: projected for 32, 64, 128"
                )
    device = device_from_args(args)
    check_real_link(args, device)  # on CUDA: the real link, measured (record_run)
    if args.model is not None and not args.trace:
        layers = ModelConfig.from_file(model_dir_from_args(args) / "config.json").num_layers
        for lookahead in sweep.get("lookahead", [args.lookahead]):
            check_lookahead(lookahead, layers)  # every point's, before loading
    session: dict = {}  # what the points share: the model, its links and traces
    if not sweep:
        result = point(args, names, handlers, target_cfg, device, session)
        print(json.dumps(result) if args.json else format_table(result))
        return 0
    results = []
    for values in itertools.product(*sweep.values()):
        at = dict(zip(sweep, values, strict=True))
        point_args = copy.copy(args)
        for axis, v in at.items():
            setattr(point_args, axis.replace("-", "_"), v)
        print(f"sweep: {at}", file=sys.stderr)
        results.append((at, point(point_args, names, handlers, target_cfg, device, session)))
    result = sweep_result(sweep, results)
    print(json.dumps(result) if args.json else format_sweep(result))
    if args.plot:  # after the table: whatever happens here, the numbers are out
        plot_sweep(result, args.plot)
    return 0


def point(
    args: argparse.Namespace,
    names: list[str],
    handlers: list[str],
    target_cfg: ModelConfig | None,
    device: torch.device,
    session: dict,
) -> dict:
    """One simulation: the rows of every policy and miss handler at `args`' settings. The model
    loads once per session; a trace is recorded once per lookahead and copy share."""
    policies = [parse_policy(n) for n in names]
    predictor_names = sorted({p.predictor for p in policies if p.predictor is not None})
    validated = None  # --validate: the rows of simulator/validate.py, measured beside replayed
    if args.trace:
        trace = RoutingTrace.load(args.trace)
        recorded = trace.model.get("expert_quant", "none")  # (its bytes are the trace's)
        fmt = quant_format(args.expert_quant, args.expert_group_size)
        if fmt and not args.hardware and recorded != quant_dtype(fmt):
            raise TinyMoeError(
                f"--trace {args.trace} was recorded with experts {recorded!r}: replayed here with "
                "its own bytes; drop --expert-quant, or record it with --expert-quant"
            )
        link = LinkSpec(**trace.machine["link"], name="recorded")
        depth = args.prefetch_depth or 1
    else:
        if args.model is None:
            raise TinyMoeError("give --model DIR (to record a run) or --trace FILE")
        if not session:
            recorded_cfg = ModelConfig.from_file(model_dir_from_args(args) / "config.json")
            ids = prompt_ids(args, recorded_cfg.vocab_size)
            positions = check_positions(recorded_cfg, len(ids), args.max_new_tokens)
            # Fits in memory? Before the weights are read. Recording runs on-demand (record_run).
            offload = [parse_policy("on-demand"), *(policies if args.validate else ())]
            dtype = dtype_from_args(args, device, positions, offload)
            quant = dict(expert_quant=args.expert_quant, group_size=args.expert_group_size)
            model = load_model(args.model, device=device, dtype=dtype, **quant)
            generate(model, ids[:4], 2, eos_ids=())  # warm-up
            ref, recording = record_routing(model, ids, args.max_new_tokens, eos_ids=())
            session.update(model=model, ids=ids, ref=ref, recording=recording, traces={})
        model, ids, ref, recording = (session[k] for k in ("model", "ids", "ref", "recording"))
        key = (args.lookahead, args.copy_share)
        if key not in session["traces"]:
            # CPU: the simulated link (--link-*, or calibrated to --copy-share); CUDA: the real
            # one, which record_run measures into the trace
            link = simulated_link(model, ids, args, recording) if device.type == "cpu" else None
            print("recording the routing ...", file=sys.stderr)
            session["traces"][key] = record_run(
                model, ids, args.max_new_tokens, link, predictor_names, args.model, args.lookahead
            )
        trace = session["traces"][key]
        link = LinkSpec(**trace.machine["link"], name=trace.machine.get("link_source", "recorded"))
        depth = args.prefetch_depth or auto_depth(model, ref, link, None, recorded_quant(model))
        print(f"link: {link.gbps:.3f} GB/s + {link.latency_us} us; depth {depth}", file=sys.stderr)
        if args.validate:  # each round: its own trace, then the real runs (simulator/validate.py)
            learned = set(predictor_names) - {"oracle"}
            calibration = load_speculation(args.model, model.cfg) if learned else None
            validated = validate_rounds(
                model, ids, names, args, link, ref, recording, calibration, depth, handlers
            )
    if args.record:
        trace.save(args.record)

    costs = MeasuredCosts(trace, link)
    where = f"this machine ({trace.machine.get('device')}), measured times"
    if args.hardware:
        hw = HARDWARE[args.hardware]
        expert_dtype = args.expert_dtype  # the experts' storage format (costs.EXPERT_DTYPES)
        if target_cfg is not None:
            trace = scale_trace(trace, target_cfg, expert_dtype)
        cfg = target_cfg
        if cfg is None:  # the recorded model itself, on the other hardware
            if args.model is None:
                raise TinyMoeError("--hardware with --trace needs --scale-to CONFIG.json")
            cfg = ModelConfig.from_file(Path(args.model) / "config.json")
        costs = RooflineCosts(hw, cfg, args.context, expert_dtype)
        if args.prefetch_depth is None:  # auto: from the projected GPU's costs, not this CPU's
            depth = projected_depth(costs, trace)
        where = f"{hw.name}, roofline projection ({hw.source})"
    rows = validated or []
    for name in names if validated is None else ():
        for h in handlers:
            if h == "cpu" and not parse_policy(name).offload:
                continue
            row = simulate(trace, name, costs, args.expert_slots, depth, miss_handler=h)
            row.update(miss_handler=h, simulated_tpot_ms=row["tpot_ms"])
            rows.append(row)
    result = {
        "where": where,
        "model": trace.model,
        "link_gbps": costs.link.gbps,
        "prefetch_depth": depth,
        "decode_steps": trace.decode_steps,
        "rows": [{k: v for k, v in r.items() if k != "layers"} for r in rows],
        **({"assumptions": costs.assumptions(trace)} if args.hardware else {}),
    }
    return result


def format_table(result: dict) -> str:
    lines = [
        f"{result['where']}",
        f"{result['decode_steps']} decode steps, link {result['link_gbps']:.3f} GB/s, "
        f"exact prefetch depth {result['prefetch_depth']}",
        f"{'policy':<24} {'misses':>6} {'slots':>5} {'sim TPOT':>9} {'measured':>9} "
        f"{'sim/meas':>8} {'rounds':>11} {'costs':>6} {'hit':>5} {'GB/step':>8} {'stall ms':>8}",
    ]
    if "assumptions" in result:  # a projection: what it assumed (--json: with the sources)
        items = [f"{k} {v['value']}" for k, v in result["assumptions"].items()]
        lines.insert(2, "assumed: " + ", ".join(items[1:]))  # (items[0], the host, is above)
    for r in result["rows"]:
        meas = r.get("measured_tpot_ms")
        # --validate: the median of the rounds' own ratios, and their range (each replay with its
        # real run's own compute), then the median ratio with the round's costs as recorded
        ratio = f"{r['ratio']:8.3f}" if meas else f"{'-':>8}"
        spread = f"{r['spread'][0]:.2f}-{r['spread'][1]:.2f}" if meas else "-"
        plain = f"{r['ratio_round_costs']:6.3f}" if meas else f"{'-':>6}"
        meas_s = f"{meas:9.2f}" if meas else f"{'-':>9}"
        gb = r["bytes_copied"] / max(r["steps"], 1) / 1e9
        lines.append(
            f"{r['policy']:<24} {r['miss_handler']:>6} {r['expert_slots']:>5} "
            f"{r['simulated_tpot_ms']:9.2f} {meas_s} {ratio} {spread:>11} {plain} "
            f"{r['hit_rate']:5.2f} {gb:8.4f} {r['stall_ms']:8.2f}"
        )
    return "\n".join(lines)


def cli(argv: list[str] | None = None) -> int:
    return run_cli(main, argv)  # a user mistake: one `error: ...` line on stderr, exit status 2


if __name__ == "__main__":
    sys.exit(cli())
