"""The prediction hook: runs a predictor inside the forward pass and, speculating, routes with it.

The model calls its `route_hook` at every layer (model.py); this hook is the one the offloading
runtime installs (and tinymoe.evaluate uses on its own to measure what speculation costs).
"""

import torch
from torch import Tensor

from tinymoe.engine.moe import Routing
from tinymoe.speculation.context import Guess
from tinymoe.speculation.predictors import Predictor


def speculates(speculate: bool, phase: str, layer: int, lookahead: int, guess: object) -> bool:
    """The speculative decision: does `layer` run the guess it was given instead of its router?

    Only in speculative mode, only in a decode step (a prefill streams nearly every expert
    anyway, so a guess saves nothing there, and it would degrade the prompt's KV cache for
    good), only when there is a guess (None: nothing was predicted for this layer), and only
    from layer `lookahead` on: the first layers have nothing predicted from this forward pass
    (a guess a predictor carried over from the previous pass may prefetch, never route).
    """
    return speculate and phase == "decode" and guess is not None and layer >= lookahead


def fail_safe(guess: Guess, u: Tensor, router) -> tuple[Routing, Tensor | int]:
    """Where `speculates` said yes to a guess that knows how sure it is (context.Guess): the
    guess for its sure tokens, the router for the others. Returns (routing, tokens fell back).

    The accuracy cost is bounded by design: an unsure token routes exactly. One token (a decode
    step) reads its sureness with its ids (Guess.ids_on_host, read when it was prefetched), so
    the choice costs no sync of its own; more tokens (evaluate) mix rows on the device.
    """
    if u.shape[0] == 1:
        return (guess, 0) if guess.sure_on_host()[0] else (router(u), 1)
    true = router(u)
    sure = guess.sure.unsqueeze(1)  # (N, 1)
    ids = torch.where(sure, guess.ids, true.ids)  # (N, K)
    weights = torch.where(sure, guess.weights, true.weights)  # (N, K)
    return Routing(ids=ids, weights=weights), (~guess.sure).sum()


class PredictionHook:
    """A model route hook that runs a predictor and, in speculative mode, routes with it.

    At layer l: if speculating and a prediction for l exists, layer l uses it and its router is
    never computed; otherwise the router decides. Then the predictor observes layer l and its
    prediction for layer l + lookahead is kept in `pending` until that layer runs. The first
    `lookahead` layers always use their router: "layer 0 loads on demand". A predictor that
    crosses tokens may still predict them, from the previous forward pass (next_forward keeps
    those predictions); they only drive prefetching, never routing.

    The offloading runtime reads `pending[l + lookahead]` right after layer l to start copies; the
    evaluation code uses this hook alone, on resident experts, to measure what speculation costs.

    read_ids (the offloading runtime): the host needs both layer l's ids (to fetch its experts)
    and the prediction's (to prefetch them), so for a decode step both are read to the host in
    ONE transfer, and kept on the Routings (Routing.ids_on_host). `phase` is the forward
    pass's ("prefill" | "decode"; the runtime sets it per pass, OffloadRuntime._forward_start);
    a hook used on its own (tinymoe.evaluate) speculates at every position, as decoding does.
    """

    def __init__(
        self, predictor: Predictor | None, speculate: bool = False, read_ids: bool = False
    ) -> None:
        if speculate and predictor is None:
            raise ValueError("speculative execution needs a predictor")
        self.predictor = predictor
        self.speculate = speculate
        self.phase = "decode"
        self.read_ids = read_ids
        self.pending: dict[int, Routing] = {}  # target layer -> predicted routing (this forward)
        self.crosses_tokens = getattr(predictor, "crosses_tokens", False)
        # A predictor that mixes positions (preattention.py) is handed resid as (B, T, D).
        self.positions = getattr(predictor, "reads_positions", False)
        # What the hook calls after each layer. Exact mode only copies the guessed experts, so a
        # predictor that can name them without their weights (RouterPredictor.guess_ids) does.
        self.observe = None if predictor is None else predictor.observe
        if predictor is not None and not speculate:
            self.observe = getattr(predictor, "guess_ids", predictor.observe)
        self.last_prediction: dict[int, Routing] = {}  # layer -> the prediction that layer had
        # Fail-safe speculation's count: tokens x layers that ran a Guess, and that fell back
        # (a device tensor once rows were mixed; read with fallback_share(), after the run).
        self.guessed, self.fell_back = 0, 0

    def fallback_share(self) -> float | None:
        """The share of speculated (token, layer) guesses that fell back; None if none ran."""
        return None if not self.guessed else float(self.fell_back) / self.guessed  # SYNC: once

    def reset(self) -> None:
        self.pending.clear()
        self.last_prediction.clear()
        if self.predictor is not None:
            self.predictor.reset()

    def next_forward(self, num_layers: int) -> None:
        """A forward pass starts: predictions that crossed into it (target >= num_layers) become
        its own (target - num_layers); those for layers that never ran are dropped."""
        carried = {}
        if self.crosses_tokens:
            carried = {t - num_layers: r for t, r in self.pending.items() if t >= num_layers}
        self.pending = carried

    def __call__(self, layer: int, resid: Tensor, u: Tensor, router) -> Routing:
        predicted = self.pending.pop(layer, None)
        if predicted is not None:
            self.last_prediction[layer] = predicted
        else:
            self.last_prediction.pop(layer, None)
        lookahead = self.predictor.lookahead if self.predictor is not None else 0
        speculated = speculates(self.speculate, self.phase, layer, lookahead, predicted)
        if not speculated:
            routing = router(u)
        elif isinstance(predicted, Guess):  # a guess that may be unsure: fail safe
            routing, fell_back = fail_safe(predicted, u, router)
            self.guessed += u.shape[0]
            self.fell_back = self.fell_back + fell_back
        else:
            routing = predicted
        if self.observe is not None:
            state = resid if self.positions else resid.reshape(u.shape)  # (B, T, D) | (N, D)
            nxt = self.observe(layer, state, u, routing)
            if nxt is not None:
                self.pending[layer + lookahead] = nxt
                if self.read_ids and routing.host_ids is None and u.shape[0] == 1:
                    read_together(routing, nxt)
        return routing


def read_together(a: Routing, b: Routing) -> None:
    """Read two routings' ids to the host in one transfer (one sync instead of two); a Guess's
    sureness too (fail_safe reads it), as one more column of its rows (Guess.host_rows)."""
    n = a.ids.shape[0]
    b_rows = b.host_rows() if isinstance(b, Guess) else b.ids  # (N, K') or (N, K' + 1)
    if a.ids.shape[1] == b_rows.shape[1]:  # the usual case: both name top-k experts per token
        rows = torch.cat([a.ids, b_rows]).tolist()  # SYNC: the layer's one host read of ids
        a_rows, b_host = rows[:n], rows[n:]
    else:  # b names more (or fewer) columns than top-k: both read flattened, still once
        flat = torch.cat([a.ids.flatten(), b_rows.flatten()]).tolist()  # SYNC: as above
        ka, kb = a.ids.shape[1], b_rows.shape[1]
        a_rows = [flat[i : i + ka] for i in range(0, n * ka, ka)]
        b_host = [flat[i : i + kb] for i in range(n * ka, len(flat), kb)]
    a.host_ids = a_rows
    if isinstance(b, Guess):
        b.take_host_rows(b_host)
    else:
        b.host_ids = b_host
