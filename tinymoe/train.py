"""Train the demo MoE from scratch on the Python documentation: `tinymoe train`.

The recipe, in the order it runs (`main`):
    1. corpus      reST sources of the Python docs -> plain text, split by file into train/held-out
                   (corpus.py)
    2. tokenizer   byte-level BPE (Hugging Face `tokenizers`) trained on the train split (corpus.py)
    3. training    tinymoe's own MoETransformer (no second model), AdamW, cosine LR with warmup,
                   cross-entropy plus a Switch/Mixtral load-balancing loss on every router (here)
    4. evaluation  held-out loss and per-layer expert usage, measured on the saved bf16 weights
                   (model_card.py)
    5. export      a Hugging Face checkpoint directory: config.json, model.safetensors,
                   tokenizer.json, training_metrics.json and a model card, README.md
                   (model_card.py)

Training state (model, optimizer, step) is saved every --save-every steps in --run-dir, and
--resume continues from it. Where the corpus comes from: corpus.py.
"""

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from tinymoe.cli import (
    OneLineParser,
    add_threads_flag,
    check_output_dir,
    positive_float,
    positive_int,
    run_cli,
)
from tinymoe.corpus import DEFAULT_CORPUS, EOS, prepare_data
from tinymoe.engine.config import ModelConfig
from tinymoe.engine.loader import load_model
from tinymoe.engine.model import MoETransformer
from tinymoe.engine.moe import Routing
from tinymoe.errors import TinyMoeError
from tinymoe.model_card import export, loss_and_usage, model_card, param_counts, usage_table
from tinymoe.progress import Progress
from tinymoe.speculation.recording import RouteRecorder

# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def model_config(args: argparse.Namespace, vocab_size: int, eos_id: int) -> ModelConfig:
    """A Qwen3-MoE-shaped config: per-head q/k norm, renormalised top-k, tied embeddings."""
    if args.hidden % args.head_dim:
        raise TinyMoeError(
            f"--hidden ({args.hidden}) must be a multiple of --head-dim ({args.head_dim})"
        )
    heads = args.hidden // args.head_dim
    if heads % args.kv_heads:
        raise TinyMoeError(f"--kv-heads ({args.kv_heads}) must divide the head count ({heads})")
    return ModelConfig(
        model_type="qwen3_moe",
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=heads,
        num_kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        num_experts=args.experts,
        top_k=args.top_k,
        expert_dim=args.expert_dim,
        qk_norm="head",
        norm_topk_prob=True,
        tie_word_embeddings=True,
        eos_token_ids=(eos_id,),
        dtype="bfloat16",  # the shipped weights' storage dtype
    )


def balance_loss(routing: Routing, num_experts: int) -> Tensor:
    """Switch/Mixtral auxiliary loss E * sum_e f_e * P_e; 1.0 when routing is perfectly even.

    f_e: share of the N*K routed slots that went to expert e (not differentiable);
    P_e: mean router probability of expert e (differentiable: this is what the loss pushes).
    """
    probs = torch.softmax(routing.logits.float(), dim=-1)  # (N, E)
    f = torch.bincount(routing.ids.reshape(-1), minlength=num_experts).float() / routing.ids.numel()
    return num_experts * (f * probs.mean(dim=0)).sum()


def lr_at(step: int, elapsed_s: float, args: argparse.Namespace) -> float:
    """Linear warmup to --lr, then cosine decay to --lr * --min-lr-ratio.

    The decay ends at --steps or at --time-budget-min, whichever comes first: on a shared or
    slow machine the run still anneals fully before the budget stops it.
    """
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    by_steps = (step - args.warmup) / max(1, args.steps - args.warmup)
    progress = min(1.0, max(by_steps, elapsed_s / (60 * args.time_budget_min)))
    return args.lr * (
        args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    )


def batch_at(ids: Tensor, step: int, args: argparse.Namespace) -> tuple[Tensor, Tensor]:
    """Random windows of the train stream; seeded by step, so a resumed run sees the same data."""
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    starts = torch.randint(0, len(ids) - args.seq_len - 1, (args.batch_size,), generator=g)
    rows = torch.stack([ids[s : s + args.seq_len + 1] for s in starts.tolist()])  # (B, T+1)
    return rows[:, :-1], rows[:, 1:]


def make_optimizer(model: MoETransformer, args: argparse.Namespace) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices (experts, projections, embeddings), none on norm gains."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": args.weight_decay},
        {"params": other, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8)


def train_step(
    model: MoETransformer,
    opt: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    args: argparse.Namespace,
) -> tuple[Tensor, Tensor]:
    """One optimizer step on inputs x and targets y (B, T); returns (LM loss, balance loss)."""
    # The recorder keeps every layer's routing with its graph: the balance loss trains the routers.
    with RouteRecorder().installed(model) as recorder:
        logits = model(x)  # (B, T, V)
    lm = F.cross_entropy(logits.view(-1, logits.shape[-1]), y.reshape(-1))
    bal = torch.stack([balance_loss(r, args.experts) for r in recorder.forwards[0]]).mean()
    loss = lm + args.balance_coef * bal
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    opt.step()
    return lm.detach(), bal.detach()


@dataclass
class RunState:
    step: int = 0
    elapsed_s: float = 0.0  # training time summed over resumed sessions
    loss_curve: list[tuple[int, float, float]] = field(default_factory=list)  # (step, lm, balance)


def train(
    model: MoETransformer, train_ids: Tensor, args: argparse.Namespace, run_dir: Path
) -> RunState:
    opt = make_optimizer(model, args)
    state = RunState()
    ckpt = run_dir / "state.pt"
    if args.resume:  # (check_destinations made sure the file is there)
        saved = torch.load(ckpt, weights_only=True)  # our own file; weights_only keeps it safe
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optim"])
        state = RunState(saved["step"], saved["elapsed_s"], [tuple(r) for r in saved["loss_curve"]])
        print(f"resumed from {ckpt} at step {state.step}", file=sys.stderr)

    def save_state() -> None:
        tmp = ckpt.with_suffix(".tmp")
        torch.save(
            {"model": model.state_dict(), "optim": opt.state_dict(), "step": state.step,
             "elapsed_s": state.elapsed_s, "loss_curve": state.loss_curve, "args": vars(args)},
            tmp,
        )  # fmt: skip
        tmp.replace(ckpt)  # atomic: a crash mid-save never leaves a torn checkpoint

    model.train()
    tokens_per_step = args.batch_size * args.seq_len
    bar = Progress(args.steps, "train", start=state.step)
    lm_avg = bal_avg = None
    t_session, start_elapsed = time.perf_counter(), state.elapsed_s
    while state.step < args.steps:
        if state.elapsed_s > args.time_budget_min * 60:
            print(
                f"\ntime budget of {args.time_budget_min} min reached at step {state.step}",
                file=sys.stderr,
            )
            break
        for group in opt.param_groups:
            group["lr"] = lr = lr_at(state.step, state.elapsed_s, args)
        lm, bal = train_step(model, opt, *batch_at(train_ids, state.step, args), args)
        state.step += 1
        state.elapsed_s = start_elapsed + time.perf_counter() - t_session
        # SYNC: .item() waits for the step; fine on CPU, and once per step anywhere.
        lm_v, bal_v = lm.item(), bal.item()
        lm_avg = lm_v if lm_avg is None else 0.95 * lm_avg + 0.05 * lm_v
        bal_avg = bal_v if bal_avg is None else 0.95 * bal_avg + 0.05 * bal_v
        if state.step % args.log_every == 0 or state.step == args.steps:
            state.loss_curve.append((state.step, round(lm_avg, 4), round(bal_avg, 4)))
        tok_s = (state.step - bar.n0) * tokens_per_step / (time.perf_counter() - t_session)
        bar.update(
            1, f"loss {lm_avg:.3f} | balance {bal_avg:.3f} | lr {lr:.2e} | {tok_s:.0f} tok/s"
        )
        if state.step % args.save_every == 0:
            save_state()
    bar.close()
    save_state()
    return state


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser("train", description=__doc__.splitlines()[0])
    a = p.add_argument
    a("--corpus-dir", default=DEFAULT_CORPUS, help="Sphinx _sources folder with *.rst.txt files")
    a("--data-dir", default="data", help="where the cleaned text, tokenizer and token ids go")
    a("--run-dir", default="runs/pydoc-moe", help="resumable training state (state.pt)")
    a("--out", default="weights/pydoc-moe", help="the Hugging Face checkpoint directory to write")
    a(
        "--force",
        action="store_true",
        help="replace a checkpoint already in --out (a --resume run may replace its own export)",
    )
    a(
        "--holdout-every",
        type=positive_int,
        default=20,
        help="hold out every Nth file (sorted by path)",
    )
    a("--vocab-size", type=positive_int, default=4096, help="byte-level BPE vocabulary")
    a("--layers", type=positive_int, default=8, help="decoder layers")
    a("--hidden", type=positive_int, default=192, help="hidden size D")
    a("--head-dim", type=positive_int, default=32, help="per-head dimension")
    a("--kv-heads", type=positive_int, default=2, help="key/value heads (grouped-query)")
    a("--experts", type=positive_int, default=32, help="experts per layer")
    a("--top-k", type=positive_int, default=4, help="experts per token")
    a("--expert-dim", type=positive_int, default=80, help="each expert's SwiGLU width I")
    a(
        "--steps",
        type=positive_int,
        default=1600,
        help="optimizer steps (sets the LR schedule's length)",
    )
    a("--batch-size", type=positive_int, default=16, help="sequences per step")
    a("--seq-len", type=positive_int, default=256, help="tokens per sequence")
    a("--lr", type=positive_float, default=2e-3, help="peak learning rate")
    a("--min-lr-ratio", type=float, default=0.1, help="final LR as a fraction of --lr")
    a("--warmup", type=positive_int, default=100, help="linear warmup steps")
    a("--weight-decay", type=float, default=0.1, help="AdamW's, on matrices")
    a("--grad-clip", type=positive_float, default=1.0, help="max gradient norm")
    a("--balance-coef", type=float, default=0.01, help="weight of the load-balancing loss")
    a("--seed", type=int, default=0, help="initialisation and batches")
    add_threads_flag(p)
    a("--save-every", type=positive_int, default=100, help="steps between resumable checkpoints")
    a(
        "--log-every",
        type=positive_int,
        default=25,
        help="steps between points of the saved loss curve",
    )
    a(
        "--eval-tokens",
        type=positive_int,
        default=200_000,
        help="tokens per split for the final evaluation",
    )
    a(
        "--time-budget-min",
        type=positive_float,
        default=float("inf"),
        help="stop training (and export) after this many minutes",
    )
    a("--resume", action="store_true", help="continue from --run-dir/state.pt")
    return p


def check_destinations(args: argparse.Namespace) -> None:
    """Every folder the run writes, checked before an hour of training; an existing checkpoint
    in --out (the shipped demo model, by default) is replaced only with --force or --resume."""
    for flag in ("--data-dir", "--run-dir", "--out"):
        check_output_dir(getattr(args, flag[2:].replace("-", "_")), flag)
    state = Path(args.run_dir) / "state.pt"
    if args.resume and not state.exists():
        raise TinyMoeError(f"--resume: no training state at {state}")
    existing = Path(args.out) / "model.safetensors"
    if existing.exists() and not (args.force or args.resume):  # a resumed run re-exports
        raise TinyMoeError(
            f"--out {args.out} already holds a checkpoint ({existing}); choose another --out, "
            "or replace it with --force"
        )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = "tinymoe train " + " ".join(sys.argv[1:] if argv is None else argv)
    check_destinations(args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tok, train_ids, held_ids = prepare_data(
        args.corpus_dir, args.data_dir, args.holdout_every, args.vocab_size
    )
    eos_id = tok.token_to_id(EOS)
    cfg = model_config(args, tok.get_vocab_size(), eos_id)
    model = MoETransformer(cfg).init_weights(args.seed, std=0.02)
    counts = param_counts(cfg, model)
    print(
        f"model: {counts['total']:,} parameters, {counts['experts']:,} in experts "
        f"({100 * counts['experts'] / counts['total']:.1f}%), {counts['active']:,} active; "
        f"{len(train_ids):,} train tokens, {len(held_ids):,} held-out tokens",
        file=sys.stderr,
    )
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    state = train(model, train_ids, args, run_dir)

    # Evaluate what we ship: export bf16, load it back in fp32, measure that.
    out = Path(args.out)
    export(model, tok, out)
    shipped = load_model(out, dtype=torch.float32)
    heldout_loss, usage, held_eval_tokens = loss_and_usage(
        shipped, held_ids, args.seq_len, args.eval_tokens
    )
    train_loss, _, eval_tokens = loss_and_usage(shipped, train_ids, args.seq_len, args.eval_tokens)
    shares = 100 * usage.float() / usage.sum(dim=1, keepdim=True)  # (L, E)
    tokens = state.step * args.batch_size * args.seq_len
    metrics = {
        "command": command,
        "steps": state.step,
        "tokens_seen": tokens,
        "epochs": tokens / len(train_ids),
        "training_time_s": round(state.elapsed_s, 1),
        "tokens_per_s": round(tokens / state.elapsed_s, 1) if state.elapsed_s else 0.0,
        "train_tokens": len(train_ids),
        "heldout_tokens": len(held_ids),
        "train_loss": round(train_loss, 4),
        "train_ppl": round(math.exp(train_loss), 2),
        "train_eval_tokens": eval_tokens,
        "heldout_loss": round(heldout_loss, 4),
        "heldout_ppl": round(math.exp(heldout_loss), 2),
        "heldout_eval_tokens": held_eval_tokens,
        "parameters": counts,
        "expert_share": round(counts["experts"] / counts["total"], 4),
        "size_bytes": (out / "model.safetensors").stat().st_size,
        "expert_usage_percent": [[round(s, 2) for s in row] for row in shares.tolist()],
        "expert_usage_min_percent": round(shares.min().item(), 2),
        "expert_usage_max_percent": round(shares.max().item(), 2),
        "dead_experts": int((usage == 0).sum()),
        "loss_curve": [list(r) for r in state.loss_curve],
        "args": vars(args),
    }
    (out / "training_metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    n_files = len(list(Path(args.corpus_dir).rglob("*.rst.txt")))
    (out / "README.md").write_text(model_card(cfg, metrics, n_files))
    print(
        f"\nwrote {out}: train loss {train_loss:.3f} (ppl {math.exp(train_loss):.1f}), "
        f"held-out loss {heldout_loss:.3f} (ppl {math.exp(heldout_loss):.1f}), "
        f"{state.elapsed_s / 60:.1f} min\n{usage_table(metrics['expert_usage_percent'])}",
        file=sys.stderr,
    )
    return 0


def cli(argv: list[str] | None = None) -> int:
    return run_cli(main, argv)  # a user mistake: one `error: ...` line on stderr, exit status 2


if __name__ == "__main__":
    sys.exit(cli())
