"""The context predictor, beyond the paper: q_l plus the previous token's state at layer t.

Router-PF, the estimators and even the router fed the true h_l all miss layer t's experts on
the same tokens: what they cannot see is layer t's attention, which mixes in the tokens before.
Temporal locality gives a cheap view of it: the previous token's residual state at layer t,
r_t of position i - 1, which the predictor kept when it observed that layer one pass earlier.
So the context predictor routes layer t from

    x = [q_l, Norm_t(r_t of the previous token)]    (N, 2D); zeros for the previous half at a
                                                     sequence's first position
    logits = ContextEstimator_t(x)                   (estimator.py: linear + small FF branch)

trained by distillation on calibration text like the other estimators (calibrate.py).

It also says how sure it is, so that speculation can fail safe: the confidence of a guess is the
margin between its K-th and (K+1)-th logit (a near-tie at the boundary is where top-K guesses go
wrong), and a guess below its layer's threshold (chosen by calibrate on held-back calibration
text) is marked unsure. hook.py runs the router instead for an unsure guess (`fail_safe`).
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from tinymoe.engine.model import MoETransformer
from tinymoe.engine.moe import Routing, route_topk, routing_weights_dtype
from tinymoe.speculation.estimator import (
    EstimatorConfig,
    Pairs,
    build_estimator,
    mean_kl,
    train_estimator,
)
from tinymoe.speculation.exact_run import ExactRunRecord
from tinymoe.speculation.predictors import EstimatorPredictor, quasi_hidden, recall_at_k

if TYPE_CHECKING:
    from tinymoe.calibrate import CalibrationSettings


@dataclass
class Guess(Routing):
    """A predicted routing that knows, per token, whether it is sure enough to be run."""

    sure: Tensor | None = None  # (N,) bool: confidence at or above the layer's threshold
    host_sure: list[bool] | None = None  # `sure` as read to the host, with the ids (one read)

    def host_rows(self) -> Tensor:
        """(N, K + 1): the ids and, last, the sureness: what one host read takes."""
        return torch.cat([self.ids, self.sure.long().unsqueeze(1)], dim=1)

    def take_host_rows(self, rows: list[list[int]]) -> None:
        """host_rows() as read to the host -> host_ids and host_sure."""
        self.host_ids = [r[:-1] for r in rows]
        self.host_sure = [bool(r[-1]) for r in rows]

    def ids_on_host(self) -> list[list[int]]:
        if self.host_ids is None:
            # SYNC: the ids and sureness in one read, as Routing's ids alone
            self.take_host_rows(self.host_rows().tolist())
        return self.host_ids

    def sure_on_host(self) -> list[bool]:
        self.ids_on_host()
        return self.host_sure


def margin(logits: Tensor, k: int) -> Tensor:
    """A guess's confidence per token: the K-th largest logit minus the (K+1)-th. (N, E) -> (N,)"""
    top = logits.topk(k + 1, dim=-1).values  # (N, K + 1)
    return top[:, k - 1] - top[:, k]


def choose_threshold(confidence: Tensor, recall: Tensor, target: float) -> float:
    """The lowest threshold whose fail-safe recall reaches `target` on held-back tokens.

    confidence, recall (n,): each token's confidence and its guess's recall@k. A token below the
    threshold falls back to the router, recall 1; the threshold is the smallest confidence
    that keeps the mean at or above `target` (-inf: no token needs to fall back).
    """
    order = confidence.argsort()
    c, r = confidence[order].double(), recall[order].double()
    n = r.numel()
    # With the j least confident falling back: (j + sum of the others' recall) / n.
    kept = r.flip(0).cumsum(0).flip(0)  # kept[j] = sum r[j:]
    effective = (torch.arange(n, dtype=torch.float64) + kept) / n  # (n,)
    ok = (effective >= target).nonzero()
    if ok.numel() == 0:
        return float("inf")  # every token falls back
    j = int(ok[0])
    return float("-inf") if j == 0 else float(c[j])


class ContextPredictor(EstimatorPredictor):
    """The context predictor (module docstring): a Predictor whose guesses are `Guess`es.

    State: each layer's r_l of the previous forward pass (rows matched when the pass has as many
    tokens, otherwise its last token's, as after a prefill), so it reads the previous position:
    `reads_previous_position` tells tinymoe.evaluate to feed it one position at a time.
    """

    reads_previous_position = True

    def __init__(self, *args, **kwargs) -> None:  # EstimatorPredictor's, plus the state
        super().__init__(*args, **kwargs)
        self.previous: dict[int, Tensor] = {}  # layer -> r_l of the last pass (n, D)

    def reset(self) -> None:
        self.previous.clear()

    @torch.no_grad()
    def observe(self, layer: int, resid: Tensor, u: Tensor, routing: Routing) -> Guess | None:
        cfg = self.model.cfg
        target = layer + self.lookahead
        # Layer `target` has not run in this pass yet, so previous[target] is the last pass's.
        before = self.previous.get(target) if target < cfg.num_layers else None
        self.previous[layer] = resid.clone()  # (a compiled step may reuse resid's memory)
        if target >= cfg.num_layers:
            return None
        q = quasi_hidden(self.model, self.default_vectors, layer, target, resid, routing)  # (N, D)
        return self.guess([q, self.previous_state(target, before, q)], target, resid.dtype)

    def previous_state(self, target: int, before: Tensor | None, like: Tensor) -> Tensor:
        """Norm_t(r_t of the previous position) (N, D), rows matched to `like` (N, D): zeros at a
        sequence's first position; after a prefill, its last token's for every row."""
        if before is None:
            return torch.zeros_like(like)
        N = like.shape[0]
        before = before if before.shape[0] == N else before[-1:].expand(N, -1)
        return self.model.layers[target].post_attention_layernorm(before)

    def guess(self, features: list[Tensor], target: int, state_dtype: torch.dtype) -> Guess:
        """The estimator on the features (each (N, D)) side by side: top-K as the model routes
        (weights in routing_weights_dtype), and per row whether the margin clears the threshold."""
        cfg = self.model.cfg
        logits = self.estimator(torch.cat(features, dim=-1).to(self.dtype), target)  # (N, E)
        dtype = routing_weights_dtype(cfg, state_dtype)  # as the model routes (fp32: Mixtral)
        guess = route_topk(logits, cfg.top_k, cfg.norm_topk_prob, dtype)
        sure = margin(logits, cfg.top_k) >= self.estimator.threshold[target]  # (N,)
        return Guess(ids=guess.ids, weights=guess.weights, sure=sure)


# ---------------------------------------------------------------- calibration (calibrate.py)


@torch.no_grad()
def context_pairs(
    model: MoETransformer, dv: Tensor, run: ExactRunRecord, lookahead: int, seq_len: int
) -> Pairs:
    """Training pairs from an exact run of windows of `seq_len` tokens: for each target layer
    t >= d, ([q_{t-d}, Norm_t(r_t of the previous position)] (M, 2D) fp32, true logits (M, E)).
    A window's first position gets zeros for the second half, as a sequence's first does live.
    """
    w = model.embed_tokens.weight
    dv = dv.to(w.device, w.dtype)
    pairs: Pairs = {}
    for t in range(lookahead, model.cfg.num_layers):
        l = t - lookahead
        resid = run.resid[l].to(w.device, w.dtype)
        q = quasi_hidden(model, dv, l, t, resid, run.routing(l, w.device))  # (M, D)
        r = run.resid[t].to(w.device, w.dtype).view(-1, seq_len, q.shape[-1])  # (B, T, D)
        r = torch.cat([torch.zeros_like(r[:, :1]), r[:, :-1]], dim=1)  # position i: r_t of i-1
        p = model.layers[t].post_attention_layernorm(r).flatten(0, 1)  # (M, D); Norm(0) = 0
        pairs[t] = (torch.cat([q, p], dim=-1).float(), run.logits[t].to(w.device))
    return pairs


@torch.no_grad()
def fail_safe_thresholds(est: nn.Module, pairs: Pairs, top_k: int, target: float) -> dict:
    """Per predicted layer: the threshold (set on `est`), the share that falls back, the recall
    of the guesses alone and with the fallback counted as exact, on held-back pairs."""
    out = {}
    for t, (x, true) in pairs.items():
        logits = est(x, t)
        recall = recall_at_k(logits.topk(top_k).indices, true.topk(top_k).indices)  # (M,)
        confidence = margin(logits, top_k)
        est.threshold[t] = choose_threshold(confidence, recall, target)
        sure = confidence >= est.threshold[t]
        out[t] = {
            "threshold": est.threshold[t].item(),
            "fallback": 1 - sure.float().mean().item(),
            "recall": recall.mean().item(),
            "fail_safe_recall": torch.where(sure, recall, 1.0).mean().item(),
        }
    return out


def train_context(
    model: MoETransformer,
    dv: Tensor,
    run: ExactRunRecord,
    held: ExactRunRecord,
    s: "CalibrationSettings",
    seq_len: int,
    kind: str = "context",
    make_pairs: Callable[..., Pairs] = context_pairs,
    inputs: int = 2,
) -> tuple[dict[int, nn.Module], dict[int, dict], dict[str, dict]]:
    """calibrate's step 5 for every lookahead of `s`: {d: trained estimator with its thresholds},
    {d: {t: fail-safe figures on held-back text}}, and the validation KL before and after.
    The pre-attention predictor (preattention.py) is trained the same way from its own pairs:
    `kind` "preattention", `make_pairs` its pairs (same arguments), `inputs` 3."""
    cfg = model.cfg
    ests, fail_safe, kl = {}, {}, {}
    for d in s.lookaheads:
        train = make_pairs(model, dv, run, d, seq_len)
        val = make_pairs(model, dv, held, d, seq_len)
        ecfg = EstimatorConfig(
            kind, cfg.hidden_size, cfg.num_experts, cfg.num_layers, s.reduction, s.ffn_mult, inputs
        )
        torch.manual_seed(s.seed)
        est = build_estimator(ecfg).to(train[d][0].device)
        est.init_from_routers([layer.mlp.gate.weight.float() for layer in model.layers])
        before = mean_kl(est, val)
        train_estimator(est, train, s.steps, s.batch_size, s.lr, s.seed, f"{kind} d={d}")
        after = mean_kl(est, val)
        kl[f"{kind}@{d}"] = {
            "val_kl_before": sum(before.values()) / len(before),
            "val_kl_after": sum(after.values()) / len(after),
        }
        fail_safe[d] = fail_safe_thresholds(est, val, cfg.top_k, s.fail_safe_recall)
        ests[d] = est.cpu()
    return ests, fail_safe, kl
