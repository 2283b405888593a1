"""Calibration for speculation: `tinymoe calibrate --model DIR --text FILE`.

What the predictors (speculation/predictors.py) need from data, measured once per checkpoint.
The calibration sequences are split: most for measuring and training, the rest (--val-fraction)
held back.
    1. an exact run over calibration text records every layer's r_l, routing and router logits,
       and sums each expert's output over the tokens routed to it;
    2. default vectors v[l, e] = the mean output of expert e at layer l (both steps:
       speculation/exact_run.py);
    3. the estimators (speculation/estimator.py) are trained on pairs (q_{t-d}, true logits of
       layer t), for each lookahead d;
    4. on the held-back sequences, every predictor's recall per layer is measured, and the hybrid
       predictor's estimator layers are chosen: layers where the router's recall is below a
       threshold and the estimator's is higher;
    5. the context predictor (speculation/context.py) is trained the same way on pairs
       ([q_{t-d}, the previous token's Norm_t(r_t)], true logits of layer t), and its fail-safe
       threshold per layer is chosen on the held-back sequences: the lowest confidence that
       keeps recall@k, counting a token that falls back as 1, at --fail-safe-recall; then the
       pre-attention predictor (speculation/preattention.py) likewise, its pairs led by layer
       t's attention run on the stand-in state.
Everything is saved as speculation.{safetensors,json} beside the checkpoint, or in --out; the
format, and `load_speculation` that reads it back, live in speculation/calibration.py.
"""

import argparse
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from tinymoe.cli import (
    OneLineParser,
    add_device_flags,
    add_model_flag,
    check_output_dir,
    device_from_args,
    dtype_from_args,
    lookahead_list,
    model_dir_from_args,
    open_fraction,
    positive_float,
    positive_int,
    run_cli,
)
from tinymoe.corpus import fewer_tokens, read_token_ids
from tinymoe.engine.config import ModelConfig
from tinymoe.engine.loader import load_model
from tinymoe.engine.model import MoETransformer
from tinymoe.errors import TinyMoeError
from tinymoe.speculation.calibration import (
    META_FILE,
    TENSORS_FILE,
    Calibration,
    load_speculation,
    save_speculation,
)
from tinymoe.speculation.context import train_context
from tinymoe.speculation.estimator import (
    EstimatorConfig,
    LinearEstimator,
    Pairs,
    build_estimator,
    mean_kl,
    train_estimator,
)
from tinymoe.speculation.exact_run import ExactRunRecord, default_vectors, record_exact_run
from tinymoe.speculation.preattention import preattention_pairs
from tinymoe.speculation.predictors import RouterPredictor, quasi_hidden, recall_at_k

# ---------------------------------------------------------------- training and choosing


@dataclass(frozen=True)
class CalibrationSettings:
    lookaheads: tuple[int, ...] = (1, 2, 3)  # one pair of estimators per lookahead
    steps: int = 1500  # estimator training steps
    batch_size: int = 256  # pairs per predicted layer per step
    lr: float = 2e-3
    reduction: int = 2  # the estimator's m: it works at width D/m
    ffn_mult: int = 4
    val_fraction: float = 0.1  # share of the sequences held back for hit rates and hybrid
    hybrid_threshold: float = 0.75  # hybrid considers the estimator where router recall is below
    fail_safe_recall: float = 0.95  # the context predictor's thresholds keep this recall@k
    forward_batch: int = 8  # sequences per forward pass of the exact run
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.val_fraction < 1:
            raise TinyMoeError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        if not self.lookaheads:
            raise TinyMoeError("--lookahead: give at least one lookahead")


@torch.no_grad()
def quasi_pairs(model: MoETransformer, dv: Tensor, run: ExactRunRecord, lookahead: int) -> Pairs:
    """For each target layer t >= d: (q_{t-d}, the true router logits of layer t), every token."""
    device = model.embed_tokens.weight.device
    dv = dv.to(device, model.embed_tokens.weight.dtype)
    pairs: Pairs = {}
    for t in range(lookahead, model.cfg.num_layers):
        l = t - lookahead
        routing = run.routing(l, device)
        resid = run.resid[l].to(device, dv.dtype)
        q = quasi_hidden(model, dv, l, t, resid, routing).float()  # (N, D)
        pairs[t] = (q, run.logits[t].to(device))
    return pairs


@torch.no_grad()
def estimator_recall(estimator: nn.Module, pairs: Pairs, top_k: int) -> dict[int, float]:
    """Recall@K of the estimator's top-K against the true router's top-K, per target layer."""
    return {
        t: recall_at_k(estimator(q, t).topk(top_k).indices, true.topk(top_k).indices).mean().item()
        for t, (q, true) in pairs.items()
    }


@torch.no_grad()
def router_recall(
    model: MoETransformer, dv: Tensor | None, run: ExactRunRecord, lookahead: int
) -> dict[int, float]:
    """Recall@K of Router-PF (with the given default vectors) per target layer."""
    device = model.embed_tokens.weight.device
    predictor = RouterPredictor(model, dv, lookahead)
    out = {}
    for t in range(lookahead, model.cfg.num_layers):
        l = t - lookahead
        routing = run.routing(l, device)
        resid = run.resid[l].to(device, model.embed_tokens.weight.dtype)
        pred = predictor.observe(l, resid, resid, routing)  # (u is not read by Router-PF)
        out[t] = recall_at_k(pred.ids.cpu(), run.ids[t]).mean().item()
    return out


def split_runs(
    model: MoETransformer, ids: Tensor, s: CalibrationSettings
) -> tuple[ExactRunRecord, ExactRunRecord, int]:
    """Steps 1-2's exact runs: (training sequences' run, held-back sequences' run, held back)."""
    L, T = model.cfg.num_layers, ids.shape[1]
    n_val = max(1, round(ids.shape[0] * s.val_fraction))
    if n_val >= ids.shape[0]:
        raise TinyMoeError(
            f"calibration needs at least 2 sequences of --seq-len {T} tokens (one is held back "
            f"for hit rates); got {ids.shape[0]}: give more --tokens or a longer --text"
        )
    for d in s.lookaheads:
        if not 1 <= d < L:
            raise TinyMoeError(f"--lookahead {d}: must be between 1 and {L - 1} for {L} layers")
    run = record_exact_run(model, ids[:-n_val], s.forward_batch)  # default vectors, training
    held = record_exact_run(model, ids[-n_val:], s.forward_batch)  # hit rates, hybrid choice
    return run, held, n_val


def add_context(
    cal: Calibration,
    model: MoETransformer,
    run: ExactRunRecord,
    held: ExactRunRecord,
    s: CalibrationSettings,
    seq_len: int,
    kind: str = "context",
) -> None:
    """Step 5 into `cal` for `kind` (context or preattention): the estimators, their held-back
    recall, KL and fail-safe figures (every other estimator and figure of `cal` stays as is)."""
    L = model.cfg.num_layers
    how = {} if kind == "context" else {"make_pairs": preattention_pairs, "inputs": 3}
    contexts, fail_safe, kl = train_context(
        model, cal.default_vectors, run, held, s, seq_len, kind, **how
    )
    rates = cal.meta.setdefault("val_recall_at_k", {})
    for d, est in contexts.items():
        cal.estimators[(kind, d)] = est
        recall = [fail_safe[d][t]["recall"] for t in range(d, L)]
        rates.setdefault(str(d), {})[kind] = [None] * d + recall
    cal.meta.setdefault("val_kl", {}).update(kl)
    by_d = {str(d): {str(t): f for t, f in by_t.items()} for d, by_t in fail_safe.items()}
    key = "fail_safe" if kind == "context" else f"fail_safe_{kind}"
    cal.meta.setdefault(key, {}).update(by_d)
    cal.meta["fail_safe_rule"] = (
        f"context, preattention: per layer, the lowest margin (K-th minus (K+1)-th logit) that "
        f"keeps recall@k, a fallen-back token counting 1, at {s.fail_safe_recall} on the "
        "held-back sequences"
    )


def calibrate(model: MoETransformer, ids: Tensor, s: CalibrationSettings) -> Calibration:
    """The whole procedure of the module docstring on token rows `ids` (B, T)."""
    cfg = model.cfg
    L, T = cfg.num_layers, ids.shape[1]
    run, held, n_val = split_runs(model, ids, s)
    dv = default_vectors(run)
    never = int((run.expert_count == 0).sum())
    if never:
        print(
            f"calibrate: {never} of {L * cfg.num_experts} experts were never routed; "
            "their default vectors are zero",
            file=sys.stderr,
        )

    estimators: dict[tuple[str, int], nn.Module] = {}
    hybrid: dict[int, list[int]] = {}
    hit_rates: dict[str, dict[str, list[float | None]]] = {}
    kl: dict[str, dict[str, float]] = {}
    for d in s.lookaheads:
        train, val = quasi_pairs(model, dv, run, d), quasi_pairs(model, dv, held, d)
        rates = {
            "router": router_recall(model, dv, held, d),
            "router-nodefault": router_recall(model, None, held, d),
        }
        for kind in ("linear", "estimator"):
            ecfg = EstimatorConfig(
                kind, cfg.hidden_size, cfg.num_experts, L, s.reduction, s.ffn_mult
            )
            torch.manual_seed(s.seed)
            est = build_estimator(ecfg).to(train[d][0].device)
            if isinstance(est, LinearEstimator):
                est.init_from_routers([layer.mlp.gate.weight.float() for layer in model.layers])
            before = mean_kl(est, val)
            train_estimator(est, train, s.steps, s.batch_size, s.lr, s.seed, f"{kind} d={d}")
            after = mean_kl(est, val)
            name = "linear-estimator" if kind == "linear" else kind
            rates[name] = estimator_recall(est, val, cfg.top_k)
            estimators[(kind, d)] = est.cpu()
            kl[f"{name}@{d}"] = {
                "val_kl_before": sum(before.values()) / len(before),
                "val_kl_after": sum(after.values()) / len(after),
            }
        by_router, by_est = rates["router"], rates["estimator"]
        hybrid[d] = [
            t for t in by_router if by_router[t] < s.hybrid_threshold and by_est[t] > by_router[t]
        ]
        # Per target layer t, None for t < d (nothing predicts them).
        hit_rates[str(d)] = {n: [None] * d + [r[t] for t in range(d, L)] for n, r in rates.items()}

    meta = {
        "model": {
            "layers": L,
            "experts": cfg.num_experts,
            "hidden": cfg.hidden_size,
            "top_k": cfg.top_k,
        },
        "tokens": int(ids.numel()),  # default vectors and training use all but val_sequences
        "sequences": int(ids.shape[0]),
        "seq_len": T,
        "val_sequences": n_val,
        "never_routed_experts": never,
        "settings": asdict(s),
        "hybrid_rule": (
            f"estimator on target layers whose router recall@k on the held-back sequences is "
            f"below {s.hybrid_threshold} and lower than the estimator's"
        ),
        "val_recall_at_k": hit_rates,
        "val_kl": kl,
    }
    cal = Calibration(dv, run.expert_count, estimators, hybrid, meta)
    add_context(cal, model, run, held, s, T)
    add_context(cal, model, run, held, s, T, "preattention")
    return cal


# ---------------------------------------------------------------- command line


def summary(cal: Calibration) -> str:
    """A per-layer table of held-back recall@k for each lookahead and predictor."""
    lines = []
    for d, rates in cal.meta["val_recall_at_k"].items():
        names = list(rates)
        L = len(rates[names[0]])
        lines.append(f"lookahead {d}: recall@k on held-back calibration sequences")
        lines.append("layer  " + "".join(f"{n:>18}" for n in names) + "   hybrid uses")
        for t in range(int(d), L):
            row = "".join(f"{rates[n][t]:>18.3f}" for n in names)
            use = "estimator" if t in cal.hybrid_layers[int(d)] else "router"
            lines.append(f"{t:>5}  {row}   {use}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser("calibrate", description=__doc__.splitlines()[0])
    a = p.add_argument
    add_model_flag(p)
    a("--text", required=True, metavar="FILE", help="UTF-8 text, e.g. the training split")
    a(
        "--out",
        metavar="DIR",
        help="where to write speculation.{safetensors,json}; required when --model already has "
        "them (the shipped demo model does), so they are never replaced by accident",
    )
    a("--force", action="store_true", help="replace speculation files already in the folder")
    a("--tokens", type=positive_int, default=65536, metavar="N", help="tokens read from --text")
    a("--seq-len", type=positive_int, default=256, metavar="T", help="tokens per sequence")
    a("--lookahead", type=lookahead_list, metavar="D[,D...]", help="e.g. 1,2 (default: 1,2,3)")
    a("--estimator-steps", type=positive_int, default=1500, help="training steps per estimator")
    a("--estimator-batch", type=positive_int, default=256, help="pairs per layer per step")
    a("--estimator-lr", type=positive_float, default=2e-3, help="AdamW learning rate")
    a("--reduction", type=positive_int, default=2, help="estimator width D/m: this is m")
    a("--val-fraction", type=open_fraction, default=0.1, help="share of sequences held back")
    a("--hybrid-threshold", type=float, default=0.75, help="router recall where hybrid may switch")
    a(
        "--fail-safe-recall",
        type=open_fraction,
        default=0.95,
        help="the context predictor's "
        "thresholds keep this recall@k on held-back sequences, fallbacks counting 1",
    )
    only = p.add_mutually_exclusive_group()  # one predictor added at a time
    only.add_argument(
        "--context-only",
        action="store_true",
        help="train only the context predictor, into the "
        "calibration already in --out (rewritten: needs --force); the rest stays bit for bit",
    )
    only.add_argument(
        "--preattention-only",
        action="store_true",
        help="the same for the pre-attention predictor: only it is trained and written",
    )
    a("--batch-size", type=positive_int, default=8, help="sequences per forward pass")
    a("--seed", type=int, default=0, help="for the estimators' initialisation and batches")
    add_device_flags(p)
    return p


def output_dir(args: argparse.Namespace) -> Path:
    """Where the files go, checked before calibrating: writable, and nothing replaced unless
    --force. Without --out that is --model, whose shipped files must not vanish by accident
    (other lookaheads or settings would silently replace what `run` and `bench` expect)."""
    out = check_output_dir(args.out or args.model, "--out" if args.out else "--model")
    existing = [out / f for f in (TENSORS_FILE, META_FILE) if (out / f).exists()]
    if existing and not args.force:
        where = "--out" if args.out else "--model (the default --out)"
        raise TinyMoeError(
            f"{existing[0]} exists: {where} already holds a calibration; write elsewhere with "
            "--out DIR, or replace it with --force"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = "tinymoe calibrate " + " ".join(sys.argv[1:] if argv is None else argv)
    L = ModelConfig.from_file(model_dir_from_args(args) / "config.json").num_layers
    for d in args.lookahead or ():
        if not 1 <= d < L:
            raise TinyMoeError(f"--lookahead {d}: must be between 1 and {L - 1} for {L} layers")
    out = output_dir(args)
    cfg = ModelConfig.from_file(model_dir_from_args(args) / "config.json")
    only = "context" if args.context_only else "preattention" if args.preattention_only else None
    previous = load_speculation(out, cfg) if only else None
    if only and previous is None:
        raise TinyMoeError(f"--{only}-only: no calibration in {out} to add the {only} predictor to")
    device = device_from_args(args)
    dtype = dtype_from_args(args, device)  # fits in memory? before anything is read
    ids = read_token_ids(args.model, args.text, args.tokens, args.seq_len)
    if ids.numel() < args.tokens:
        print(f"calibrate: {fewer_tokens(ids, args.tokens)}", file=sys.stderr)
    model = load_model(args.model, device=device, dtype=dtype)
    settings = CalibrationSettings(
        lookaheads=args.lookahead or tuple(d for d in (1, 2, 3) if d < L),
        steps=args.estimator_steps,
        batch_size=args.estimator_batch,
        lr=args.estimator_lr,
        reduction=args.reduction,
        val_fraction=args.val_fraction,
        hybrid_threshold=args.hybrid_threshold,
        fail_safe_recall=args.fail_safe_recall,
        forward_batch=args.batch_size,
        seed=args.seed,
    )
    torch.manual_seed(args.seed)
    if previous is not None:  # the shipped estimators stay bit for bit; the context one is new
        cal = previous
        run, held, _ = split_runs(model, ids, settings)
        add_context(cal, model, run, held, settings, ids.shape[1], only)
        cal.meta[f"{only}_command"] = command
    else:
        cal = calibrate(model, ids, settings)
        cal.meta.update(command=command, text=str(args.text))
    save_speculation(cal, out)
    print(summary(cal))
    print(f"wrote {out / TENSORS_FILE} and {out / META_FILE}", file=sys.stderr)
    return 0


def cli(argv: list[str] | None = None) -> int:
    return run_cli(main, argv)  # a user mistake: one `error: ...` line on stderr, exit status 2


if __name__ == "__main__":
    sys.exit(cli())
