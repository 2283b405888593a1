"""Lightweight estimators: small networks that predict layer t's router logits from q_{t-d}.

Where the router applied to the quasi-hidden state q_l predicts poorly (see predictors.py), the
paper trains a small network instead. Two variants live here:

- `Estimator`, the paper's design, one module shared by every predicted layer:
      z = Down(q) + Embed[t]                 down-projection D -> D/m, plus which layer t is asked
      z = z + W2 SiLU(W1 z)                  a feed-forward block with a residual connection
      logits = Head(LayerNorm(z))            D/m -> E
- `LinearEstimator`, the simplest: one (E, D) matrix per predicted layer, initialised from that
  layer's router, so before training it *is* Router-PF and training only corrects it.
- `ContextEstimator`, beyond the paper (speculation/context.py uses it): the linear estimator
  given a second input, the previous token's state at the target layer, x = [q, p] (N, 2D),
  and a small feed-forward branch, both per predicted layer t:
      logits = W_t x + b_t + V_t SiLU(U_t x + c_t)     W_t (E, 2D), its q half the router's;
                                                        U_t (D/m, 2D); V_t (E, D/m), from zero
  and it keeps the fail-safe thresholds calibrate chose, one per predicted layer. The
  pre-attention predictor (speculation/preattention.py) uses it with three inputs (x (N, 3D)).

`train_estimator` fits either by distillation: minimise KL(p_router || p_estimator), where
p_router = softmax(the true router logits of layer t) recorded in an exact run (by
tinymoe.calibrate).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tinymoe.errors import TinyMoeError
from tinymoe.progress import Progress

KINDS = ("estimator", "linear", "context", "preattention")


@dataclass(frozen=True)
class EstimatorConfig:
    kind: str  # "estimator" (the paper's MLP), "linear", "context" or "preattention"
    hidden_size: int  # D
    num_experts: int  # E
    num_layers: int  # L: one layer embedding (or matrix) per layer that may be predicted
    reduction: int = 2  # m: the MLP works at width D/m
    ffn_mult: int = 4  # the feed-forward block's hidden width, in multiples of D/m
    inputs: int = 2  # ContextEstimator's: how many D-wide states x concatenates (preattention: 3)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise TinyMoeError(f"estimator kind {self.kind!r} unknown; expected one of {KINDS}")
        if self.reduction < 1 or self.hidden_size // self.reduction < 1:
            raise TinyMoeError(
                f"estimator reduction m={self.reduction} must be >= 1 and at most the hidden "
                f"size {self.hidden_size}"
            )
        if self.ffn_mult < 1:
            raise TinyMoeError(f"estimator ffn_mult must be >= 1, got {self.ffn_mult}")
        if self.inputs < 1:
            raise TinyMoeError(f"estimator inputs must be >= 1, got {self.inputs}")

    @property
    def width(self) -> int:
        return self.hidden_size // self.reduction  # D/m


class Estimator(nn.Module):
    """The paper's estimator: q (N, D) and the predicted layer t -> router logits (N, E)."""

    def __init__(self, cfg: EstimatorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        W = cfg.width
        self.down = nn.Linear(cfg.hidden_size, W)
        self.layer_embed = nn.Embedding(cfg.num_layers, W)
        self.ff_in = nn.Linear(W, cfg.ffn_mult * W)
        self.ff_out = nn.Linear(cfg.ffn_mult * W, W)
        self.norm = nn.LayerNorm(W)
        self.head = nn.Linear(W, cfg.num_experts)

    def forward(self, q: Tensor, layer: int) -> Tensor:
        z = self.down(q) + self.layer_embed.weight[layer]  # (N, D/m)
        z = z + self.ff_out(F.silu(self.ff_in(z)))  # (N, D/m)
        return self.head(self.norm(z))  # (N, E)


class LinearEstimator(nn.Module):
    """One matrix per predicted layer: logits = q @ W_t^T, W_t initialised to layer t's router."""

    def __init__(self, cfg: EstimatorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.zeros(cfg.num_layers, cfg.num_experts, cfg.hidden_size))

    @torch.no_grad()
    def init_from_routers(self, routers: list[Tensor]) -> "LinearEstimator":
        """Copy each layer's router weight (E, D): the untrained estimator equals Router-PF."""
        for t, w in enumerate(routers):
            self.weight[t].copy_(w)
        return self

    def forward(self, q: Tensor, layer: int) -> Tensor:
        return F.linear(q, self.weight[layer])  # (N, E)


class ContextEstimator(nn.Module):
    """x = [q_l, p] (N, 2D), p the previous token's normed state at layer t -> logits (N, E);
    with cfg.inputs = n, x is n such states side by side (N, nD), the first routed by the router.

    `threshold[t]` is the fail-safe threshold of predicted layer t (context.py): a guess whose
    confidence is below it is not run. -inf (never fall back) until calibrate chooses one.
    """

    def __init__(self, cfg: EstimatorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        L, E, X = cfg.num_layers, cfg.num_experts, cfg.inputs * cfg.hidden_size
        H = cfg.width  # D/m
        self.weight = nn.Parameter(torch.zeros(L, E, X))
        self.bias = nn.Parameter(torch.zeros(L, E))
        self.ff_in = nn.Parameter(torch.randn(L, H, X) / math.sqrt(X))
        self.ff_in_bias = nn.Parameter(torch.zeros(L, H))
        self.ff_out = nn.Parameter(torch.zeros(L, E, H))  # zero: untrained, the branch adds 0
        self.register_buffer("threshold", torch.full((L,), -math.inf))

    @torch.no_grad()
    def init_from_routers(self, routers: list[Tensor]) -> "ContextEstimator":
        """The q half from each layer's router (E, D), the rest zero: untrained, Router-PF."""
        D = self.cfg.hidden_size
        for t, w in enumerate(routers):
            self.weight[t, :, :D].copy_(w)
        return self

    def forward(self, x: Tensor, layer: int) -> Tensor:
        t = layer
        z = F.silu(F.linear(x, self.ff_in[t], self.ff_in_bias[t]))  # (N, D/m)
        return torch.addmm(self.bias[t], x, self.weight[t].T) + z @ self.ff_out[t].T  # (N, E)


def build_estimator(cfg: EstimatorConfig) -> nn.Module:
    kinds = {"estimator": Estimator, "linear": LinearEstimator}
    return kinds.get(cfg.kind, ContextEstimator)(cfg)  # context, preattention


def kl_to_router(true_logits: Tensor, logits: Tensor) -> Tensor:
    """Per token KL(softmax(true) || softmax(logits)), in nats: (N, E), (N, E) -> (N,)."""
    log_p = F.log_softmax(true_logits.float(), dim=-1)  # (N, E)
    log_q = F.log_softmax(logits.float(), dim=-1)  # (N, E)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


# Training data: for each predicted layer t, (q (M, D), the true router logits of layer t (M, E)).
Pairs = dict[int, tuple[Tensor, Tensor]]


@torch.no_grad()
def mean_kl(estimator: nn.Module, pairs: Pairs, batch: int = 4096) -> dict[int, float]:
    """Mean KL(router || estimator) per predicted layer, over all pairs."""
    out = {}
    for t, (q, true_logits) in pairs.items():
        total = sum(
            kl_to_router(true_logits[i : i + batch], estimator(q[i : i + batch], t)).sum().item()
            for i in range(0, q.shape[0], batch)
        )
        out[t] = total / q.shape[0]
    return out


def train_estimator(
    estimator: nn.Module,
    pairs: Pairs,
    steps: int,
    batch_size: int = 256,
    lr: float = 2e-3,
    seed: int = 0,
    desc: str = "estimator",
) -> list[float]:
    """Distil the router into `estimator` with AdamW and a cosine learning rate; return losses.

    Each step draws `batch_size` random pairs from every predicted layer and minimises the mean
    KL(router || estimator) over them, so every layer gets the same share of the training.
    """
    if steps < 1:
        raise TinyMoeError(f"estimator steps must be >= 1, got {steps}")
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(estimator.parameters(), lr=lr, weight_decay=0.0)
    estimator.train()
    losses: list[float] = []
    bar = Progress(steps, desc=desc)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        loss = torch.zeros(())
        for t, (q, true_logits) in pairs.items():
            idx = torch.randint(q.shape[0], (batch_size,), generator=gen)
            loss = loss + kl_to_router(true_logits[idx], estimator(q[idx], t)).mean()
        loss = loss / len(pairs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.update(1, info=f"KL {losses[-1]:.4f}")
    bar.close()
    estimator.eval()
    return losses
