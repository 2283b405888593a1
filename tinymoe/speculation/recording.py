"""Route recording: a route hook that lets the router decide and writes down what it saw.

Every tool that watches an exact run uses this one hook; only what it keeps differs:
    the oracle         each forward pass's routing, to replay it (`record_routing`, oracle.py)
    calibration        r_l, the routing and its logits, each expert's output sums (calibrate.py)
    training           the routings with their autograd graph, for the balance loss (train.py)
    train's evaluation how often each expert is routed to (model_card.py)
A hook that changes the routing (hook.py) or scores predictors (scoring.py) lives elsewhere.
"""

from collections.abc import Callable
from contextlib import AbstractContextManager

from torch import Tensor

from tinymoe.engine.model import MoETransformer
from tinymoe.engine.moe import Routing

# keep(layer, resid, u, routing): resid is r_l and u = RMSNorm_moe(r_l), both (N, D).
Keep = Callable[[int, Tensor, Tensor, Routing], None]


class RouteRecorder:
    """A model route hook: the router decides every layer, then `keep` is handed what it saw.

    Without a `keep`, the recorder keeps each layer's Routing as the router returned it (on its
    device; with its autograd graph when there is one): `forwards[f][l]` is layer l's routing in
    forward pass f. Clear `forwards` between passes when only the last one matters.
    """

    def __init__(self, keep: Keep | None = None) -> None:
        self.forwards: list[list[Routing]] = []  # [forward][layer], filled by the default keep
        self.keep = keep if keep is not None else self._keep_routing

    def _keep_routing(self, layer: int, resid: Tensor, u: Tensor, routing: Routing) -> None:
        if layer == 0:
            self.forwards.append([])
        self.forwards[-1].append(routing)

    def __call__(
        self, layer: int, resid: Tensor, u: Tensor, router: Callable[[Tensor], Routing]
    ) -> Routing:
        routing = router(u)
        self.keep(layer, resid.reshape(u.shape), u, routing)
        return routing

    def installed(self, model: MoETransformer) -> AbstractContextManager["RouteRecorder"]:
        """Be the model's route hook inside the `with`; the previous hook comes back after."""
        return model.routed_by(self)
