"""Offloading policies side by side: `tinymoe bench --model DIR --policies ...`.

Runs each policy in one process on the same prompt (greedy, a fixed number of new tokens) and
prints one table: TPOT and its ratio to on-demand, tokens/s, hit rate, GB copied, the share of
TPOT stalled and spent copying, and the paper's Eq.-1 bound computed from the on-demand run:

    T_bound = T_on-demand - sum over layers of min(t_copy,l, t_compute,l)

the best TPOT any prefetcher can reach by hiding copies behind compute. "of Eq.1" is the share
of that possible saving a policy achieved: (T_on-demand - T) / (T_on-demand - T_bound).

`--copy-share S` calibrates the simulated link so that on-demand (no cache) spends share S of
TPOT copying, the regime the paper measured (about 0.85 on Qwen3-30B-A3B / A6000): one
on-demand run over a very fast link measures compute per token C and copies per token n, and
the link is set so that n copies take S / (1 - S) * C. The on-demand row then shows the share
actually achieved. Every row also checks that its tokens equal those of the resident run
("exact"), the run the oracle replays.

`--expert-quant none,int8,int4` runs every policy once per format, all over the link calibrated
on the unquantized on-demand run: what fewer bytes buy on the same link. A format's rows are
exact against a resident run of the same quantized experts (store.quantized_resident).
"""

import argparse
import json
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

from tinymoe import GenerationResult, TinyMoeError, generate, load_model
from tinymoe.bench_table import format_table
from tinymoe.cli import (
    OneLineParser,
    add_device_flags,
    add_link_flags,
    add_model_flag,
    check_output_dir,
    check_positions,
    check_real_link,
    device_from_args,
    dtype_from_args,
    link_from_args,
    model_dir_from_args,
    open_fraction,
    positive_float,
    positive_int,
    positive_int_or_auto,
    run_cli,
)
from tinymoe.engine.config import ModelConfig
from tinymoe.engine.model import MoETransformer
from tinymoe.engine.moe import Routing
from tinymoe.engine.tokenizer import load_tokenizer
from tinymoe.offload.link import DEFAULT_LINK, PRESETS, LinkSpec
from tinymoe.offload.meter import eq1_bound_ms
from tinymoe.offload.policy import BASE_POLICIES, parse_policy
from tinymoe.offload.quant import DEFAULT_GROUP_SIZE, QuantFormat
from tinymoe.offload.runtime import OffloadRuntime, bare_report
from tinymoe.offload.scheduler import throttle_depth
from tinymoe.offload.store import quantized_resident
from tinymoe.offload.transfer import measure_h2d_peak_gbps
from tinymoe.quant_flags import add_quant_flags, quant_from_args
from tinymoe.speculation.calibration import Calibration, load_speculation
from tinymoe.speculation.oracle import record_routing
from tinymoe.speculation.predictors import PREDICTOR_NAMES, make_predictor

FAST_LINK = LinkSpec(1e6, 0.0, "unlimited")  # for measuring compute alone


def run_policy(
    model: MoETransformer,
    name: str,
    ids: list[int],
    max_new_tokens: int,
    link: LinkSpec,
    recording: list[list[Routing]],
    slots: int | None = None,
    budget_gb: float | None = None,
    trace: Path | None = None,
    calibration: Calibration | None = None,
    lookahead: int = 1,
    prefetch_depth: int = 1,
    warm: bool = False,
    quant: QuantFormat | None = None,
) -> dict:
    """Generate once under policy `name`; return its row (before the on-demand comparisons).
    warm: generate once first, untimed, under the runtime, which keeps what it loaded (--warm).
    resident without a trace is the bare model: no runtime, the baseline of every row.
    quant: the experts' format (the model's are already in it: quantized_resident)."""
    policy = parse_policy(name)
    predictor = None
    if policy.predictor is not None:
        predictor = make_predictor(
            policy.predictor, model, calibration, lookahead, recording=recording
        )
    offload = policy.offload
    rt = None  # resident without a trace: the bare model
    if offload or trace is not None:
        rt = OffloadRuntime(
            model,
            policy,
            predictor=predictor,
            slots=slots if offload else None,
            budget_gb=budget_gb if offload else None,
            link=link if offload and model.embed_tokens.weight.is_cpu else None,
            trace=trace is not None,
            prefetch_depth=prefetch_depth,
            expert_quant=quant.name if quant else "none",
            group_size=quant.group_size if quant else DEFAULT_GROUP_SIZE,
        )
    with rt or nullcontext():
        if warm:
            generate(model, ids, max_new_tokens, eos_ids=())
            if rt:
                rt.reset_stats()
        try:
            out = generate(model, ids, max_new_tokens, eos_ids=())
        except KeyboardInterrupt:  # what ran so far is worth seeing, as in run.py
            if trace is not None:
                rt.write_trace(trace)
                print(f"wrote the trace so far to {trace}", file=sys.stderr)
            raise
        report = rt.report() if rt else bare_report(model.cfg.num_layers)
        if trace is not None:
            rt.write_trace(trace)
    dec = report["decode"]
    tpot = out.tpot_ms["mean"]
    return {
        "policy": name,
        "expert_quant": quant.name if quant else "none",
        "expert_slots": report["expert_slots"],
        "tpot_ms": tpot,
        "tokens_per_s": out.tokens_per_s,
        "hit_rate": dec["hit_rate"],
        "gb_copied": dec["bytes_copied"] / 1e9,
        "stall_ms": dec["stall_ms"],
        "stall_share": dec["stall_ms"] / tpot,
        "copy_ms": dec["copy_ms"],
        "copy_share": dec["copy_ms"] / tpot,
        # What the link delivered while busy (on CUDA: the real copies, timed with events).
        "achieved_gbps": dec["bytes_copied"] / (dec["copy_ms"] * dec["steps"] / 1e3) / 1e9
        if dec["copy_ms"] > 0
        else None,
        "compute_ms": dec["compute_ms"],
        "miss_kinds": dec["miss_kinds"],
        "fallback_share": report.get("fallback_share"),
        "wasted_prefetch_bytes": dec["wasted_prefetch_bytes"],
        "prefill_copy_ms": report["prefill"]["copy_ms"],
        "prefill_gb_copied": report["prefill"]["bytes_copied"] / 1e9,
        "tokens": out.tokens,
        "layers": dec["layers"],
    }


def simulated_link(
    model: MoETransformer, ids: list[int], args: argparse.Namespace, recording: list[list[Routing]]
) -> LinkSpec:
    """The CPU's link: the --link-* flags' (default: DEFAULT_LINK), or with --copy-share S one
    over which on-demand (no cache) spends share S of TPOT copying (see the top).

    First guess: compute per token C from on-demand over an unlimited link. Then twice: run
    on-demand over the guessed link and take C as the part of TPOT the link did not cover
    (TPOT - copy time), which includes the runtime's own overhead at this speed.
    """
    given = link_from_args(args) or PRESETS[DEFAULT_LINK]
    share, latency_us = args.copy_share, given.latency_us
    if share is None:
        return given
    cfg = model.cfg
    expert_bytes = cfg.expert_bytes(model.embed_tokens.weight.dtype)
    copies_per_token = cfg.num_layers * cfg.top_k  # top-k slots: every routed expert is copied
    link = FAST_LINK
    for i in range(3):  # the first guess, then two refinements
        probe = run_policy(model, "on-demand", ids, args.max_new_tokens, link, recording)
        compute_ms = probe["tpot_ms"] - (probe["stall_ms"] if i == 0 else probe["copy_ms"])
        per_copy_s = share / (1 - share) * compute_ms / 1e3 / copies_per_token
        if per_copy_s <= latency_us * 1e-6:
            raise TinyMoeError(
                f"--copy-share {share}: each copy would have to take {per_copy_s * 1e6:.1f} us, "
                f"less than the link latency ({latency_us} us); lower --link-latency-us"
            )
        gbps = expert_bytes / (per_copy_s - latency_us * 1e-6) / 1e9
        link = LinkSpec(gbps, latency_us, f"calibrated to copy share {share}")
    return link


def auto_depth(
    model: MoETransformer,
    resident: GenerationResult,
    link: LinkSpec | None,
    h2d_gbps: float | None,
    quant: QuantFormat | None = None,
) -> int:
    """--prefetch-depth auto: from the resident run's TPOT and the link (throttle_depth), for
    copies of the experts in `quant`'s bytes (None: the model's dtype)."""
    cfg = model.cfg
    if link is None:  # CUDA: the measured pinned bandwidth
        link = LinkSpec(h2d_gbps, 0.0, "measured")
    nbytes = cfg.expert_bytes(model.embed_tokens.weight.dtype)
    copy_s = link.seconds(quant.expert_bytes(cfg.expert_numel) if quant else nbytes)
    layer_s = resident.tpot_ms["mean"] / 1e3 / cfg.num_layers
    return throttle_depth(layer_s, copy_s, cfg.num_experts)


def new_tokens(s: str) -> int:
    """--max-new-tokens' argparse type: an integer >= 2."""
    n = positive_int(s)
    if n < 2:
        raise argparse.ArgumentTypeError("must be >= 2 (TPOT excludes the first token)")
    return n


def add_run_flags(p: argparse.ArgumentParser) -> None:
    """A bench run's flags, shared with `tinymoe simulate`: prompt, run, cache, link, device."""
    a = p.add_argument
    a("--prompt", default=None, help="prompt text (needs tokenizer.json)")
    a("--prompt-tokens", type=positive_int, default=32, metavar="N", help="else N random ids")
    a("--max-new-tokens", type=new_tokens, default=32, metavar="N", help="per run, >= 2")
    a("--lookahead", type=positive_int, metavar="D", help="with a predictor (default: 1)")
    a(
        "--prefetch-depth",
        type=positive_int_or_auto,
        default="auto",
        metavar="N|auto",
        help="exact prefetch copies at most this many guessed experts per layer; auto: 1 + the "
        "expert copies the link finishes in one layer's compute, from the resident run's TPOT "
        "(measured once per --expert-quant format, so its rows get the same depth)",
    )
    a("--expert-slots", type=positive_int, metavar="N", help="for all (default: per policy)")
    add_link_flags(p)
    a(
        "--copy-share",
        type=open_fraction,
        metavar="S",
        help="calibrate --link-gbps so on-demand spends share S of TPOT copying, e.g. 0.85 "
        "(default: off, the link is the --link-* flags')",
    )
    add_device_flags(p)
    a("--seed", type=int, default=0, metavar="N", help="for the random prompt")
    a("--repeat", type=positive_int, default=1, metavar="N", help="rounds; report medians")


def run_rounds(
    model: MoETransformer, names: list[str], ids: list[int], args: argparse.Namespace,
    link: LinkSpec | None, ref: GenerationResult, recording: list[list[Routing]],
    calibration: Calibration | None, depth: int, budget_gb: float | None = None,
    trace_dir: Path | None = None, quant: QuantFormat | None = None,
) -> list[dict]:  # fmt: skip
    """Each policy's row from --repeat rounds (run_policy, with add_run_flags' `args`); "exact":
    every run's tokens are those of `ref`, the resident run that recorded `recording`. Round-robin,
    so a slow spell of a shared machine hits every policy alike; each policy keeps its median
    run (by TPOT), whole, so its columns stay consistent with each other."""
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for i in range(args.repeat):
        for name in names:
            print(f"round {i + 1}/{args.repeat}: {name} ...", file=sys.stderr)
            label = name if quant is None else f"{name}.{quant.name}"
            trace = trace_dir / f"{label}.trace.json" if trace_dir and i == 0 else None
            row = run_policy(
                model, name, ids, args.max_new_tokens, link, recording, args.expert_slots,
                budget_gb, trace, calibration, args.lookahead, depth, getattr(args, "warm", False),
                quant,
            )  # fmt: skip
            row["exact"] = row.pop("tokens") == ref.tokens
            row["prefetch_depth"] = depth
            runs[name].append(row)
    rows = []
    for name in names:
        row = sorted(runs[name], key=lambda r: r["tpot_ms"])[len(runs[name]) // 2]
        row["exact"] = all(r["exact"] for r in runs[name])
        row["tpot_ms_runs"] = [r["tpot_ms"] for r in runs[name]]
        rows.append(row)
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser("bench", description=__doc__.splitlines()[0])
    a = p.add_argument
    add_model_flag(p)
    a(
        "--policies",
        default="on-demand,lru,oracle,resident",
        help=f"comma-separated policy names, each one of {', '.join(BASE_POLICIES)}, or "
        "prefetch+P or speculative+P, optionally +lru or +lfu, with predictor P one of "
        f"{', '.join(PREDICTOR_NAMES)}, oracle (e.g. prefetch+router+lru); on-demand is always "
        "run: it is the baseline",
    )
    add_run_flags(p)
    a("--expert-budget-gb", type=positive_float, metavar="GB", help="or a budget in GB (1e9 B)")
    a("--trace-dir", metavar="DIR", help="write POLICY.trace.json files here")
    a(
        "--warm",
        action="store_true",
        help="each run first generates the prompt once, untimed, under its runtime: with "
        "--expert-slots for every expert and a fast link, TPOT over resident's is the runtime's "
        "host overhead (the table then shows it per layer: host us/L)",
    )
    add_quant_flags(p, several=True)
    a("--json", action="store_true", help="print one JSON object")
    return p


def prompt_ids(args: argparse.Namespace, vocab_size: int) -> list[int]:
    if args.prompt is not None:
        ids = load_tokenizer(args.model).encode(args.prompt).ids
        if not ids:
            raise TinyMoeError("--prompt encodes to no tokens")
        return ids
    g = torch.Generator().manual_seed(args.seed)
    return torch.randint(0, vocab_size, (args.prompt_tokens,), generator=g).tolist()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = [n.strip() for n in args.policies.split(",") if n.strip()]
    policies = [parse_policy(n) for n in names]  # a typo fails here, before any work
    predictors = [p.predictor for p in policies if p.predictor is not None]
    if "on-demand" not in names:
        names.insert(0, "on-demand")
    if args.lookahead is not None and not predictors:
        raise TinyMoeError("--lookahead needs a policy with a predictor, e.g. prefetch+router")
    args.lookahead = args.lookahead or 1
    trace_dir = None
    if args.trace_dir:  # made now: a bad folder fails before the runs, not after them
        trace_dir = check_output_dir(args.trace_dir, "--trace-dir")
        trace_dir.mkdir(parents=True, exist_ok=True)
    device = device_from_args(args)
    check_real_link(args, device)  # --copy-share/--link-* on CUDA: refused before loading
    cfg = ModelConfig.from_file(model_dir_from_args(args) / "config.json")
    quants = [quant_from_args(args, cfg, q) for q in args.expert_quant]  # checked before loading
    ids = prompt_ids(args, cfg.vocab_size)  # before loading: the KV cache counts in what fits
    positions = check_positions(cfg, len(ids), args.max_new_tokens)
    policies = [parse_policy(n) for n in names]  # (quantized rows: beside the model's experts)
    dtype = dtype_from_args(args, device, positions, policies, beside="experts")
    model = load_model(args.model, device=device, dtype=dtype)
    calibration = load_speculation(args.model, model.cfg) if set(predictors) - {"oracle"} else None
    log = sys.stderr

    # The resident run: reference tokens (exactness) and the routing the oracle replays.
    generate(model, ids[:4], 2, eos_ids=())  # warm-up (allocator, thread pool)
    ref, recording = record_routing(model, ids, args.max_new_tokens, eos_ids=())
    for p in predictors:  # each once before any row: a missing file or bad --lookahead fails now
        make_predictor(p, model, calibration, args.lookahead, recording=recording)
    h2d_peak = link = None
    if device.type == "cuda":
        h2d_peak = measure_h2d_peak_gbps(device)
        print(f"link: the GPU's; pinned host-to-device peak {h2d_peak:.1f} GB/s", file=log)
    else:
        link = simulated_link(model, ids, args, recording)
        print(f"link: {link.gbps:.3f} GB/s, {link.latency_us} us per copy ({link.name})", file=log)
    rows = []
    for quant in quants:  # the link stays the one calibrated on the model's own experts
        with quantized_resident(model, quant) if quant else nullcontext():
            if quant is not None:  # the reference of these rows: a resident run of the same
                ref, recording = record_routing(model, ids, args.max_new_tokens, eos_ids=())
            depth = args.prefetch_depth or auto_depth(model, ref, link, h2d_peak, quant)
            print(f"exact prefetch depth ({quant or 'none'}): {depth} copies per layer", file=log)
            rows += run_rounds(
                model, names, ids, args, link, ref, recording, calibration, depth,
                args.expert_budget_gb, trace_dir, quant,
            )  # fmt: skip
    od = next(r for r in rows if r["policy"] == "on-demand")  # the first format's
    bound = eq1_bound_ms(od["tpot_ms"], od["layers"])
    resident = next((r for r in rows if r["policy"] == "resident"), None)
    for r in rows:
        r["ratio_vs_on_demand"] = r["tpot_ms"] / od["tpot_ms"]
        # TPOT over resident's per layer: with --warm and every expert in a slot, host overhead
        r["over_resident_us_per_layer"] = (
            (r["tpot_ms"] - resident["tpot_ms"]) * 1e3 / model.cfg.num_layers if resident else None
        )
        r["eq1_bound_ms"] = bound
        saving = od["tpot_ms"] - bound  # 0 when on-demand copied nothing (--warm, every slot)
        r["eq1_saving_share"] = (od["tpot_ms"] - r["tpot_ms"]) / saving if saving else None
    result = dict(
        model=args.model, prompt_tokens=len(ids), new_tokens=args.max_new_tokens,
        link_gbps=link.gbps if link else None,  # None on CUDA: the real link
        link_latency_us=link.latency_us if link else None, h2d_peak_gbps=h2d_peak,
        copy_share_target=args.copy_share, prefetch_depth=depth, repeat=args.repeat,
        warm=args.warm, threads=torch.get_num_threads(), rows=rows,
    )  # fmt: skip
    if args.json:
        print(json.dumps(result))
    else:
        print(format_table(result))
    return 0


def cli(argv: list[str] | None = None) -> int:
    return run_cli(main, argv)  # a user mistake: one `error: ...` line on stderr, exit status 2


if __name__ == "__main__":
    sys.exit(cli())
