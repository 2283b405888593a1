"""The oracle: replays the routing of a recorded resident run, a perfect predictor.

It is an upper bound, not a method: valid only for the same prompt and generation settings as the
recording (then exactness makes the offloaded run route identically). `record_routing` makes the
recording; `OraclePredictor` replays it one layer (or `lookahead` layers) ahead.
"""

from torch import Tensor

from tinymoe.engine.generate import GenerationResult, generate
from tinymoe.engine.model import MoETransformer
from tinymoe.engine.moe import Routing
from tinymoe.errors import TinyMoeError
from tinymoe.speculation.recording import RouteRecorder


def record_routing(
    model: MoETransformer, input_ids: list[int], max_new_tokens: int, **generate_kwargs
) -> tuple[GenerationResult, list[list[Routing]]]:
    """Generate with resident experts and record the routing, for OraclePredictor to replay."""
    with RouteRecorder().installed(model) as recorder:
        out = generate(model, input_ids, max_new_tokens, **generate_kwargs)
    return out, recorder.forwards


class OraclePredictor:
    """Predicts layer l + lookahead's routing perfectly, by replaying a recorded resident run.

    Unlike a real predictor it crosses tokens: for a target t >= L it predicts layer t - L of the
    next recorded forward pass (None after the last one), so even layer 0 is prefetched. That
    makes it a bound for Eq. 1, which counts layer 0.
    """

    crosses_tokens = True  # see the Predictor protocol

    def __init__(self, forwards: list[list[Routing]], lookahead: int = 1) -> None:
        num_layers = len(forwards[0]) if forwards else None
        if num_layers is not None and not 1 <= lookahead < num_layers:
            # Past L - 1 the target would skip a whole forward pass: no predictor looks that far.
            raise TinyMoeError(
                f"lookahead must be between 1 and {num_layers - 1} (the model has {num_layers} "
                f"layers), got {lookahead}"
            )
        self.forwards, self.lookahead = forwards, lookahead
        self.step = -1  # which forward pass of the recording we are in

    def reset(self) -> None:
        self.step = -1

    def observe(self, layer: int, resid: Tensor, u: Tensor, routing: Routing) -> Routing | None:
        if layer == 0:
            self.step += 1
        step, target = self.step, layer + self.lookahead
        if step < len(self.forwards) and target >= len(self.forwards[step]):
            step, target = step + 1, target - len(self.forwards[step])  # the next forward pass
        if step >= len(self.forwards):
            return None  # the end of the recording: no next forward
        true = self.forwards[step][target]
        if step == self.step and true.ids.shape[0] != u.shape[0]:
            raise TinyMoeError(
                f"oracle: forward {self.step} has {u.shape[0]} tokens, the recording "
                f"{true.ids.shape[0]}; record the routing with the same prompt and settings"
            )
        return Routing(true.ids, true.weights)
