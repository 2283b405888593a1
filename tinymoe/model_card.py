"""The demo model as shipped: the exported checkpoint, what is measured on it, its model card.

train.py ends here: it exports a Hugging Face checkpoint directory (config.json, bf16
model.safetensors, tokenizer.json), loads it back, measures held-out loss and per-layer expert
usage on those very weights (`loss_and_usage`, through the route recorder), and writes
training_metrics.json and the model card (README.md) from the figures.
"""

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import Tensor

from tinymoe.engine.config import ModelConfig
from tinymoe.engine.loader import save_model
from tinymoe.engine.model import MoETransformer
from tinymoe.engine.moe import Routing
from tinymoe.speculation.recording import RouteRecorder

# ---------------------------------------------------------------------------------------------
# Measuring the shipped weights
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def loss_and_usage(
    model: MoETransformer, ids: Tensor, seq_len: int, max_tokens: int, batch: int = 16
) -> tuple[float, Tensor, int]:
    """Mean next-token loss over consecutive windows of ids, the (L, E) expert usage counts (how
    many routed slots each expert of each layer receives), and how many tokens were scored."""
    cfg = model.cfg
    usage = torch.zeros(cfg.num_layers, cfg.num_experts, dtype=torch.long)

    def count(layer: int, resid: Tensor, u: Tensor, routing: Routing) -> None:
        usage[layer] += torch.bincount(routing.ids.reshape(-1), minlength=cfg.num_experts)

    tokens = min(len(ids) - 1, max_tokens) // seq_len * seq_len
    inputs = ids[:tokens].view(-1, seq_len)  # (n, T): consecutive windows
    targets = ids[1 : tokens + 1].view(-1, seq_len)  # (n, T): each shifted by one
    model.eval()
    total = 0.0
    with RouteRecorder(count).installed(model):
        for b in range(0, len(inputs), batch):
            x, y = inputs[b : b + batch], targets[b : b + batch]  # (b, T) each
            logits = model(x)  # (b, T, V)
            total += F.cross_entropy(
                logits.view(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"
            ).item()
    return total / tokens, usage, tokens


def usage_table(shares: list[list[float]]) -> str:
    """Markdown table of expert usage: one row per layer, one column per expert, in percent."""
    E = len(shares[0])
    head = "| layer | " + " | ".join(str(e) for e in range(E)) + " | min | max |"
    rule = "|" + "---|" * (E + 3)
    rows = []
    for layer, row in enumerate(shares):
        cells = " | ".join(f"{s:.1f}" for s in row)
        rows.append(f"| {layer} | {cells} | {min(row):.1f} | {max(row):.1f} |")
    return "\n".join([head, rule, *rows])


# ---------------------------------------------------------------------------------------------
# Export and the model card
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
