"""Measure the predictors on held-out text: `python -m tinymoe.evaluate --model DIR --text FILE`.

Two questions, each answered per predictor and lookahead d, with resident experts:

1. How often is the prediction right? (exact mode, teacher-forced.) The true router decides every
   layer; every predictor observes every layer and its guess for layer t is scored when layer t's
   true routing exists: recall@k (the share of the true top-K found in the predicted top-K) and
   top-1 hit rate (the predicted highest-weight expert is the true highest-weight one), per
   layer. A missing prediction (previous-token on a sequence's first token) scores 0.
   `router-hidden` is the router applied to Norm_t(h_l), the true post-MoE hidden state: the
   reference that shows what default vectors can at best recover.
2. What does speculative execution cost? Every layer t >= d runs the predicted experts with the
   predicted weights (PredictionHook(speculate=True)); we report held-out perplexity, top-1
   next-token agreement with exact mode and the mean KL(exact || speculative) of the next-token
   distributions.

Tokens are fed one position at a time with a KV cache (B held-out sequences side by side), which
is exactly what decoding does; this is what makes `previous-token` meaningful.
"""

import argparse
import json
import math
import sys

import torch
import torch.nn.functional as F
from torch import Tensor

from tinymoe.cli import (
    OneLineParser,
    add_device_flags,
    add_model_flag,
    device_from_args,
    lookahead_list,
    model_dir_from_args,
    run_cli,
)
from tinymoe.corpus import read_token_ids
from tinymoe.engine.kvcache import KVCache
from tinymoe.engine.loader import load_model
from tinymoe.engine.model import MoETransformer, Routing, moe_forward
from tinymoe.errors import TinyMoeError
from tinymoe.progress import Progress
from tinymoe.speculation.calibration import Calibration, load_speculation
from tinymoe.speculation.hook import PredictionHook
from tinymoe.speculation.predictors import (
    PREDICTOR_NAMES,
    Predictor,
    RouterPredictor,
    make_predictor,
    recall_at_k,
)

HIDDEN = "router-hidden"  # router on the true post-MoE state: scored, never speculated with
ALL_NAMES = (*PREDICTOR_NAMES[:2], HIDDEN, *PREDICTOR_NAMES[2:])
NEEDS_CALIBRATION = ("estimator", "linear-estimator", "hybrid")


class ScoringHook:
    """Exact-mode route hook that runs many predictors side by side and scores their guesses.

    predictors: (name, lookahead) -> Predictor. Names in `on_hidden` are fed h_l = r_l + MoE_l(u)
    in place of r_l; h_l is computed here with the model's own moe_forward, so it is bit-identical
    to the state the next layer receives.
    """

    def __init__(
        self, model: MoETransformer, predictors: dict[tuple[str, int], Predictor], on_hidden: set
    ) -> None:
        L, device = model.cfg.num_layers, model.embed_tokens.weight.device
        self.model, self.predictors, self.on_hidden = model, predictors, on_hidden
        self.pending: dict[tuple[str, int], dict[int, Routing]] = {k: {} for k in predictors}
        # Running sums on the device, read once at the end: scoring adds no host syncs.
        self.recall = {k: torch.zeros(L, dtype=torch.float64, device=device) for k in predictors}
        self.top1 = {k: torch.zeros(L, dtype=torch.float64, device=device) for k in predictors}
        self.tokens = torch.zeros(L, dtype=torch.long)  # tokens scored at each layer

    def reset(self) -> None:
        for key, p in self.predictors.items():
            p.reset()
            self.pending[key].clear()

    @torch.no_grad()
    def __call__(self, layer: int, resid: Tensor, u: Tensor, router) -> Routing:
        true = router(u)
        self.tokens[layer] += u.shape[0]
        for key in self.predictors:
            guess = self.pending[key].pop(layer, None)
            if guess is not None:
                self.recall[key][layer] += recall_at_k(guess.ids, true.ids).sum()
                self.top1[key][layer] += (guess.ids[:, 0] == true.ids[:, 0]).sum()
        resid = resid.reshape(u.shape)  # (N, D)
        hidden = None
        if self.on_hidden:
            cfg = self.model.cfg
            hidden = resid + moe_forward(u, true, self.model.provider, layer, cfg.expert_dim)
        for key, p in self.predictors.items():
            state = hidden if key[0] in self.on_hidden else resid
            nxt = p.observe(layer, state, u, true)
            if nxt is not None:
                self.pending[key][layer + p.lookahead] = nxt
        return true

    def rates(self) -> dict[str, dict[str, dict]]:
        """{name: {d: {recall, top1 (per layer; None where nothing is predicted), their means}}}"""
        out: dict[str, dict[str, dict]] = {}
        for name, d in self.predictors:
            n = self.tokens.clamp(min=1).double()
            # SYNC: reading the sums back, once per predictor, after the run.
            recall = [None] * d + (self.recall[(name, d)].cpu() / n)[d:].tolist()
            top1 = [None] * d + (self.top1[(name, d)].cpu() / n)[d:].tolist()
            out.setdefault(name, {})[str(d)] = {
                "recall": recall,
                "top1": top1,
                "mean_recall": sum(recall[d:]) / len(recall[d:]),
                "mean_top1": sum(top1[d:]) / len(top1[d:]),
            }
        return out


@torch.no_grad()
def teacher_forced(model: MoETransformer, ids: Tensor, hook, desc: str) -> Tensor:
    """Feed ids (B, T) one position at a time through a KV cache; return logits (B, T, V)."""
    cfg = model.cfg
    B, T = ids.shape
    p = model.embed_tokens.weight
    ids = ids.to(p.device)
    cache = KVCache(cfg.num_layers, B, cfg.num_kv_heads, T, cfg.head_dim, p.device, p.dtype)
    logits = torch.empty(B, T, cfg.vocab_size, dtype=torch.float32, device=p.device)
    previous_hook, model.route_hook = model.route_hook, hook
    if hook is not None:
        hook.reset()
    bar = Progress(T, desc=desc)
    try:
        for i in range(T):
            logits[:, i] = model(ids[:, i : i + 1], cache=cache, start=i)[:, -1].float()
            bar.update()
    finally:
        model.route_hook = previous_hook
        bar.close()
    return logits


def perplexity(logits: Tensor, ids: Tensor) -> float:
    """exp(mean NLL) of ids[:, 1:] given logits[:, :-1]."""
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten().to(logits.device))
    return math.exp(nll.item())


def compare(exact: Tensor, spec: Tensor, ids: Tensor) -> dict[str, float]:
    """Perplexity of the speculative logits, and how far they are from the exact ones."""
    log_p = F.log_softmax(exact, dim=-1)  # (B, T, V)
    log_q = F.log_softmax(spec, dim=-1)  # (B, T, V)
    return {
        "perplexity": perplexity(spec, ids),
        "top1_agreement": (exact.argmax(-1) == spec.argmax(-1)).float().mean().item(),
        "kl": (log_p.exp() * (log_p - log_q)).sum(-1).mean().item(),
    }


def build(name: str, model: MoETransformer, cal: Calibration | None, d: int) -> Predictor:
    if name == HIDDEN:  # Norm_t(h_l) is routed as is: no default vectors on top of the truth
        return RouterPredictor(model, None, d)
    return make_predictor(name, model, cal, d)


def evaluate(
    model: MoETransformer,
    ids: Tensor,
    calibration: Calibration | None,
    names: list[str],
    lookaheads: tuple[int, ...],
    speculative: bool = True,
) -> dict:
    """Both measurements of the module docstring; returns the dict that --json prints."""
    predictors = {(n, d): build(n, model, calibration, d) for n in names for d in lookaheads}
    scoring = ScoringHook(model, predictors, on_hidden={HIDDEN} & set(names))
    exact = teacher_forced(model, ids, scoring, "exact run, scoring")
    result = {
        "tokens": int(ids.numel()),
        "sequences": int(ids.shape[0]),
        "seq_len": int(ids.shape[1]),
        "lookaheads": list(lookaheads),
        "hit_rates": scoring.rates(),
        "speculative": {"exact": {"perplexity": perplexity(exact, ids)}},
    }
    if not speculative:
        return result
    for name in names:
        if name == HIDDEN:
            continue  # h_l exists only after layer l's experts ran: nothing to speculate with
        for d in lookaheads:
            hook = PredictionHook(predictors[(name, d)], speculate=True)  # reset() before use
            spec = teacher_forced(model, ids, hook, f"speculative {name} d={d}")
            result["speculative"].setdefault(name, {})[str(d)] = compare(exact, spec, ids)
    return result


# ---------------------------------------------------------------- reporting


def table(result: dict) -> str:
    lines = []
    rates = result["hit_rates"]
    for d in map(str, result["lookaheads"]):
        some = next(iter(rates.values()))[d]["recall"]
        layers = [t for t, v in enumerate(some) if v is not None]
        for metric, title in (("recall", "recall@k"), ("top1", "top-1 hit rate")):
            lines.append(f"\n{title} per predicted layer, lookahead {d} (teacher-forced, exact)")
            lines.append(f"{'predictor':<18}" + "".join(f"{'L' + str(t):>7}" for t in layers))
            for name, by_d in rates.items():
                row = by_d[d][metric]
                mean = by_d[d][f"mean_{metric}"]
                cells = "".join(f"{row[t]:>7.3f}" for t in layers)
                lines.append(f"{name:<18}{cells}   mean {mean:.3f}")
    spec = result["speculative"]
    lines.append("\nspeculative execution: every layer >= d runs the predicted experts")
    lines.append(f"{'predictor':<18}{'d':>3}{'perplexity':>12}{'top-1 agree':>13}{'KL':>10}")
    lines.append(f"{'exact':<18}{'-':>3}{spec['exact']['perplexity']:>12.3f}{1:>13.3f}{0:>10.4f}")
    for name, by_d in spec.items():
        if name == "exact":
            continue
        for d, m in by_d.items():
            lines.append(
                f"{name:<18}{d:>3}{m['perplexity']:>12.3f}{m['top1_agreement']:>13.3f}"
                f"{m['kl']:>10.4f}"
            )
    return "\n".join(lines).lstrip("\n")


def plot(result: dict, path: str) -> None:
    """Recall@k per layer, one panel per lookahead. matplotlib is optional: imported here."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise TinyMoeError(
            "--plot needs matplotlib, which is not installed: pip install 'tinymoe[plot]'"
        ) from None
    ds = [str(d) for d in result["lookaheads"]]
    fig, axes = plt.subplots(1, len(ds), figsize=(5 * len(ds), 4), squeeze=False, sharey=True)
    for ax, d in zip(axes[0], ds, strict=True):
        for name, by_d in result["hit_rates"].items():
            recall = by_d[d]["recall"]
            layers = [t for t, v in enumerate(recall) if v is not None]
            ax.plot(layers, [recall[t] for t in layers], marker="o", label=name)
        ax.set(title=f"lookahead {d}", xlabel="predicted layer", ylim=(0, 1.02), xticks=layers)
    axes[0][0].set_ylabel("recall@k")
    axes[0][-1].legend(fontsize="small")
    fig.tight_layout()
    try:
        fig.savefig(path)
    except OSError as e:
        raise TinyMoeError(f"--plot {path}: cannot write ({e})") from None


def predictor_list(s: str) -> list[str]:
    names = [n.strip() for n in s.split(",") if n.strip()]
    bad = [n for n in names if n not in ALL_NAMES]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown predictor {bad[0] if bad else s!r}; expected some of {', '.join(ALL_NAMES)}"
        )
    return names


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser("evaluate", description=__doc__.splitlines()[0])
    a = p.add_argument
    add_model_flag(p)
    a("--text", required=True, help="held-out UTF-8 text (not what calibration saw)")
    a("--calibration", default=None, help="folder with speculation.* files (default: --model)")
    a("--predictors", type=predictor_list, default=None, help="default: all that are available")
    a("--lookahead", type=lookahead_list, default=None, help="e.g. 1 or 1,2 (default: 1,2,3)")
    a("--tokens", type=int, default=4096, help="held-out tokens read from --text")
    a("--seq-len", type=int, default=256, help="tokens per held-out sequence")
    a("--skip-speculative", action="store_true", help="hit rates only")
    a("--json", action="store_true", help="print one JSON object instead of tables")
    a("--plot", default=None, metavar="FILE", help="save recall@k per layer (needs matplotlib)")
    add_device_flags(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = device_from_args(args)
    model_dir_from_args(args)
    ids = read_token_ids(args.model, args.text, args.tokens, args.seq_len)
    model = load_model(args.model, device=device, dtype=args.dtype)
    L = model.cfg.num_layers
    lookaheads = args.lookahead or tuple(d for d in (1, 2, 3) if d < L)
    for d in lookaheads:
        if d >= L:
            raise TinyMoeError(f"--lookahead {d}: must be below the number of layers ({L})")
    cal = load_speculation(args.calibration or args.model, model.cfg)
    names = args.predictors
    if names is None:  # everything this checkpoint can run; the learned ones need calibration
        names = [n for n in ALL_NAMES if cal is not None or n not in NEEDS_CALIBRATION]
        if cal is None:
            print(
                "evaluate: no speculation calibration found; skipping the learned predictors "
                "(run `python -m tinymoe.calibrate` first)",
                file=sys.stderr,
            )
    result = evaluate(model, ids, cal, names, lookaheads, not args.skip_speculative)
    result.update(model=str(args.model), text=str(args.text))
    if args.plot:
        plot(result, args.plot)
    print(json.dumps(result) if args.json else table(result))
    return 0


def cli(argv: list[str] | None = None) -> int:
    """main(), with a user mistake turned into one `error: ...` line on stderr and exit status 2."""
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
