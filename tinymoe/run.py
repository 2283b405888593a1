"""Generate text: `tinymoe run --prompt "..."` (or `python run.py ...` in a checkout).

Prints the continuation as it is generated, then the timing summary (or one JSON object with
--json). Everything a user can get wrong (flags, paths, the prompt's length, the KV cache's
size) is checked before the model loads; a mistake is one line on stderr and exit status 2.
Ctrl-C ends the text with a newline, writes the --trace so far, and exits 130.
"""

import argparse
import json
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

from tinymoe import GenerationResult, MoETransformer, TinyMoeError, generate, load_model
from tinymoe.cli import (
    OneLineParser,
    add_device_flags,
    add_link_flags,
    add_model_flag,
    check_output_file,
    check_positions,
    check_real_link,
    device_from_args,
    dtype_from_args,
    first_given,
    link_from_args,
    model_dir_from_args,
    nonnegative_int,
    positive_int,
    run_cli,
)
from tinymoe.engine.config import ModelConfig
from tinymoe.engine.timing import peak_memory_bytes
from tinymoe.engine.tokenizer import StopStrings, StreamDecoder, load_tokenizer
from tinymoe.offload.policy import BASE_POLICIES, parse_policy
from tinymoe.offload.runtime import OffloadRuntime, bare_report
from tinymoe.offload.scheduler import MISS_HANDLERS
from tinymoe.quant_flags import add_quant_flags, quant_from_args
from tinymoe.simulator.record import record_run
from tinymoe.speculation.calibration import load_speculation
from tinymoe.speculation.oracle import record_routing
from tinymoe.speculation.predictors import PREDICTOR_NAMES, check_lookahead, make_predictor

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "weights" / "pydoc-moe"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser("run", description=__doc__.splitlines()[0])
    a = p.add_argument
    add_model_flag(p, default=str(DEFAULT_MODEL))
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="text to continue")
    prompt.add_argument(
        "--prompt-file",
        metavar="FILE",
        help="read the prompt from FILE (UTF-8, used as is, a final newline too); - for stdin",
    )
    a("--max-new-tokens", type=positive_int, default=64, metavar="N", help="new tokens")
    a(
        "--allow-long",
        action="store_true",
        help="let prompt + new tokens go past the model's max_position_embeddings (a warning, "
        "not an error; text degrades there)",
    )
    samp = p.add_argument_group("sampling (greedy unless --temperature > 0)").add_argument
    samp("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy")
    samp("--top-k", type=nonnegative_int, metavar="K", help="keep the K likeliest (default: all)")
    samp("--top-p", type=float, metavar="P", help="nucleus mass in (0, 1] (default: 1)")
    samp("--seed", type=int, metavar="N", help="for reproducible sampling (default: random)")
    a(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="stop when the generated text contains TEXT (not printed); repeat for several",
    )
    add_device_flags(p)
    a(
        "--compile",
        action="store_true",
        help="decode steps via torch.compile (one graph when resident without --trace; an "
        "offloading policy cuts the step into pieces around every layer)",
    )
    a("--json", action="store_true", help="print one JSON object instead of text")
    off = p.add_argument_group("expert offloading (see docs/offloading.md)")
    off.add_argument(
        "--offload-policy",
        choices=list(BASE_POLICIES),
        help="default: resident, or on-demand when --prefetch is given",
    )
    off.add_argument(
        "--expert-slots",
        type=positive_int,
        metavar="N",
        help="device expert slots (default: per policy, see docs/offloading.md)",
    )
    off.add_argument("--expert-budget-gb", type=float, metavar="GB", help="or a budget (1e9 B)")
    add_link_flags(off)
    off.add_argument(
        "--miss-handler",
        choices=list(MISS_HANDLERS),
        default="copy",
        help="an expert in no slot: copied to the device, or computed on the host (cpu)",
    )
    add_quant_flags(off)
    off.add_argument("--trace", metavar="FILE", help="write a Perfetto/Chrome trace")
    off.add_argument(
        "--record",
        metavar="FILE",
        help="then record this prompt's routing trace for tinymoe simulate (docs/simulator.md)",
    )
    spec = p.add_argument_group("speculating experts (see docs/speculation.md)").add_argument
    spec(
        "--prefetch",
        choices=["none", *PREDICTOR_NAMES, "oracle"],
        default="none",
        help="predictor that prefetches layer l+D's experts while layer l computes; combine "
        "with --offload-policy on-demand (default then), lru or lfu",
    )
    spec("--lookahead", type=positive_int, metavar="D", help="with --prefetch (default: 1)")
    spec(
        "--prefetch-depth",
        type=positive_int,
        metavar="N",
        help="exact prefetch (no --speculate) puts at most this many guessed experts per layer on "
        "the link, so wrong guesses cannot delay the next layer's own copies much; right value: "
        "1 + expert copies the link finishes during one layer (tinymoe bench --prefetch-depth "
        "auto measures it). Default: 1",
    )
    spec(
        "--speculate",
        action="store_true",
        help="run the predicted experts with the predicted weights (lossy; the paper's mode)",
    )
    return p


def check_flags(args: argparse.Namespace) -> None:
    """The flag combinations that would otherwise be accepted and silently mean nothing."""
    if args.temperature < 0:
        raise TinyMoeError(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise TinyMoeError(f"--top-p must be in (0, 1], got {args.top_p}")
    sampling_flag = first_given(args, "--top-k", "--top-p", "--seed")
    if args.temperature == 0 and sampling_flag:
        raise TinyMoeError(f"{sampling_flag} only matters when sampling: add --temperature T > 0")
    prefetch_flag = first_given(args, "--lookahead", "--prefetch-depth")
    if args.prefetch == "none" and prefetch_flag:
        raise TinyMoeError(f"{prefetch_flag} needs a predictor: add --prefetch router (or another)")
    if any(s == "" for s in args.stop):
        raise TinyMoeError("--stop: give a non-empty text")


def sampling(args: argparse.Namespace) -> dict:
    """The sampling flags as generate()'s keyword arguments."""
    top_p = 1.0 if args.top_p is None else args.top_p
    return dict(temperature=args.temperature, top_p=top_p, top_k=args.top_k or 0, seed=args.seed)


def read_prompt(args: argparse.Namespace) -> str:
    """--prompt, or the contents of --prompt-file (stdin for `-`), as is."""
    if args.prompt_file is None:
        return args.prompt
    stdin = args.prompt_file == "-"
    name = "stdin" if stdin else args.prompt_file
    try:
        text = sys.stdin.read() if stdin else Path(name).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TinyMoeError(f"--prompt-file {name}: cannot read it as UTF-8 text ({e})") from None
    if not text:
        raise TinyMoeError(f"--prompt-file {name}: empty")
    return text


def policy_name(args: argparse.Namespace) -> str:
    """--offload-policy, --prefetch and --speculate combined into one policy name (policy.py)."""
    if args.offload_policy is None:
        args.offload_policy = "resident" if args.prefetch == "none" else "on-demand"
    if args.prefetch == "none":
        if args.speculate:
            raise TinyMoeError("--speculate needs a predictor: add --prefetch router (or another)")
        return args.offload_policy
    if args.offload_policy not in ("on-demand", "lru", "lfu"):
        raise TinyMoeError(
            f"--prefetch {args.prefetch} combines with --offload-policy on-demand, lru or lfu, "
            f"not {args.offload_policy}"
        )
    mode = "speculative" if args.speculate else "prefetch"
    cache = f"+{args.offload_policy}" if args.offload_policy in ("lru", "lfu") else ""
    return f"{mode}+{args.prefetch}{cache}"


def make_runtime(
    args: argparse.Namespace, model: MoETransformer, prompt_ids: list[int], name: str
) -> OffloadRuntime | None:
    """The runtime for policy `name`, with the predictor --prefetch names: built from the
    calibration files, or the oracle's recording. None for `resident` without --trace: the bare
    model runs, with no hook, provider or meter, so its TPOT is the model's own."""
    link = link_from_args(args)
    if link is not None and args.offload_policy == "resident":
        raise TinyMoeError("--link-* flags need an offloading --offload-policy")
    if name == "resident" and args.trace is None:
        if first_given(args, "--expert-slots", "--expert-budget-gb") or args.miss_handler != "copy":
            raise TinyMoeError(
                "--expert-slots/--expert-budget-gb/--miss-handler need an offloading policy"
            )
        return None
    kind, predictor = parse_policy(name).predictor, None
    if kind is not None:
        check_lookahead(args.lookahead, model.cfg.num_layers)  # before the oracle's recording run
        calibration = recording = None
        if kind == "oracle":
            # The oracle replays the routing of a resident run of this very prompt and settings.
            print("oracle: recording the routing of a resident run first", file=sys.stderr)
            _, recording = record_routing(model, prompt_ids, args.max_new_tokens, **sampling(args))
        else:
            calibration = load_speculation(args.model, model.cfg)
        predictor = make_predictor(kind, model, calibration, args.lookahead, recording=recording)
    return OffloadRuntime(
        model,
        name,
        predictor=predictor,
        slots=args.expert_slots,
        budget_gb=args.expert_budget_gb,
        link=link,
        trace=args.trace is not None,
        prefetch_depth=args.prefetch_depth,
        miss_handler=args.miss_handler,
        expert_quant=args.expert_quant,
        group_size=args.expert_group_size,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_flags(args)
    name = policy_name(args)
    args.lookahead = args.lookahead or 1
    args.prefetch_depth = args.prefetch_depth or 1
    if args.trace:
        check_output_file(args.trace, "--trace")
    if args.record:
        check_output_file(args.record, "--record")
        if args.temperature > 0:
            raise TinyMoeError("--record replays an exact run: use greedy decoding")
    device = device_from_args(args)
    if args.record:  # on CUDA it records over the real link: refused now, not after generating
        check_real_link(args, device)
    model_dir_from_args(args)
    prompt = read_prompt(args)
    policy = parse_policy(name)
    tokenizer = load_tokenizer(args.model)
    prompt_ids = tokenizer.encode(prompt).ids
    if not prompt_ids:
        raise TinyMoeError("the prompt encodes to no tokens; give some text")
    # The sequence, and what it needs in memory in which dtype: from config.json alone, before
    # any weight is read (dtype_from_args; "auto" on a CPU is float32 only where that fits).
    cfg = ModelConfig.from_file(Path(args.model) / "config.json")
    positions = check_positions(cfg, len(prompt_ids), args.max_new_tokens, args.allow_long)
    quant = quant_from_args(args, cfg)  # --expert-quant: checked before loading
    # Offloading on a GPU, or quantized: read the experts straight into (pinned) host memory,
    # so they never have to fit on the device, nor exist in the model's dtype. The oracle is the
    # exception: it first records a resident run.
    to_host = (device.type == "cuda" or quant is not None) and policy.offload
    to_host = to_host and policy.predictor != "oracle"
    dtype = dtype_from_args(args, device, positions, [policy], experts_on_host=to_host)
    model = load_model(
        args.model, device=device, dtype=dtype, expert_device="cpu" if to_host else None,
        expert_quant=args.expert_quant, group_size=args.expert_group_size,
    )  # fmt: skip
    runtime = make_runtime(args, model, prompt_ids, name)
    stream, stops = StreamDecoder(tokenizer), StopStrings(args.stop)

    def on_token(token: int) -> bool:
        """Print the new text (text mode); True, which ends generation, at a stop string."""
        piece = stops.push(stream.push(token))
        if not args.json:
            print(piece, end="", flush=True)
        return stops.matched is not None

    if not args.json:
        print(prompt, end="", flush=True)
    with runtime or nullcontext():
        try:
            out = generate(model, prompt_ids, args.max_new_tokens, **sampling(args),
                           on_token=on_token, compile=args.compile)  # fmt: skip
        except KeyboardInterrupt:
            if not args.json:
                print(flush=True)  # the interrupted text still ends its line
            if runtime and args.trace:  # what ran so far is worth seeing: the trace is why
                runtime.write_trace(args.trace)
                print(f"wrote the trace so far to {args.trace}", file=sys.stderr)
            raise
        # decode and prefill measured separately (None: the bare model, nothing to report)
        report = runtime.report() if runtime else None
        if runtime and args.trace:
            runtime.write_trace(args.trace)
    if not args.json:
        print(stops.flush(), end="")  # text held back as a possible stop string that was not
    print_result(args, tokenizer.decode(out.tokens), out, report, stops.matched, device)
    if args.record:
        predictors = [policy.predictor] if policy.predictor is not None else []
        link = link_from_args(args)  # None: the default preset, or on CUDA the real link
        trace = record_run(model, prompt_ids, len(out.tokens), link, predictors, args.model,
                           args.lookahead)  # fmt: skip
        trace.save(args.record)
        print(f"wrote the routing trace to {args.record}", file=sys.stderr)
    return 0


def print_result(
    args: argparse.Namespace,
    text: str,
    out: GenerationResult,
    report: dict | None,
    stop: str | None,
    device: torch.device,
) -> None:
    """The timing summary on stderr (text mode), or everything as one JSON object. report: the
    runtime's; None for the bare model (resident, nothing copied, layers not timed)."""
    report = report or bare_report(0)  # (no layers: run.py prints no per-layer table for it)
    tpot, dec, pre = out.tpot_ms, report["decode"], report["prefill"]
    stats = {
        "prompt_tokens": out.prompt_len,
        "new_tokens": len(out.tokens),
        "ttft_ms": out.ttft_s * 1e3,
        "tpot_ms": tpot["mean"],
        "tpot_p50_ms": tpot["p50"],
        "tpot_p90_ms": tpot["p90"],
        "tokens_per_s": out.tokens_per_s,
        "peak_memory_mb": peak_memory_bytes(device) / 2**20,
        "compile_s": out.compile_s,  # --compile: the first decode step, kept out of TPOT
        "offload_policy": report["policy"],
        "expert_slots": report["expert_slots"],
        "expert_quant": args.expert_quant,
        "hit_rate": dec["hit_rate"] if dec["hits"] + dec["misses"] else None,  # None: bare
        "bytes_copied": dec["bytes_copied"],  # decode steps, in total
        "stall_ms": dec["stall_ms"],  # per decode step, as tpot_ms
        "copy_ms": dec["copy_ms"],
        "miss_kinds": dec["miss_kinds"],
        "wasted_prefetch_bytes": dec["wasted_prefetch_bytes"],
        # per layer: ms per decode step; hits, misses, bytes in total (None: not timed per layer)
        "layers": dec["layers"] or None,
        "prefill": {k: pre[k] for k in ("copy_ms", "stall_ms", "bytes_copied", "hits", "misses")},
    }
    if args.json:
        if stop is not None:
            text = text[: text.find(stop)]
        print(json.dumps({"text": text, "tokens": out.tokens, "stop": stop, **stats}))
        return
    print("\n")
    print(
        f"prompt {stats['prompt_tokens']} tokens | TTFT {stats['ttft_ms']:.1f} ms | "
        f"TPOT mean {tpot['mean']:.2f} ms, p50 {tpot['p50']:.2f}, p90 {tpot['p90']:.2f} "
        f"({len(out.step_s)} decode steps) | {stats['tokens_per_s']:.1f} tokens/s | "
        f"peak memory {stats['peak_memory_mb']:.0f} MiB"
        + (f" | compiled in {out.compile_s:.1f} s (first step)" if out.compile_s else ""),
        file=sys.stderr,
    )
    if args.offload_policy != "resident":
        print(
            f"offload {report['policy']}, {report['expert_slots']} slots | decode: hit rate "
            f"{dec['hit_rate']:.2f}, {dec['bytes_copied'] / 1e6:.1f} MB copied, stall "
            f"{dec['stall_ms']:.2f} ms/token"
            + ("" if (fb := report.get("fallback_share")) is None else f", {fb:.0%} fell back")
            + f" | prefill: {pre['bytes_copied'] / 1e6:.1f} MB copied in {pre['copy_ms']:.1f} ms"
            + f"\n{format_layers(dec)}",
            file=sys.stderr,
        )


def format_layers(summary: dict) -> str:
    """A per-layer table of a PhaseStats.summary(), for people."""
    lines = [
        f"{'layer':>5} {'compute ms':>10} {'copy ms':>8} {'stall ms':>8} {'hits':>6} {'misses':>6}"
    ]
    for i, s in enumerate(summary["layers"]):
        lines.append(
            f"{i:>5} {s['compute_ms']:>10.3f} {s['copy_ms']:>8.3f} {s['stall_ms']:>8.3f} "
            f"{s['hits']:>6} {s['misses']:>6}"
        )
    return "\n".join(lines)


def cli(argv: list[str] | None = None) -> int:
    return run_cli(main, argv)  # a user mistake: one `error: ...` line on stderr, exit status 2


if __name__ == "__main__":
    sys.exit(cli())
