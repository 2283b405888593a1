"""Measure the predictors on held-out text: `tinymoe evaluate --model DIR --text FILE`.

Two questions, each answered per predictor and lookahead d, with resident experts, on
teacher-forced text (every position sees the true tokens before it, as in decoding):

1. How often is the prediction right? (exact mode) The true router decides every layer; each
   guess for layer t is scored against layer t's true routing: recall@k and top-1 hit rate per
   layer (docs/speculation.md defines both; a missing guess scores 0). `router-hidden` is the
   router applied to Norm_t(h_l), the true post-MoE hidden state: the reference that shows what
   default vectors can at best recover.
2. What does speculative execution cost? Every layer t >= d runs the predicted experts with the
   predicted weights (PredictionHook(speculate=True)), at every position: held-out perplexity,
   top-1 next-token agreement with exact mode, and the mean KL(exact || speculative).

How it runs. The definition is decoding: one position at a time through a KV cache (what
`--stepwise` does). The default runs one forward per window of --seq-len tokens instead, which
computes the same numbers because all a predictor or the speculating hook does is causal per
position; previous-token, which reads the previous position, is then a shift by one position
(FirstPositionHook when speculating). docs/speculation.md ("One forward per window") gives the
argument and why; tests/test_evaluate.py checks both ways agree.
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
    check_output_file,
    device_from_args,
    dtype_from_args,
    lookahead_list,
    model_dir_from_args,
    positive_int,
    run_cli,
)
from tinymoe.corpus import fewer_tokens, read_token_ids
from tinymoe.engine.config import ModelConfig
from tinymoe.engine.loader import load_model
from tinymoe.engine.model import MoETransformer
from tinymoe.errors import TinyMoeError
from tinymoe.plot import pyplot
from tinymoe.progress import Progress
from tinymoe.quant_flags import add_quant_flags, quant_from_args
from tinymoe.speculation.calibration import Calibration, load_speculation
from tinymoe.speculation.hook import PredictionHook
from tinymoe.speculation.predictors import (
    PREDICTOR_NAMES,
    Predictor,
    RouterPredictor,
    make_predictor,
)
from tinymoe.speculation.scoring import FirstPositionHook, ScoringHook, forward_logits

HIDDEN = "router-hidden"  # router on the true post-MoE state: scored, never speculated with
PREVIOUS = "previous-token"  # the one predictor that reads another position
ALL_NAMES = (*PREDICTOR_NAMES[:2], HIDDEN, *PREDICTOR_NAMES[2:])
NEEDS_CALIBRATION = ("estimator", "linear-estimator", "hybrid", "context", "preattention")


def next_token_nll(logits: Tensor, ids: Tensor) -> Tensor:
    """Summed NLL of ids[:, 1:] given logits[:, :-1]: B * (T - 1) predictions."""
    targets = ids[:, 1:].flatten().to(logits.device)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), targets, reduction="sum")


def compare_sums(log_p: Tensor, spec: Tensor, ids: Tensor) -> Tensor:
    """(NLL, top-1 agreements, KL(exact || spec)) summed over a batch; log_p: exact log-probs."""
    log_q = F.log_softmax(spec, dim=-1)  # (B, T, V)
    agree = (log_p.argmax(-1) == log_q.argmax(-1)).sum()
    kl = (log_p.exp() * (log_p - log_q)).sum()
    return torch.stack([next_token_nll(spec, ids), agree, kl]).double().cpu()  # SYNC: per batch


def quantization_cost(reference: MoETransformer, model: MoETransformer, ids: Tensor) -> dict:
    """What quantized experts cost (--expert-quant): `model` (quantized) against `reference`
    (the model's own dtype), exact mode, one forward per window: both perplexities, top-1
    next-token agreement and the mean KL(reference || quantized)."""
    B, T = ids.shape
    ref_nll, sums = 0.0, torch.zeros(3, dtype=torch.float64)
    with torch.inference_mode():
        for x in ids.split(1):
            exact = reference(x.to(reference.embed_tokens.weight.device))  # (1, T, V)
            ref_nll += next_token_nll(exact, x).item()  # SYNC: once per window
            sums += compare_sums(F.log_softmax(exact, -1), model(x.to(exact.device)), x)
    nll, agree, kl = sums.tolist()
    n = B * (T - 1)
    return dict(reference_perplexity=math.exp(ref_nll / n), perplexity=math.exp(nll / n),
                top1_agreement=agree / (B * T), kl=kl / (B * T))  # fmt: skip


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
    stepwise: bool = False,
) -> dict:
    """Both measurements of the module docstring on windows ids (B, T); returns the dict that
    --json prints. stepwise: the definition, one position at a time (all windows side by side)."""
    predictors = {(n, d): build(n, model, calibration, d) for n in names for d in lookaheads}
    # A predictor that reads the previous position at a later layer (context) needs decoding's
    # order: its passes, and the exact one that scores it, go one position at a time.
    step = {
        k: stepwise or getattr(p, "reads_previous_position", False) for k, p in predictors.items()
    }
    step_exact = any(step.values())
    shifted = {key for key in predictors if key[0] == PREVIOUS and not step_exact}
    scoring = ScoringHook(model, predictors, {HIDDEN} & set(names), shifted)
    passes = [(n, d) for n in names if n != HIDDEN for d in lookaheads] if speculative else []
    hooks = {
        (n, d): FirstPositionHook(d)
        if n == PREVIOUS and not stepwise
        else PredictionHook(predictors[(n, d)], speculate=True)
        for n, d in passes
    }
    B, T = ids.shape
    batch = B if step_exact else 1  # windows per forward: stepping pays per step, so all at once
    exact_nll, sums = 0.0, {key: torch.zeros(3, dtype=torch.float64) for key in passes}
    bar = Progress((1 + len(passes)) * ids.numel(), "evaluate", unit="tokens")
    try:
        for i in range(0, B, batch):
            x = ids[i : i + batch]
            exact = forward_logits(model, x, scoring, step_exact)
            exact_nll += next_token_nll(exact, x).item()  # SYNC: once per batch
            bar.update(x.numel(), "exact pass, scoring")
            log_p = F.log_softmax(exact, dim=-1)  # (b, T, V)
            for name, d in passes:
                spec = forward_logits(model, x, hooks[(name, d)], step[(name, d)])
                sums[(name, d)] += compare_sums(log_p, spec, x)
                bar.update(x.numel(), f"speculative {name} d={d}")
    finally:
        bar.close()
    result = {
        "tokens": int(ids.numel()),
        "sequences": B,
        "seq_len": T,
        "lookaheads": list(lookaheads),
        "stepwise": stepwise,  # (a predictor that reads the previous position always steps)
        "hit_rates": scoring.rates(),
        "speculative": {"exact": {"perplexity": math.exp(exact_nll / (B * (T - 1)))}},
    }
    for (name, d), (nll, agree, kl) in sums.items():
        result["speculative"].setdefault(name, {})[str(d)] = {
            "perplexity": math.exp(nll / (B * (T - 1))),
            "top1_agreement": agree.item() / (B * T),
            "kl": kl.item() / (B * T),
        }
        share = getattr(hooks[(name, d)], "fallback_share", lambda: None)()
        if share is not None:  # fail-safe speculation: the share of guesses that fell back
            result["speculative"][name][str(d)]["fallback"] = share
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
                for extra, label in (("fail_safe_recall", "fail-safe"), ("fallback", "fell back")):
                    if metric == "recall" and extra in by_d[d]:  # a predictor that fails safe
                        row = by_d[d][extra]
                        cells = "".join(f"{row[t]:>7.3f}" for t in layers)
                        mean = sum(row[t] for t in layers) / len(layers)
                        lines.append(f"{'  ' + label:<18}{cells}   mean {mean:.3f}")
    spec = result["speculative"]
    lines.append("\nspeculative execution: every layer >= d runs the predicted experts")
    head = f"{'predictor':<18}{'d':>3}{'perplexity':>12}{'top-1 agree':>13}{'KL':>10}"
    lines.append(head + f"{'fell back':>11}")
    lines.append(f"{'exact':<18}{'-':>3}{spec['exact']['perplexity']:>12.3f}{1:>13.3f}{0:>10.4f}")
    for name, by_d in spec.items():
        if name == "exact":
            continue
        for d, m in by_d.items():
            lines.append(
                f"{name:<18}{d:>3}{m['perplexity']:>12.3f}{m['top1_agreement']:>13.3f}"
                f"{m['kl']:>10.4f}" + (f"{m['fallback']:>11.3f}" if "fallback" in m else "")
            )
    return "\n".join(lines).lstrip("\n")


def quant_table(result: dict) -> str:
    """--expert-quant's line: the quantized model against the model's own dtype."""
    if (q := result.get("quantization")) is None:
        return ""
    cost = q["perplexity"] / q["reference_perplexity"] - 1
    return (
        f"\n\nquantized experts ({q['format']}) vs the model's dtype, exact: perplexity "
        f"{q['reference_perplexity']:.3f} -> {q['perplexity']:.3f} ({cost:+.2%}), top-1 agree "
        f"{q['top1_agreement']:.3f}, KL {q['kl']:.4f}"
    )


def side_by_side(result: dict) -> str:
    """In-domain (--text) beside out-of-domain (--ood-text): per predictor and lookahead, mean
    recall@k over layers >= 2 (layer 1 has only layer 0 to go on), perplexity cost, KL."""
    ood = result["out_of_domain"]
    lines = ["\n\nin-domain (--text) | out-of-domain (--ood-text), per predictor and lookahead"]
    lines.append(
        f"{'predictor':<18}{'d':>3}{'recall>=2':>11}{'ppl cost':>10}{'KL':>8}   |"
        f"{'recall>=2':>11}{'ppl cost':>10}{'KL':>8}{'fell back':>11}"
    )
    for name, by_d in result["hit_rates"].items():
        for d in by_d:
            cells = []
            for r in (result, ood):
                recall = r["hit_rates"][name][d]["recall"][2:]
                spec = r["speculative"].get(name, {}).get(d)
                cost = (
                    "-"
                    if spec is None
                    else f"{spec['perplexity'] / r['speculative']['exact']['perplexity'] - 1:+.2%}"
                )
                kl = "-" if spec is None else f"{spec['kl']:.4f}"
                cells.append(f"{sum(recall) / len(recall):>11.3f}{cost:>10}{kl:>8}")
            spec = ood["speculative"].get(name, {}).get(d, {})
            fell = f"{spec['fallback']:>11.3f}" if "fallback" in spec else ""
            lines.append(f"{name:<18}{d:>3}" + "   |".join(cells) + fell)
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    """Recall@k per layer, one panel per lookahead."""
    plt = pyplot()
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
    a("--text", required=True, metavar="FILE", help="held-out UTF-8 text, not calibration's")
    a(
        "--ood-text",
        metavar="FILE",
        help="out-of-domain held-out text (e.g. `python -m tinymoe.corpus --out FILE`, man pages): "
        "the same measurements, reported beside --text's",
    )
    a("--calibration", metavar="DIR", help="folder with speculation.* files (default: --model)")
    a(
        "--predictors",
        type=predictor_list,
        metavar="P[,P...]",
        help=f"comma-separated, some of {', '.join(ALL_NAMES)} (default: all this checkpoint's "
        "calibration allows)",
    )
    a("--lookahead", type=lookahead_list, metavar="D[,D...]", help="e.g. 1 or 1,2 (default: 1,2,3)")
    a("--tokens", type=positive_int, default=4096, metavar="N", help="held-out tokens to read")
    a("--seq-len", type=positive_int, default=256, metavar="T", help="tokens per window")
    a("--skip-speculative", action="store_true", help="hit rates only")
    a(
        "--stepwise",
        action="store_true",
        help="feed one position at a time through a KV cache, as decoding does (the definition; "
        "many times slower than the default one forward per window, same numbers)",
    )
    a("--json", action="store_true", help="print one JSON object instead of tables")
    a("--plot", metavar="FILE", help="save recall@k per layer as an image (needs matplotlib)")
    add_device_flags(p)
    add_quant_flags(p)  # everything above is then measured on the quantized experts
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.plot:  # before the work: a missing matplotlib or folder would waste it
        pyplot()
        check_output_file(args.plot, "--plot")
    cfg = ModelConfig.from_file(model_dir_from_args(args) / "config.json")
    L = cfg.num_layers
    lookaheads = args.lookahead or tuple(d for d in (1, 2, 3) if d < L)
    for d in lookaheads:
        if d >= L:
            raise TinyMoeError(f"--lookahead {d}: must be below the number of layers ({L})")
    cal = load_speculation(args.calibration or args.model, cfg)
    names = args.predictors
    if names is None:  # everything this checkpoint can run; the learned ones need calibration
        names = [n for n in ALL_NAMES if cal is not None or n not in NEEDS_CALIBRATION]
        if cal is None:
            print(
                "evaluate: no speculation calibration found; skipping the learned predictors "
                "(run `tinymoe calibrate` first)",
                file=sys.stderr,
            )
    elif cal is None and set(names) & set(NEEDS_CALIBRATION):
        name = next(n for n in names if n in NEEDS_CALIBRATION)
        raise TinyMoeError(
            f"predictor {name!r} needs trained estimators, and there is no speculation.safetensors "
            f"in {args.calibration or args.model}; run `tinymoe calibrate --model DIR --text FILE`"
        )
    device = device_from_args(args)
    # Fits in memory? Before anything is read; --stepwise has a KV cache for up to --tokens ids.
    # (--expert-quant: a reference model in the model's dtype beside the quantized one)
    dtype = dtype_from_args(args, device, args.tokens if args.stepwise else 0, beside="model")
    ids = read_token_ids(args.model, args.text, args.tokens, args.seq_len)
    if ids.numel() < args.tokens:
        print(f"evaluate: {fewer_tokens(ids, args.tokens)}", file=sys.stderr)
    ood = (
        None
        if args.ood_text is None
        else read_token_ids(args.model, args.ood_text, args.tokens, args.seq_len)
    )
    quant = quant_from_args(args, cfg)  # --expert-quant: checked before loading
    model = load_model(args.model, device=device, dtype=dtype, expert_quant=args.expert_quant,
                       group_size=args.expert_group_size)  # fmt: skip
    result = evaluate(model, ids, cal, names, lookaheads, not args.skip_speculative, args.stepwise)
    if quant is not None:  # against the model's own dtype (a second model, for the comparison)
        reference = load_model(args.model, device=device, dtype=dtype)
        result["quantization"] = dict(quantization_cost(reference, model, ids), format=str(quant))
    result.update(model=str(args.model), text=str(args.text))
    if ood is not None:  # the same measurements on text of another kind, beside
        spec = not args.skip_speculative
        ood_result = evaluate(model, ood, cal, names, lookaheads, spec, args.stepwise)
        result["out_of_domain"] = dict(ood_result, text=str(args.ood_text))
    text = table(result) + quant_table(result)
    if ood is not None:
        text += (
            f"\n\nout-of-domain text {args.ood_text}:\n" + table(ood_result) + side_by_side(result)
        )
    print(json.dumps(result) if args.json else text)
    if args.plot:  # after the tables: whatever happens here, the numbers are out
        plot(result, args.plot)
    return 0


def cli(argv: list[str] | None = None) -> int:
    return run_cli(main, argv)  # a user mistake: one `error: ...` line on stderr, exit status 2


if __name__ == "__main__":
    sys.exit(cli())
