"""Generate text with tinymoe: `python run.py --model DIR --prompt "..."`.

Prints the continuation as it is generated, then the timing summary (or one JSON object with
--json). User mistakes end with one line on stderr and exit status 2, never a traceback.
"""

import argparse
import json
import sys
from pathlib import Path

from tinymoe import MoETransformer, TinyMoeError, generate, load_model
from tinymoe.cli import (
    OneLineParser,
    add_device_flags,
    add_link_flags,
    add_model_flag,
    device_from_args,
    link_from_args,
    model_dir_from_args,
    positive_int,
    run_cli,
)
from tinymoe.engine.timing import peak_memory_bytes
from tinymoe.engine.tokenizer import StreamDecoder, load_tokenizer
from tinymoe.offload.meter import format_layers
from tinymoe.offload.policy import BASE_POLICIES, parse_policy
from tinymoe.offload.runtime import OffloadRuntime
from tinymoe.speculation.calibration import load_speculation
from tinymoe.speculation.oracle import record_routing
from tinymoe.speculation.predictors import (
    PREDICTOR_NAMES,
    Predictor,
    check_lookahead,
    make_predictor,
)

DEFAULT_MODEL = Path(__file__).resolve().parent / "weights" / "pydoc-moe"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description=__doc__.splitlines()[0])
    add_model_flag(p, default=str(DEFAULT_MODEL))
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1]")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    add_device_flags(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    off = p.add_argument_group("expert offloading (see docs/offloading.md)")
    off.add_argument(
        "--offload-policy",
        choices=list(BASE_POLICIES),
        default=None,
        help="default: resident, or on-demand when --prefetch is given",
    )
    off.add_argument(
        "--expert-slots",
        type=positive_int,
        default=None,
        help="device expert slots (default: per policy)",
    )
    off.add_argument(
        "--expert-budget-gb", type=float, default=None, help="or a budget in GB (1e9 B)"
    )
    add_link_flags(off)
    off.add_argument("--trace", default=None, metavar="FILE", help="write a Perfetto/Chrome trace")
    spec = p.add_argument_group("speculating experts (see docs/speculation.md)")
    spec.add_argument(
        "--prefetch",
        choices=["none", *PREDICTOR_NAMES, "oracle"],
        default="none",
        help="predictor that prefetches layer l+D's experts while layer l computes; combine "
        "with --offload-policy on-demand (default then), lru or lfu",
    )
    spec.add_argument("--lookahead", type=positive_int, default=1, help="D (default 1)")
    spec.add_argument(
        "--prefetch-depth",
        type=positive_int,
        default=1,
        help="exact prefetch (no --speculate) puts at most this many guessed experts per layer on "
        "the link, so wrong guesses cannot delay the next layer's own copies much; right value: "
        "1 + expert copies the link finishes during one layer (tinymoe.bench --prefetch-depth "
        "auto measures it). Default 1",
    )
    spec.add_argument(
        "--speculate",
        action="store_true",
        help="run the predicted experts with the predicted weights (lossy; the paper's mode)",
    )
    return p


def sampling(args: argparse.Namespace) -> dict:
    """The sampling flags as generate()'s keyword arguments."""
    return {"temperature": args.temperature, "top_p": args.top_p, "seed": args.seed}


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


def predictor_for(
    args: argparse.Namespace, model: MoETransformer, prompt_ids: list[int], name: str
) -> Predictor:
    """--prefetch's predictor: built from the calibration files, or the oracle's recording."""
    check_lookahead(args.lookahead, model.cfg.num_layers)  # before the oracle's recording run
    calibration = recording = None
    if name == "oracle":
        # The oracle replays the routing of a resident run of this very prompt and settings.
        print("oracle: recording the routing of a resident run first", file=sys.stderr)
        _, recording = record_routing(model, prompt_ids, args.max_new_tokens, **sampling(args))
    else:
        calibration = load_speculation(args.model, model.cfg)
    return make_predictor(
        name,
        model,
        calibration,
        args.lookahead,
        recording=recording,
        weights=args.speculate,  # exact prefetch never uses a guess's weights
    )


def make_runtime(
    args: argparse.Namespace, model: MoETransformer, prompt_ids: list[int], name: str
) -> OffloadRuntime:
    """The runtime for policy `name` (`resident` too: it is what measures layers)."""
    link = link_from_args(args)
    if link is not None and args.offload_policy == "resident":
        raise TinyMoeError("--link-* flags need an offloading --offload-policy")
    predictor_name = parse_policy(name).predictor
    predictor = None
    if predictor_name is not None:
        predictor = predictor_for(args, model, prompt_ids, predictor_name)
    return OffloadRuntime(
        model,
        name,
        predictor=predictor,
        slots=args.expert_slots,
        budget_gb=args.expert_budget_gb,
        link=link,
        trace=args.trace is not None,
        prefetch_depth=args.prefetch_depth,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.temperature < 0:
        raise TinyMoeError(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise TinyMoeError(f"--top-p must be in (0, 1], got {args.top_p}")
    device = device_from_args(args)
    model_dir_from_args(args)
    name = policy_name(args)
    policy = parse_policy(name)
    # Offloading on a GPU: read the experts straight into pinned host memory, so they never
    # have to fit on the device. The oracle is the exception: it first records a resident run.
    to_host = device.type == "cuda" and policy.offload and policy.predictor != "oracle"
    tokenizer = load_tokenizer(args.model)
    model = load_model(
        args.model, device=device, dtype=args.dtype, expert_device="cpu" if to_host else None
    )
    prompt_ids = tokenizer.encode(args.prompt).ids
    if not prompt_ids:
        raise TinyMoeError("--prompt encodes to no tokens; give some text")

    runtime = make_runtime(args, model, prompt_ids, name)
    stream = StreamDecoder(tokenizer)
    on_token = None
    if not args.json:
        print(args.prompt, end="", flush=True)
        on_token = lambda t: print(stream.push(t), end="", flush=True)  # noqa: E731
    with runtime:
        out = generate(model, prompt_ids, args.max_new_tokens, **sampling(args), on_token=on_token)
        report = runtime.report()  # decode and prefill measured separately
        if args.trace:
            runtime.write_trace(args.trace)
    tpot = out.tpot_ms
    stats = {
        "prompt_tokens": out.prompt_len,
        "new_tokens": len(out.tokens),
        "ttft_ms": out.ttft_s * 1e3,
        "tpot_ms": tpot["mean"],
        "tpot_p50_ms": tpot["p50"],
        "tpot_p90_ms": tpot["p90"],
        "tokens_per_s": out.tokens_per_s,
        "peak_memory_mb": peak_memory_bytes(device) / 2**20,
    }
    dec, pre = report["decode"], report["prefill"]
    stats.update(
        offload_policy=report["policy"],
        expert_slots=report["expert_slots"],
        hit_rate=dec["hit_rate"] if dec["steps"] else None,
        bytes_copied=dec["bytes_copied"],  # decode steps, in total
        stall_ms=dec["stall_ms"],  # per decode step, as tpot_ms
        copy_ms=dec["copy_ms"],
        miss_kinds=dec["miss_kinds"],
        wasted_prefetch_bytes=dec["wasted_prefetch_bytes"],
        layers=dec["layers"],  # per layer: ms per decode step; hits, misses, bytes in total
        prefill={k: pre[k] for k in ("copy_ms", "stall_ms", "bytes_copied", "hits", "misses")},
    )
    if args.json:
        print(json.dumps({"text": tokenizer.decode(out.tokens), "tokens": out.tokens, **stats}))
    else:
        print("\n")
        print(
            f"prompt {stats['prompt_tokens']} tokens | TTFT {stats['ttft_ms']:.1f} ms | "
            f"TPOT mean {tpot['mean']:.2f} ms, p50 {tpot['p50']:.2f}, p90 {tpot['p90']:.2f} "
            f"({len(out.step_s)} decode steps) | {stats['tokens_per_s']:.1f} tokens/s | "
            f"peak memory {stats['peak_memory_mb']:.0f} MiB",
            file=sys.stderr,
        )
        if args.offload_policy != "resident":
            print(
                f"offload {report['policy']}, {report['expert_slots']} slots | decode: hit rate "
                f"{dec['hit_rate']:.2f}, {dec['bytes_copied'] / 1e6:.1f} MB copied, stall "
                f"{dec['stall_ms']:.2f} ms/token | prefill: {pre['bytes_copied'] / 1e6:.1f} MB "
                f"copied in {pre['copy_ms']:.1f} ms\n{format_layers(dec)}",
                file=sys.stderr,
            )
    return 0


def cli(argv: list[str] | None = None) -> int:
    """main(), with a user mistake turned into one `error: ...` line on stderr and exit status 2."""
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
