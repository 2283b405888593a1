"""Benchmark: what a predictor costs per decode layer, side by side, on the demo model.

    .venv/bin/python tests/bench_predictor_cost.py [--predictors router,context,preattention]
        [--repeat 5] [--new-tokens 300] [--prompt-tokens 32] [--threads 1] [--reference]

Each predictor's `observe` (what a speculative decode step calls after every layer: the guess
with its weights, the one the hook may route with) is timed inside real decode steps of the
demo model: a PredictionHook in speculative mode on the resident model, a prompt prefilled,
then `--new-tokens` decode steps teacher-forced on a fixed token sequence (the same for every
predictor). The figure per predictor is the mean of its observe calls at N = 1 in us, best of
`--repeat` rounds; the predictors take turns within each round, so a slow spell of a shared
machine hits them alike, and the ratio to the router's figure of the same round is printed.
The issue's limit: at most 2x the router predictor's. `--reference` times the pre-attention
predictor's definition (observe_reference) instead of its one-token fast path (DecodeStep).
"""

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tinymoe import load_model  # noqa: E402
from tinymoe.engine.generate import decode_one_token, prefill  # noqa: E402
from tinymoe.engine.kvcache import KVCache  # noqa: E402
from tinymoe.speculation.calibration import load_speculation  # noqa: E402
from tinymoe.speculation.hook import PredictionHook  # noqa: E402
from tinymoe.speculation.predictors import make_predictor  # noqa: E402


def timed_round(model, predictor, tokens: list[int], prompt_len: int) -> float:
    """Mean us of predictor.observe over the decode steps of `tokens` (N = 1 calls only)."""
    spent: list[float] = []
    inner = predictor.observe

    def observe(layer, resid, u, routing):
        t0 = time.perf_counter()
        out = inner(layer, resid, u, routing)
        if u.shape[0] == 1:
            spent.append(time.perf_counter() - t0)
        return out

    predictor.observe = observe
    hook = PredictionHook(predictor, speculate=True)
    model.route_hook = hook
    try:
        hook.reset()
        cfg, p = model.cfg, model.embed_tokens.weight
        cache = KVCache(cfg.num_layers, 1, cfg.num_kv_heads, len(tokens), cfg.head_dim,
                        p.device, p.dtype)  # fmt: skip
        with torch.no_grad():
            hook.phase = "prefill"
            prefill(model, torch.tensor([tokens[:prompt_len]]), cache)
            spent.clear()
            hook.phase = "decode"
            for pos in range(prompt_len, len(tokens)):
                decode_one_token(model, torch.tensor([[tokens[pos]]]), cache, pos)
    finally:
        model.route_hook = None
        predictor.observe = inner
    return 1e6 * sum(spent) / len(spent)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(ROOT / "weights" / "pydoc-moe"))
    ap.add_argument("--predictors", default="router,context,preattention")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=300)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reference", action="store_true", help="preattention without its fast path")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model, device="cpu")
    cal = load_speculation(args.model, model.cfg)
    names = args.predictors.split(",")
    predictors = {n: make_predictor(n, model, cal, 1) for n in names}
    for p in predictors.values():
        if args.reference and hasattr(p, "fast_decode"):
            p.fast_decode = False
    g = torch.Generator().manual_seed(0)
    n = args.prompt_tokens + args.new_tokens
    tokens = torch.randint(1, model.cfg.vocab_size, (n,), generator=g).tolist()
    best = {name: float("inf") for name in names}
    for r in range(args.repeat):
        order = names if r % 2 == 0 else names[::-1]
        us = {name: timed_round(model, predictors[name], tokens, args.prompt_tokens)
              for name in order}  # fmt: skip
        line = "  ".join(f"{k} {v:.1f}" for k, v in us.items())
        print(f"round {r + 1}: {line} us", file=sys.stderr)
        best = {k: min(best[k], us[k]) for k in names}
    base = best.get("router")
    print(f"observe per decode layer, best of {args.repeat} x {args.new_tokens} steps, "
          f"{args.threads} thread(s):")  # fmt: skip
    for name in names:
        ratio = f"  {best[name] / base:.2f}x router" if base else ""
        print(f"  {name:<14} {best[name]:7.1f} us{ratio}")


if __name__ == "__main__":
    main()
