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
