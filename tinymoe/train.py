"""Train the demo MoE from scratch on the Python documentation: `python -m tinymoe.train`.

The whole recipe in one readable file, in the order it runs:
    1. corpus      reST sources of the Python docs -> plain text, split by file into train/held-out
    2. tokenizer   byte-level BPE (Hugging Face `tokenizers`) trained on the train split
    3. training    tinymoe's own MoETransformer (no second model), AdamW, cosine LR with warmup,
                   cross-entropy plus a Switch/Mixtral load-balancing loss on every router
    4. evaluation  held-out loss and per-layer expert usage, measured on the saved bf16 weights
    5. export      a Hugging Face checkpoint directory: config.json, model.safetensors,
                   tokenizer.json, training_metrics.json and a model card (README.md)

The corpus comes from a Debian package: `apt-get install python3.11-doc` puts the sources under
/usr/share/doc/python3.11/html/_sources/ (PSF licence). Training state (model, optimizer, step)
is saved every --save-every steps in --run-dir, and --resume continues from it.
"""

import argparse
import json
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import Tensor

from tinymoe.cli import OneLineParser, positive_int, run_cli
from tinymoe.engine.config import ModelConfig
from tinymoe.engine.loader import load_model, save_model
from tinymoe.engine.model import MoETransformer, Routing
from tinymoe.errors import TinyMoeError
from tinymoe.progress import Progress

EOS = "<|endoftext|>"  # the one special token; also separates documents in the token stream
DEFAULT_CORPUS = "/usr/share/doc/python3.11/html/_sources"

# ---------------------------------------------------------------------------------------------
# 1. Corpus: reST -> plain text
# ---------------------------------------------------------------------------------------------

# Directives whose whole block is navigation or build machinery, not prose: dropped.
DROP_BLOCK = {
    "toctree", "index", "include", "literalinclude", "image", "figure", "highlight", "raw",
    "tabularcolumns", "sectionauthor", "moduleauthor", "currentmodule", "module", "testsetup",
    "testcleanup", "contents", "audit-event", "program", "productionlist", "only",
}  # fmt: skip
# Directives that render as a lead-in sentence. {arg} is a version number (the argument's first
# word; any remark after it is kept); other lead-ins are followed by the whole argument.
LEAD_IN = {
    "note": "Note:",
    "warning": "Warning:",
    "important": "Important:",
    "caution": "Caution:",
    "seealso": "See also:",
    "impl-detail": "CPython implementation detail:",
    "versionadded": "New in version {arg}.",
    "versionchanged": "Changed in version {arg}.",
    "deprecated": "Deprecated since version {arg}.",
    "deprecated-removed": "Deprecated since version {arg}.",
    "availability": "Availability:",
}
# Any other directive keeps its argument (a signature such as `print(*objects, sep=' ')`, a
# rubric's title) and its content (a code block, a table); only the `.. name::` syntax goes.

_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:-]+)::\s*(.*)$")  # .. name:: argument
_COMMENT = re.compile(r"^(\s*)\.\.(\s|$)")  # comments, link targets `.. _x:`, substitutions
_OPTION = re.compile(r"^\s+:[\w -]+:")  # a directive option line such as `   :noindex:`
_RULE = re.compile(r"^\s*([=\-~^*#\"'`+.:_])\1{2,}\s*$")  # heading under/overline
_TABLE_RULE = re.compile(r"^\s*(\+[-=+]+\+|[= ]*={3,}[= ]*)\s*$")  # grid/simple table borders
_ROLE = re.compile(r":[\w:+.-]+:`([^`]+)`")  # :func:`print`
_LITERAL = re.compile(r"``([^`]+)``")  # ``x = 1``
_LINK = re.compile(r"`([^`<]+?)\s*<[^>]*>`_{0,2}")  # `text <https://...>`_
_NAMED_REF = re.compile(r"`([^`]+)`_{1,2}")  # `Some title`_


def _role_text(m: re.Match) -> str:
    """What Sphinx shows for a role: "title <target>" -> title, "~a.b.c" -> c, "!x" -> x."""
    text = re.sub(r"\s*<[^>]*>$", "", m.group(1))
    kind = m.group(0).split("`", 1)[0]
    if kind in (":pep:", ":rfc:"):
        return f"{kind.strip(':').upper()} {text}"
    if text.startswith("~"):
        text = text[1:].rsplit(".", 1)[-1]
    return text.lstrip("!")


def _inline(line: str) -> str:
    line = _ROLE.sub(_role_text, line)
    line = _LITERAL.sub(r"\1", line)
    line = _LINK.sub(r"\1", line)
    return _NAMED_REF.sub(r"\1", line)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def clean_rst(text: str) -> str:
    """reST source -> the plain text a reader sees: prose and code kept, markup syntax removed."""
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        line = lines[i]
        i += 1
        directive = _DIRECTIVE.match(line)
        if directive or _COMMENT.match(line):
            # Skip option lines; then either drop the indented block or keep it as content.
            base = _indent(line)
            while i < len(lines) and _OPTION.match(lines[i]):
                i += 1
            name, arg = (directive.group(2), directive.group(3).strip()) if directive else ("", "")
            if not directive or name in DROP_BLOCK:
                while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > base):
                    i += 1
                continue
            lead = arg  # a signature, a title, or nothing
            if name in LEAD_IN and "{arg}" in LEAD_IN[name]:  # versions: "3.2" plus any remark
                version, _, remark = arg.partition(" ")
                lead = f"{LEAD_IN[name].format(arg=version)} {remark}".strip()
            elif name in LEAD_IN:
                lead = f"{LEAD_IN[name]} {arg}".strip()
            if lead:
                out.append(" " * base + _inline(lead))
            continue
        if _RULE.match(line) or _TABLE_RULE.match(line) or line.strip() == "::":
            continue
        line = line.rstrip()
        if line.endswith("::"):  # "Example::" introduces a literal block; Sphinx shows "Example:"
            line = line[:-2].rstrip() + ("" if line.endswith(" ::") else ":")
        out.append(_inline(line))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip() + "\n"


def prepare_corpus(corpus_dir: Path, data_dir: Path, holdout_every: int) -> dict[str, int]:
    """Clean every *.rst.txt; every `holdout_every`-th file (sorted by path) is held out.

    Writes data_dir/{train,heldout}.txt, documents separated by the EOS token. Returns file counts.
    """
    if holdout_every < 2:
        raise TinyMoeError("--holdout-every must be >= 2 (1 would hold out every file)")
    files = sorted(corpus_dir.rglob("*.rst.txt"))
    if not files:
        raise TinyMoeError(
            f"--corpus-dir {corpus_dir}: no *.rst.txt files; install them with "
            "`apt-get install python3.11-doc` or point --corpus-dir at a Sphinx _sources folder"
        )
    splits: dict[str, list[str]] = {"train": [], "heldout": []}
    for n, f in enumerate(files):
        split = "heldout" if n % holdout_every == holdout_every - 1 else "train"
        splits[split].append(clean_rst(f.read_text(encoding="utf-8", errors="replace")))
    data_dir.mkdir(parents=True, exist_ok=True)
    for split, docs in splits.items():
        (data_dir / f"{split}.txt").write_text(EOS.join(docs), encoding="utf-8")
    return {split: len(docs) for split, docs in splits.items()}


# ---------------------------------------------------------------------------------------------
# 2. Tokenizer: byte-level BPE
# ---------------------------------------------------------------------------------------------


def train_tokenizer(train_text: str, vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 style): any byte sequence encodes, and decoding is lossless."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(train_text.split(EOS), trainer=trainer)
    return tok


def encode_split(tok: Tokenizer, text: str) -> np.ndarray:
    """Token ids of a split (documents joined by EOS) as a flat uint16 array."""
    eos = tok.token_to_id(EOS)
    ids: list[int] = []
    for enc in tok.encode_batch(text.split(EOS)):
        ids.extend(enc.ids)
        ids.append(eos)
    return np.asarray(ids, dtype=np.uint16)


def prepare_data(args: argparse.Namespace) -> tuple[Tokenizer, Tensor, Tensor]:
    """Corpus, tokenizer and token ids, cached in --data-dir (rebuilt when the vocab differs)."""
    data = Path(args.data_dir)
    tok_path = data / "tokenizer.json"
    if tok_path.exists() and (data / "train.npy").exists():
        tok = Tokenizer.from_file(str(tok_path))
        if tok.get_vocab_size() == args.vocab_size:
            train, held = np.load(data / "train.npy"), np.load(data / "heldout.npy")
            return (
                tok,
                torch.from_numpy(train.astype(np.int64)),
                torch.from_numpy(held.astype(np.int64)),
            )
    counts = prepare_corpus(Path(args.corpus_dir), data, args.holdout_every)
    train_text = (data / "train.txt").read_text(encoding="utf-8")
    held_text = (data / "heldout.txt").read_text(encoding="utf-8")
    print(
        f"corpus: {counts['train']} train files, {counts['heldout']} held-out files",
        file=sys.stderr,
    )
    tok = train_tokenizer(train_text, args.vocab_size)
    tok.save(str(tok_path))
    train, held = encode_split(tok, train_text), encode_split(tok, held_text)
    np.save(data / "train.npy", train)
    np.save(data / "heldout.npy", held)
    return tok, torch.from_numpy(train.astype(np.int64)), torch.from_numpy(held.astype(np.int64))


# ---------------------------------------------------------------------------------------------
# 3. Training
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


class RouterTap:
    """A route_hook that runs the real router and keeps each layer's Routing for the losses."""

    def __init__(self) -> None:
        self.routings: list[Routing] = []

    def __call__(self, layer: int, resid: Tensor, u: Tensor, router) -> Routing:
        routing = router(u)
        self.routings.append(routing)
        return routing


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
    if args.resume:
        if not ckpt.exists():
            raise TinyMoeError(f"--resume: no training state at {ckpt}")
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

    tap = RouterTap()
    model.route_hook = tap
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
        x, y = batch_at(train_ids, state.step, args)
        tap.routings.clear()
        logits = model(x)  # (B, T, V)
        lm = F.cross_entropy(logits.view(-1, logits.shape[-1]), y.reshape(-1))
        bal = torch.stack([balance_loss(r, args.experts) for r in tap.routings]).mean()
        loss = lm + args.balance_coef * bal
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()

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
    model.route_hook = None
    return state


# ---------------------------------------------------------------------------------------------
# 4. Evaluation
# ---------------------------------------------------------------------------------------------


class UsageCounter:
    """A route_hook that counts how many routed slots each expert of each layer receives."""

    def __init__(self, num_layers: int, num_experts: int) -> None:
        self.counts = torch.zeros(num_layers, num_experts, dtype=torch.long)

    def __call__(self, layer: int, resid: Tensor, u: Tensor, router) -> Routing:
        routing = router(u)
        self.counts[layer] += torch.bincount(
            routing.ids.reshape(-1), minlength=self.counts.shape[1]
        )
        return routing


@torch.no_grad()
def evaluate(
    model: MoETransformer, ids: Tensor, seq_len: int, max_tokens: int, batch: int = 16
) -> tuple[float, Tensor]:
    """Mean next-token loss over consecutive windows of ids, and the (L, E) expert usage counts."""
    n_windows = min(len(ids) - 1, max_tokens) // seq_len
    windows = ids[: n_windows * seq_len + 1]
    counter = UsageCounter(model.cfg.num_layers, model.cfg.num_experts)
    model.route_hook = counter
    model.eval()
    total, count = 0.0, 0
    for b in range(0, n_windows, batch):
        rows = torch.arange(b, min(b + batch, n_windows))
        x = torch.stack([windows[r * seq_len : (r + 1) * seq_len] for r in rows])  # (b, T)
        y = torch.stack([windows[r * seq_len + 1 : (r + 1) * seq_len + 1] for r in rows])  # (b, T)
        logits = model(x)  # (b, T, V)
        total += F.cross_entropy(
            logits.view(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"
        ).item()
        count += y.numel()
    model.route_hook = None
    return total / count, counter.counts


def usage_table(shares: list[list[float]]) -> str:
    """Markdown table of expert usage: one row per layer, one column per expert, in percent."""
    E = len(shares[0])
    head = "| layer | " + " | ".join(str(e) for e in range(E)) + " | min | max |"
    rule = "|" + "---|" * (E + 3)
    rows = [
        f"| {layer} | "
        + " | ".join(f"{s:.1f}" for s in row)
        + f" | {min(row):.1f} | {max(row):.1f} |"
        for layer, row in enumerate(shares)
    ]
    return "\n".join([head, rule, *rows])


# ---------------------------------------------------------------------------------------------
# 5. Export
# ---------------------------------------------------------------------------------------------

MODEL_CARD = """\
# pydoc-moe: a small Qwen3-MoE-shaped model trained on the Python documentation

A demo checkpoint for tinymoe, trained from scratch on two CPU cores with `python -m tinymoe.train`.
It writes Python-documentation-flavoured English; it knows little and is not an assistant.

## Shape
{c.num_layers} layers, hidden {c.hidden_size}, {c.num_heads} query heads / {c.num_kv_heads} \
key-value heads of dim {c.head_dim}, {c.num_experts} experts per layer (SwiGLU width \
{c.expert_dim}), top-{c.top_k} routing (renormalised), vocabulary {c.vocab_size} (byte-level BPE), \
tied embeddings. Parameters: {m[parameters][total]:,} in all, {m[parameters][experts]:,} in \
experts ({share:.1f}%); {m[parameters][active]:,} active per token. Stored in bfloat16 \
({size_mb:.1f} MB). Trained on {a[seq_len]}-token windows.

## Data
The reStructuredText sources of the Python 3.11 documentation from Debian's `python3.11-doc`
package (`/usr/share/doc/python3.11/html/_sources/`, {n_files} files), licensed under the Python
Software Foundation License (PSF-2.0). Markup is stripped (directive syntax, roles, heading
underlines, table borders; prose and code examples kept). Every {a[holdout_every]}th file in sorted
path order is held out: {m[train_tokens]:,} train tokens, {m[heldout_tokens]:,} held-out tokens.

## Recipe
AdamW (betas 0.9/0.95, weight decay {a[weight_decay]} on matrices), peak LR {a[lr]} after \
{a[warmup]} warmup steps, cosine decay to {min_lr:.1e} ending at {a[steps]} steps or after \
{a[time_budget_min]} minutes, whichever comes first; batch {a[batch_size]} x {a[seq_len]} tokens; \
gradient clipping {a[grad_clip]}; load-balancing loss coefficient {a[balance_coef]}; fp32; seed \
{a[seed]}. It ran {m[steps]} steps ({m[tokens_seen]:,} tokens, {m[epochs]:.1f} epochs) in \
{minutes:.1f} min ({m[tokens_per_s]:.0f} tokens/s).

    apt-get install python3.11-doc
    {m[command]}

## Metrics (of these bf16 weights, evaluated in fp32)
| split | loss | perplexity |
|---|---|---|
| train (first {m[train_eval_tokens]:,} tokens) | {m[train_loss]:.3f} | {m[train_ppl]:.1f} |
| held-out ({m[heldout_eval_tokens]:,} tokens) | {m[heldout_loss]:.3f} | {m[heldout_ppl]:.1f} |

Expert usage on the held-out text (% of routed slots per expert; even would be {even:.2f}%); \
dead experts: {m[dead_experts]}.

{usage}
"""


def model_card(cfg: ModelConfig, metrics: dict, n_files: int) -> str:
    """The checkpoint's README.md, filled from training_metrics.json."""
    return MODEL_CARD.format(
        c=cfg,
        m=metrics,
        a=metrics["args"],
        share=100 * metrics["expert_share"],
        size_mb=metrics["size_bytes"] / 1e6,
        n_files=n_files,
        min_lr=metrics["args"]["lr"] * metrics["args"]["min_lr_ratio"],
        minutes=metrics["training_time_s"] / 60,
        even=100 / cfg.num_experts,
        usage=usage_table(metrics["expert_usage_percent"]),
    )


def param_counts(cfg: ModelConfig, model: MoETransformer) -> dict[str, int]:
    """Parameters in all (tied embeddings counted once), in experts, and used per token."""
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for p in model.experts.parameters())
    active = total - experts + cfg.num_layers * cfg.top_k * cfg.expert_numel
    return {"total": total, "experts": experts, "active": active}


def export(model: MoETransformer, tok: Tokenizer, out: Path) -> None:
    """config.json, model.safetensors (bf16, published per-expert layout) and tokenizer.json."""
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, out, dtype=torch.bfloat16)
    (out / "config.json").write_text(json.dumps(model.cfg.to_hf_dict(), indent=2) + "\n")
    tok.save(str(out / "tokenizer.json"))


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description=__doc__.splitlines()[0])
    a = p.add_argument
    a("--corpus-dir", default=DEFAULT_CORPUS, help="Sphinx _sources folder with *.rst.txt files")
    a("--data-dir", default="data", help="where the cleaned text, tokenizer and token ids go")
    a("--run-dir", default="runs/pydoc-moe", help="resumable training state (state.pt)")
    a("--out", default="weights/pydoc-moe", help="the Hugging Face checkpoint directory to write")
    a(
        "--holdout-every",
        type=positive_int,
        default=20,
        help="hold out every Nth file (sorted by path)",
    )
    a("--vocab-size", type=positive_int, default=4096)
    a("--layers", type=positive_int, default=8)
    a("--hidden", type=positive_int, default=192)
    a("--head-dim", type=positive_int, default=32)
    a("--kv-heads", type=positive_int, default=2)
    a("--experts", type=positive_int, default=32)
    a("--top-k", type=positive_int, default=4)
    a("--expert-dim", type=positive_int, default=80, help="each expert's SwiGLU width I")
    a(
        "--steps",
        type=positive_int,
        default=1600,
        help="optimizer steps (sets the LR schedule's length)",
    )
    a("--batch-size", type=positive_int, default=16)
    a("--seq-len", type=positive_int, default=256)
    a("--lr", type=float, default=2e-3, help="peak learning rate")
    a("--min-lr-ratio", type=float, default=0.1, help="final LR as a fraction of --lr")
    a("--warmup", type=positive_int, default=100, help="linear warmup steps")
    a("--weight-decay", type=float, default=0.1)
    a("--grad-clip", type=float, default=1.0)
    a("--balance-coef", type=float, default=0.01, help="weight of the load-balancing loss")
    a("--seed", type=int, default=0)
    a("--threads", type=positive_int, default=2, help="torch CPU threads")
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
        type=float,
        default=float("inf"),
        help="stop training (and export) after this many minutes",
    )
    a("--resume", action="store_true", help="continue from --run-dir/state.pt")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = "python -m tinymoe.train " + " ".join(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tok, train_ids, held_ids = prepare_data(args)
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
    heldout_loss, usage = evaluate(shipped, held_ids, args.seq_len, args.eval_tokens)
    train_loss, _ = evaluate(shipped, train_ids, args.seq_len, args.eval_tokens)
    eval_tokens = min(len(train_ids) - 1, args.eval_tokens) // args.seq_len * args.seq_len
    held_eval_tokens = min(len(held_ids) - 1, args.eval_tokens) // args.seq_len * args.seq_len
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
    """main(), with a user mistake turned into one `error: ...` line on stderr and exit status 2."""
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
