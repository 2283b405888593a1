"""Expert predictors: guess the routing of layer l+d from what layer l has computed.

The offloading runtime calls a predictor after each layer's routing is decided. The prediction
drives prefetching (exact mode) or replaces the router (speculative mode). docs/speculation.md
explains each predictor. Notation (the paper's), for source layer l and target layer t = l + d:

    r_l   the residual stream after layer l's attention, before its MoE output is added (N, D)
    g, e  layer l's routing weights and experts                                         (N, K)
    v     default vectors: v[l, e] is the mean output of expert e at layer l           (L, E, D)
    d_l   = sum_k g_k * v[l, e_k], a cheap stand-in for layer l's MoE output           (N, D)
    q_l   = Norm_t(r_l + d_l), the quasi-hidden state; Norm_t is layer t's pre-MoE norm (N, D)

The predictors:
    RouterPredictor         Router-PF: layer t's own router applied to q_l (d_l optional)
    EstimatorPredictor      a small learned network (estimator.py) from q_l to layer t's logits
    HybridPredictor         the estimator on chosen layers, the router on the others
    PreviousTokenPredictor  layer t's experts of the previous token, a naive baseline
    ContextPredictor        beyond the paper (context.py): q_l and the previous token's state at
                            layer t, through a learned model; its guesses say when they are unsure
    PreAttentionPredictor   the context predictor plus layer t's attention run early on the
                            stand-in state r_l + d_l (preattention.py)
`make_predictor` builds any predictor by name, these from the calibration files (calibration.py)
and the oracle (oracle.py, a bound, not a method) from a recorded run.
"""

import sys
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tinymoe.engine.model import MoETransformer
from tinymoe.engine.moe import Routing, route_topk, routing_weights_dtype
from tinymoe.errors import TinyMoeError
from tinymoe.speculation.calibration import Calibration
from tinymoe.speculation.oracle import OraclePredictor

# The predictors that work on any text. make_predictor also builds "oracle", which replays a
# recorded run of the very same prompt.
PREDICTOR_NAMES = (
    "router",
    "router-nodefault",
    "estimator",
    "linear-estimator",
    "hybrid",
    "previous-token",
    "context",
    "preattention",
)


class Predictor(Protocol):
    """Predicts layer `layer + lookahead`'s routing from layer `layer`'s state.

    Called once per layer per forward pass, in layer order, after that layer's routing is decided
    (by the router, or by an earlier prediction in speculative mode):
        resid:   r_l, the residual stream after attention, before the MoE output is added (N, D)
        u:       RMSNorm_moe(r_l), what layer l's router reads (N, D)
        routing: layer l's routing (ids (N, K), weights (N, K))
    Returns a Routing for layer `layer + lookahead` over the same N tokens (logits may be None),
    or None when there is nothing to predict (the target is past the last layer).

    A predictor may set `crosses_tokens = True` (only the oracle does, oracle.py): then
    a target t >= L (num_layers) is a prediction for layer t - L of the NEXT forward pass.

    It may also have `guess_ids(layer, resid, u, routing)`, the same guess's experts alone
    (weights None), cheaper: exact prefetch, which never runs a guess, calls it instead of
    observe (PredictionHook; RouterPredictor has one).
    """

    lookahead: int

    def reset(self) -> None:
        """Forget per-sequence state; called at the start of every generation."""
        ...

    def observe(self, layer: int, resid: Tensor, u: Tensor, routing: Routing) -> Routing | None: ...


# ---------------------------------------------------------------- the quasi-hidden state


def quasi_hidden(
    model: MoETransformer,
    default_vectors: Tensor | None,
    layer: int,
    target: int,
    resid: Tensor,
    routing: Routing,
) -> Tensor:
    """q_l = Norm_t(r_l + d_l), with d_l = sum_k g_k * v[l, e_k] (d_l = 0 without vectors).

    r_l + d_l approximates h_l, layer l's output, before its experts have run: the routing
    weights are known, only each expert's actual output is replaced by its calibrated mean.
    """
    x = stand_in(default_vectors, layer, resid, routing)  # (N, D)
    return model.layers[target].post_attention_layernorm(x)  # (N, D)


def stand_in(default_vectors: Tensor | None, layer: int, resid: Tensor, routing: Routing) -> Tensor:
    """r_l + d_l, the stand-in for h_l that q_l normalises (resid itself without vectors)."""
    if default_vectors is None:
        return resid  # (N, D)
    v = default_vectors[layer][routing.ids]  # (N, K, D)
    return resid + (routing.weights.to(v.dtype).unsqueeze(-1) * v).sum(dim=1)  # (N, D)


def check_lookahead(lookahead: int, num_layers: int) -> None:
    """Every predictor looks 1 to L - 1 layers ahead; a TinyMoeError names the range."""
    if not 1 <= lookahead < num_layers:
        raise TinyMoeError(
            f"lookahead must be between 1 and {num_layers - 1} (the model has {num_layers} "
            f"layers), got {lookahead}"
        )


def _on_model(model: MoETransformer, default_vectors: Tensor | None) -> Tensor | None:
    """Check default vectors (L, E, D) against the model; move them to its device and dtype."""
    if default_vectors is None:
        return None
    cfg = model.cfg
    expected = (cfg.num_layers, cfg.num_experts, cfg.hidden_size)
    if tuple(default_vectors.shape) != expected:
        raise TinyMoeError(
            f"default vectors have shape {tuple(default_vectors.shape)}, expected "
            f"{expected} (layers, experts, hidden) for this model"
        )
    p = model.embed_tokens.weight
    return default_vectors.to(p.device, p.dtype)


def _as_prediction(routing: Routing) -> Routing:
    """Drop the logits: by the Routing convention, a predicted routing has logits None."""
    return Routing(ids=routing.ids, weights=routing.weights)


# ---------------------------------------------------------------- predictors


class RouterPredictor:
    """Router-PF: layer t's own router applied to the quasi-hidden state q_l, t = l + lookahead.

    `default_vectors` (L, E, D) from calibration; None gives d_l = 0 ("router-nodefault").
    For lookahead > 1 the same r_l + d_l goes through layer t's norm and router, ignoring the
    layers in between. Fed the true post-MoE hidden state h_l in place of r_l (and no default
    vectors), it is the "router on the full hidden state" reference tinymoe.evaluate scores.

    `observe` is the definition (quasi_hidden, then layer t's router: ids and weights); exact
    prefetch, which only needs the experts, runs `guess_ids`, the same choice in four tensor
    operations (see there), tested to agree with `observe`.
    """

    def __init__(
        self, model: MoETransformer, default_vectors: Tensor | None = None, lookahead: int = 1
    ) -> None:
        check_lookahead(lookahead, model.cfg.num_layers)
        self.model, self.lookahead = model, lookahead
        self.default_vectors = _on_model(model, default_vectors)
        self._folded: list[tuple[Tensor, Tensor | None]] | None = None  # guess_ids', made once

    def reset(self) -> None:
        pass  # stateless: every token is predicted from its own state

    # (No torch.no_grad() here: every tensor it makes from is grad-free, and the decorator alone
    # costs as much as an operation, on every layer of every step.)
    def observe(self, layer: int, resid: Tensor, u: Tensor, routing: Routing) -> Routing | None:
        target = layer + self.lookahead
        if target >= self.model.cfg.num_layers:
            return None
        q = quasi_hidden(self.model, self.default_vectors, layer, target, resid, routing)
        return _as_prediction(self.model.layers[target].mlp.route(q))  # (N, K)

    def guess_ids(self, layer: int, resid: Tensor, u: Tensor, routing: Routing) -> Routing | None:
        """`observe`'s experts without its weights (None), for exact prefetch, which copies
        experts and never runs the guess. Why it is the same choice: layer t's router ranks
        W_t (gain_t * x / rms(x)), and a token's positive 1/rms(x) ranks nothing, so the
        top-K of W'_t x, with W'_t = W_t * gain_t, are the same experts. With x = r_l + d_l that
        is W'_t r_l + sum_k g_k P_l[e_k], where P_l = v_l W'_t^T (E x E) is fixed: one matmul, one
        row gather, one batched multiply-add and a top-K, against ~17 operations for `observe`.
        Only rounding differs (fp32 here), so a near-tie may rank differently;
        tests/test_predict.py measures how often the two disagree.
        """
        target = layer + self.lookahead
        if target >= self.model.cfg.num_layers:
            return None
        if self._folded is None:
            self._folded = self._fold()
        w, p = self._folded[layer]  # (E, D), (E, E) or None
        logits = F.linear(resid if resid.dtype == w.dtype else resid.to(w.dtype), w)  # (N, E)
        if p is not None:  # + the default vectors' share, d_l's logits: sum_k g_k P_l[e_k]
            g = routing.weights if routing.weights.dtype == w.dtype else routing.weights.to(w.dtype)
            ids = routing.ids
            if ids.shape[0] == 1:  # a decode step: (1, E) += (1, K) @ (K, E), in one call
                logits = torch.addmm(logits, g, p.index_select(0, ids.view(-1)))
            else:  # (N, 1, E) += (N, 1, K) @ (N, K, E)
                logits = torch.baddbmm(logits.unsqueeze(1), g.unsqueeze(1), p[ids]).squeeze(1)
        return Routing(ids=torch.topk(logits, self.model.cfg.top_k, dim=-1).indices, weights=None)

    def _fold(self) -> list[tuple[Tensor, Tensor | None]]:
        """Per source layer l: (W'_t, P_l) for guess_ids, in fp32, from the model as it is now."""
        folded = []
        for layer in range(self.model.cfg.num_layers - self.lookahead):
            block = self.model.layers[layer + self.lookahead]
            w = block.mlp.gate.weight.float() * block.post_attention_layernorm.weight.float()
            v = self.default_vectors
            folded.append((w, None if v is None else v[layer].float() @ w.T))  # (E, E)
        return folded


class EstimatorPredictor:
    """A learned estimator (estimator.py) maps q_l to layer t's router logits; then top-K.

    The estimator must have been trained for this lookahead: it learned pairs (q_{t-d}, t).
    It runs in its own dtype (fp32) on the model's device; the weights come back in the
    activation dtype, renormalised the way the model renormalises its router's.
    """

    def __init__(
        self,
        model: MoETransformer,
        estimator: nn.Module,
        default_vectors: Tensor | None,
        lookahead: int = 1,
    ) -> None:
        check_lookahead(lookahead, model.cfg.num_layers)
        self.model, self.lookahead = model, lookahead
        self.default_vectors = _on_model(model, default_vectors)
        self.estimator = estimator.to(model.embed_tokens.weight.device).eval()
        self.dtype = next(estimator.parameters()).dtype

    def reset(self) -> None:
        pass

    @torch.no_grad()
    def observe(self, layer: int, resid: Tensor, u: Tensor, routing: Routing) -> Routing | None:
        target = layer + self.lookahead
        if target >= self.model.cfg.num_layers:
            return None
        q = quasi_hidden(self.model, self.default_vectors, layer, target, resid, routing)
        logits = self.estimator(q.to(self.dtype), target)  # (N, E)
        cfg = self.model.cfg
        dtype = routing_weights_dtype(cfg, resid.dtype)  # as the model routes (fp32: Mixtral)
        return _as_prediction(route_topk(logits, cfg.top_k, cfg.norm_topk_prob, dtype))


class HybridPredictor:
    """Hybrid-PF: the estimator for the target layers in `estimator_layers`, the router elsewhere.

    tinymoe.calibrate picks those layers: where the router's hit rate is low and the estimator's is
    higher on held-out calibration text.
    """

    def __init__(
        self, router: RouterPredictor, estimator: EstimatorPredictor, estimator_layers: set[int]
    ) -> None:
        if router.lookahead != estimator.lookahead:
            raise ValueError("hybrid: router and estimator must share one lookahead")
        self.router, self.estimator = router, estimator
        self.estimator_layers = set(estimator_layers)
        self.lookahead = router.lookahead

    def reset(self) -> None:
        self.router.reset()
        self.estimator.reset()

    def observe(self, layer: int, resid: Tensor, u: Tensor, routing: Routing) -> Routing | None:
        use_estimator = layer + self.lookahead in self.estimator_layers
        chosen = self.estimator if use_estimator else self.router
        return chosen.observe(layer, resid, u, routing)


class PreviousTokenPredictor:
    """Predicts that layer t uses what layer t used in the previous forward pass.

    At batch 1 during decoding that is "the previous token's experts". Rows are matched when the
    previous pass had the same number of tokens (one new token per sequence, as in a batched
    decode); otherwise every token gets the previous pass's last token's experts (the first
    decode step after a prefill). The first pass after reset() has no prediction: None.

    In speculative mode layer t's "used" routing is this prediction itself, so after the prompt
    the experts never change again: that is what a naive predictor costs.
    """

    def __init__(self, num_layers: int, lookahead: int = 1) -> None:
        check_lookahead(lookahead, num_layers)
        self.num_layers, self.lookahead = num_layers, lookahead
        self.previous: dict[int, Routing] = {}  # layer -> routing of the last pass

    def reset(self) -> None:
        self.previous.clear()

    def observe(self, layer: int, resid: Tensor, u: Tensor, routing: Routing) -> Routing | None:
        target = layer + self.lookahead
        # Layer `target` has not run in this pass yet, so previous[target] is the last pass's.
        before = self.previous.get(target) if target < self.num_layers else None
        self.previous[layer] = _as_prediction(routing)
        if before is None:
            return None
        N = resid.shape[0]
        if before.ids.shape[0] == N:
            return before
        return Routing(
            ids=before.ids[-1:].expand(N, -1),  # (N, K)
            weights=before.weights[-1:].expand(N, -1),  # (N, K)
        )


# ---------------------------------------------------------------- scoring and the factory


def recall_at_k(predicted: Tensor, true: Tensor) -> Tensor:
    """Per token, the share of the true top-K experts found among the predicted ones.

    predicted (N, K'), true (N, K) expert ids -> (N,) in [0, 1].
    """
    found = (true.unsqueeze(-1) == predicted.unsqueeze(-2)).any(dim=-1)  # (N, K)
    return found.float().mean(dim=-1)


def make_predictor(
    name: str,
    model: MoETransformer,
    calibration: Calibration | None = None,
    lookahead: int = 1,
    *,
    recording: list[list[Routing]] | None = None,
) -> Predictor:
    """Build the predictor called `name` (one of PREDICTOR_NAMES, or "oracle") for `model`.

    `calibration` is what tinymoe.calibrate saved (read it with calibration.load_speculation);
    None when the checkpoint has none: then `router` runs with d_l = 0 and says so on stderr, and
    the learned predictors raise TinyMoeError. "oracle" replays `recording`, the routing of a
    resident run of the same prompt and settings (oracle.record_routing).
    """
    cfg = model.cfg
    check_lookahead(lookahead, cfg.num_layers)
    if name == "oracle":
        if recording is None:
            raise TinyMoeError(
                "predictor 'oracle' needs the recorded routing of a resident run "
                "(oracle.record_routing)"
            )
        return OraclePredictor(recording, lookahead)
    if name not in PREDICTOR_NAMES:
        raise TinyMoeError(
            f"unknown predictor {name!r}; expected one of {', '.join(PREDICTOR_NAMES)} or oracle"
        )
    if name == "previous-token":
        return PreviousTokenPredictor(cfg.num_layers, lookahead)
    if name == "router-nodefault":
        return RouterPredictor(model, None, lookahead)
    if name == "router":
        if calibration is None:
            print(
                "warning: no speculation calibration for this checkpoint; the router predictor "
                "runs without default vectors (d_l = 0). Run `python -m tinymoe.calibrate "
                "--model DIR --text FILE` to create them.",
                file=sys.stderr,
            )
            return RouterPredictor(model, None, lookahead)
        return RouterPredictor(model, calibration.default_vectors, lookahead)
    if calibration is None:
        raise TinyMoeError(
            f"predictor {name!r} needs trained estimators, and this checkpoint has no "
            "speculation.safetensors; run `python -m tinymoe.calibrate --model DIR --text FILE`"
        )
    if name in ("context", "preattention"):
        # (context.py and preattention.py import this module)
        from tinymoe.speculation.context import ContextPredictor
        from tinymoe.speculation.preattention import PreAttentionPredictor

        kind = ContextPredictor if name == "context" else PreAttentionPredictor
        return kind(
            model, calibration.estimator(name, lookahead), calibration.default_vectors, lookahead
        )
    kind = "linear" if name == "linear-estimator" else "estimator"
    estimator = EstimatorPredictor(
        model, calibration.estimator(kind, lookahead), calibration.default_vectors, lookahead
    )
    if name != "hybrid":
        return estimator
    if lookahead not in calibration.hybrid_layers:
        raise TinyMoeError(
            f"speculation.json: no hybrid layers chosen for lookahead {lookahead}; recalibrate"
        )
    router = RouterPredictor(model, calibration.default_vectors, lookahead)
    return HybridPredictor(router, estimator, set(calibration.hybrid_layers[lookahead]))
