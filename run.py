"""Generate text with tinymoe: `python run.py --model DIR --prompt "..."`.

Prints the continuation as it is generated, then the timing summary (or one JSON object with
--json). User mistakes end with one line on stderr and exit status 2, never a traceback.
"""

import argparse
import json
import sys

import torch

from tinymoe import TinyMoeError, generate, load_model
from tinymoe.loader import DTYPES
from tinymoe.timing import peak_memory_bytes
from tinymoe.tokenizer import StreamDecoder, load_tokenizer


def positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model",
        required=True,
        help="checkpoint directory (config.json, safetensors, tokenizer.json)",
    )
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1]")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    p.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.temperature < 0:
        raise TinyMoeError(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise TinyMoeError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise TinyMoeError("--device cuda: no CUDA device is available; use --device cpu")
    device = torch.device(args.device)
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, device=device, dtype=args.dtype)
    prompt_ids = tokenizer.encode(args.prompt).ids
    if not prompt_ids:
        raise TinyMoeError("--prompt encodes to no tokens; give some text")

    stream = StreamDecoder(tokenizer)
    on_token = None
    if not args.json:
        print(args.prompt, end="", flush=True)
        on_token = lambda t: print(stream.push(t), end="", flush=True)  # noqa: E731
    out = generate(
        model,
        prompt_ids,
        args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        on_token=on_token,
    )
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
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except TinyMoeError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
