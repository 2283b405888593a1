"""Expert predictors: guess the routing of layer l+d from what layer l has computed.

The offloading runtime calls a predictor after each layer's routing is decided. The prediction
drives prefetching (exact mode) or replaces the router (speculative mode).
"""

from typing import Protocol

from torch import Tensor

from tinymoe.model import Routing


class Predictor(Protocol):
    """Predicts layer `layer + lookahead`'s routing from layer `layer`'s state.

    Called once per layer per forward pass, in layer order, after that layer's routing is decided
    (by the router, or by an earlier prediction in speculative mode):
        resid:   r_l, the residual stream after attention, before the MoE output is added (N, D)
        u:       RMSNorm_moe(r_l), what layer l's router reads (N, D)
        routing: layer l's routing (ids (N, K), weights (N, K))
    Returns a Routing for layer `layer + lookahead` over the same N tokens (logits may be None),
    or None when there is nothing to predict (the target is past the last layer).
    """

    lookahead: int

    def reset(self) -> None:
        """Forget per-sequence state; called at the start of every generation."""
        ...

    def observe(self, layer: int, resid: Tensor, u: Tensor, routing: Routing) -> Routing | None: ...


class PredictionHook:
    """A model route hook that runs a predictor and, in speculative mode, routes with it.

    At layer l: if speculating and a prediction for l exists, layer l uses it and its router is
    never computed; otherwise the router decides. Then the predictor observes layer l and its
    prediction for layer l + lookahead is kept in `pending` until that layer runs. Layers with no
    prediction (the first `lookahead` layers) always use their router: "layer 0 loads on demand".

    The offloading runtime reads `pending[l + lookahead]` right after layer l to start copies; the
    evaluation code uses this hook alone, on resident experts, to measure what speculation costs.
    """

    def __init__(self, predictor: Predictor | None, speculate: bool = False) -> None:
        if speculate and predictor is None:
            raise ValueError("speculative execution needs a predictor")
        self.predictor = predictor
        self.speculate = speculate
        self.pending: dict[int, Routing] = {}  # target layer -> predicted routing (this forward)
        self.last_prediction: dict[int, Routing] = {}  # layer -> the prediction that layer had

    def reset(self) -> None:
        self.pending.clear()
        self.last_prediction.clear()
        if self.predictor is not None:
            self.predictor.reset()

    def __call__(self, layer: int, resid: Tensor, u: Tensor, router) -> Routing:
        predicted = self.pending.pop(layer, None)
        if predicted is not None:
            self.last_prediction[layer] = predicted
        else:
            self.last_prediction.pop(layer, None)
        routing = predicted if (self.speculate and predicted is not None) else router(u)
        if self.predictor is not None:
            nxt = self.predictor.observe(layer, resid.reshape(u.shape), u, routing)
            if nxt is not None:
                self.pending[layer + self.predictor.lookahead] = nxt
        return routing
