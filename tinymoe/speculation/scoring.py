"""Scoring predictors and speculating over whole windows: what tinymoe.evaluate runs.

ScoringHook lets the true router decide every layer and scores any number of predictors and
lookaheads side by side in one forward. FirstPositionHook speculates with previous-token over
whole windows. forward_logits runs a model under either hook (or PredictionHook), over whole
windows or, stepwise, one position at a time through a KV cache as decoding does. Why the two
ways compute the same numbers: docs/speculation.md, "One forward per window".
"""

import time

import torch
from torch import Tensor

from tinymoe.engine.kvcache import KVCache
from tinymoe.engine.model import MoETransformer
from tinymoe.engine.moe import Routing, moe_forward
from tinymoe.speculation.context import Guess
from tinymoe.speculation.hook import speculates
from tinymoe.speculation.predictors import Predictor, recall_at_k


class ScoringHook:
    """Exact-mode route hook that runs many predictors side by side and scores their guesses.

    predictors: (name, lookahead) -> Predictor. Names in `on_hidden` are fed h_l = r_l + MoE_l(u)
    in place of r_l; h_l is computed here with the model's own moe_forward, so it is bit-identical
    to the state the next layer receives. Keys in `shifted` (previous-token, when each forward
    holds whole windows) are not run: their guess for position i is position i-1's true routing
    at the same layer, what previous-token predicts when decoding. Their predictor goes unused.

    log=True also keeps, per forward pass and layer, the true ids and each predictor's guess
    with what computing and reading it took: `log[pass][layer] = (ids, {name: (ids, seconds)})`
    (the simulator's routing trace, simulator/record.py).
    """

    def __init__(
        self,
        model: MoETransformer,
        predictors: dict[tuple[str, int], Predictor],
        on_hidden: set[str],
        shifted: set[tuple[str, int]] = frozenset(),
        log: bool = False,
    ) -> None:
        L, device = model.cfg.num_layers, model.embed_tokens.weight.device
        self.model, self.predictors, self.on_hidden = model, predictors, on_hidden
        self.shifted = set(shifted)
        self.pending: dict[tuple[str, int], dict[int, Routing]] = {k: {} for k in predictors}
        # Running sums on the device, read once at the end: scoring adds no host syncs.
        self.recall = {k: torch.zeros(L, dtype=torch.float64, device=device) for k in predictors}
        self.top1 = {k: torch.zeros(L, dtype=torch.float64, device=device) for k in predictors}
        self.tokens = torch.zeros(L, dtype=torch.long)  # tokens scored at each layer
        # Guesses that say when they are unsure (context.Guess): recall with the unsure ones
        # counted as exact (fail-safe speculation runs the router there), and how many were.
        self.safe = {k: torch.zeros(L, dtype=torch.float64, device=device) for k in predictors}
        self.unsure = {k: torch.zeros(L, dtype=torch.float64, device=device) for k in predictors}
        self.guarded: set[tuple[str, int]] = set()  # keys whose guesses were Guesses
        self.log: list[list[tuple[list[list[int]], dict]]] | None = [] if log else None

    def reset(self) -> None:
        for key, p in self.predictors.items():
            p.reset()
            self.pending[key].clear()

    def _score(self, key: tuple[str, int], layer: int, guess: Tensor, true: Tensor) -> None:
        """Add the recall and top-1 hits of guessed ids (n, K') against true ids (n, K)."""
        self.recall[key][layer] += recall_at_k(guess, true).sum()
        self.top1[key][layer] += (guess[:, 0] == true[:, 0]).sum()

    @torch.no_grad()
    def __call__(self, layer: int, resid: Tensor, u: Tensor, router) -> Routing:
        true = router(u)
        self.tokens[layer] += u.shape[0]
        for key in self.predictors:
            if key in self.shifted:  # position i's guess is position i-1's routing (B, T, K)
                if layer >= key[1]:
                    ids = true.ids.view(*resid.shape[:2], -1)
                    self._score(key, layer, ids[:, :-1].flatten(0, 1), ids[:, 1:].flatten(0, 1))
                continue
            guess = self.pending[key].pop(layer, None)
            if guess is not None:
                self._score(key, layer, guess.ids, true.ids)
            if isinstance(guess, Guess):
                self.guarded.add(key)
                recall = recall_at_k(guess.ids, true.ids)  # (n,)
                self.safe[key][layer] += torch.where(guess.sure, recall, 1.0).sum()
                self.unsure[key][layer] += (~guess.sure).sum()
        positions, resid = resid, resid.reshape(u.shape)  # (B, T, D), (N, D)
        hidden = None
        if self.on_hidden:
            cfg = self.model.cfg
            hidden = resid + moe_forward(u, true, self.model.provider, layer, cfg.expert_dim)
        guesses = {}
        for key, p in self.predictors.items():
            if key in self.shifted:
                continue
            state = hidden if key[0] in self.on_hidden else resid
            if getattr(p, "reads_positions", False):  # attention mixes positions: (B, T, D)
                state = positions
            t0 = time.perf_counter()
            nxt = p.observe(layer, state, u, true)
            if nxt is not None:
                self.pending[key][layer + p.lookahead] = nxt
                if self.log is not None:  # SYNC: reading it to the host is part of its cost
                    guesses[key[0]] = (nxt.ids.tolist(), time.perf_counter() - t0)
        if self.log is not None:
            if layer == 0:
                self.log.append([])
            self.log[-1].append((true.ids.tolist(), guesses))
        return true

    def rates(self) -> dict[str, dict[str, dict]]:
        """{name: {d: {recall, top1 (per layer; None where nothing is predicted), their means}}}"""
        out: dict[str, dict[str, dict]] = {}
        for name, d in self.predictors:
            n = self.tokens.clamp(min=1).double()
            # SYNC: reading the sums back, once per predictor, after the run.
            recall = [None] * d + (self.recall[(name, d)].cpu() / n)[d:].tolist()
            top1 = [None] * d + (self.top1[(name, d)].cpu() / n)[d:].tolist()
            out.setdefault(name, {})[str(d)] = {
                "recall": recall,
                "top1": top1,
                "mean_recall": sum(recall[d:]) / len(recall[d:]),
                "mean_top1": sum(top1[d:]) / len(top1[d:]),
            }
            if (name, d) in self.guarded:  # SYNC: as above
                safe = [None] * d + (self.safe[(name, d)].cpu() / n)[d:].tolist()
                unsure = [None] * d + (self.unsure[(name, d)].cpu() / n)[d:].tolist()
                out[name][str(d)].update(fail_safe_recall=safe, fallback=unsure)
        return out


class FirstPositionHook:
    """Speculating with previous-token over whole windows (B, T) in one forward.

    Decoding, previous-token routes layer t >= d of position i with what layer t of position
    i-1 used, and position 0 (no previous pass) with its router: so every position uses position
    0's routing at every layer >= d. Layers below d always route.
    """

    def __init__(self, lookahead: int) -> None:
        self.lookahead = lookahead

    def reset(self) -> None:
        pass

    def __call__(self, layer: int, resid: Tensor, u: Tensor, router) -> Routing:
        routing = router(u)  # position 0's guess is its own routing (it has no previous pass)
        if not speculates(True, "decode", layer, self.lookahead, routing):
            return routing
        B, T = resid.shape[:2]

        def first(x: Tensor) -> Tensor:  # (N, K) -> each window's position 0, repeated (N, K)
            return x.view(B, T, -1)[:, :1].expand(B, T, -1).reshape(B * T, -1)

        return Routing(first(routing.ids), first(routing.weights))


@torch.no_grad()
def forward_logits(model: MoETransformer, ids: Tensor, hook, stepwise: bool = False) -> Tensor:
    """ids (B, T) -> logits (B, T, V) in fp32, `hook` (reset first) deciding every routing.

    stepwise: one position at a time through a KV cache, exactly as decoding (the definition);
    otherwise one forward over the whole windows (see the module docstring)."""
    cfg, p = model.cfg, model.embed_tokens.weight
    ids = ids.to(p.device)
    if hook is not None:
        hook.reset()
    with model.routed_by(hook):
        if not stepwise:
            return model(ids).float()
        B, T = ids.shape
        cache = KVCache(cfg.num_layers, B, cfg.num_kv_heads, T, cfg.head_dim, p.device, p.dtype)
        steps = [model(ids[:, i : i + 1], cache=cache, start=i).float() for i in range(T)]
        return torch.cat(steps, dim=1)
