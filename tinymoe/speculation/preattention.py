"""The pre-attention predictor: run layer t's own attention early, on the stand-in state.

What every other predictor misses is layer t's attention (docs/speculation.md): r_t = x_t +
Attention_t(x_t, the positions before), and x_t = h_l is not known before layer l's experts run.
But its stand-in r_l + d_l (the one q_l normalises) is, and so is every earlier position's. So
the predictor keeps a *shadow* KV cache per target layer, filled with layer t's keys and values
of the stand-ins (never the model's own cache: that one holds the true states, and this
predictor must not depend on the runtime's), and runs layer t's attention module on the current
stand-in (pre-attention prediction, as in arXiv 2511.10676):

    x~    = r_l + d_l                                   (B, T, D) stand-in for x_t = h_l
    s     = Norm_t(x~ + Attention_t(x~ | shadow cache)) the stand-in of u_t, what t's router reads
    x     = [s, q_l, Norm_t(r_t of the previous token)] (N, 3D)
    logits = ContextEstimator_t(x)                      (estimator.py, inputs = 3)

It is a ContextPredictor (context.py) with one more input: the same state of the previous token,
the same confidence and fail-safe thresholds, trained by calibrate the same way (kind
"preattention"). Attention mixes positions, so `observe` needs them apart: the hook hands it
resid as (B, T, D) (`reads_positions`).

A decode step (one token) takes a fast path with the same result, preattention_step.py: what
this file computes in ~100 small operations, it computes in ~45, on the same weights.
"""

import torch
from torch import Tensor

from tinymoe.engine.kvcache import KVCache
from tinymoe.engine.model import MoETransformer, rope_cos_sin
from tinymoe.engine.moe import Routing
from tinymoe.speculation.context import ContextPredictor, Guess
from tinymoe.speculation.estimator import Pairs
from tinymoe.speculation.exact_run import ExactRunRecord
from tinymoe.speculation.preattention_step import DecodeStep
from tinymoe.speculation.predictors import stand_in


class ShadowAttention:
    """Layer t's attention over the predictor's own cache of stand-in states, per target layer.

    Positions are counted per target layer from the last reset; the cache grows (doubling) as a
    sequence does. `__call__(t, x)` appends x's keys and values (B, T, D) at the next positions
    of layer t and returns Attention_t(Norm_attn,t(x)) (B, T, D), causal over the cache.
    `claim` is how any writer (this, and the decode fast path) takes those positions.
    """

    def __init__(self, model: MoETransformer) -> None:
        self.model = model
        self.cache: KVCache | None = None
        self.length: dict[int, int] = {}  # target layer -> positions in its shadow cache
        # cos, sin (max_len, Dh): its own table, not the model's (model._rope_rows), which a
        # longer shadow cache would rebuild under a compiled step that holds its address.
        self.rope: tuple[Tensor, Tensor] | None = None

    def reset(self) -> None:
        self.cache, self.rope = None, None
        self.length.clear()

    def _room(self, B: int, end: int, x: Tensor) -> KVCache:
        """The cache, with room for `end` positions of its B sequences (else a bigger copy)."""
        cfg, old = self.model.cfg, self.cache
        if old is not None and old.max_len >= end:
            return old
        size = max(256, end, 2 * old.max_len if old is not None else 0)
        new = KVCache(cfg.num_layers, B, cfg.num_kv_heads, size, cfg.head_dim, x.device, x.dtype)
        if old is not None:
            new.k[..., : old.max_len, :].copy_(old.k)
            new.v[..., : old.max_len, :].copy_(old.v)
        positions = torch.arange(size, device=x.device)
        self.rope = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, x.dtype)
        self.cache = new
        return new

    def claim(self, t: int, B: int, T: int, like: Tensor) -> tuple[KVCache, int]:
        """The next T positions of layer t for B sequences, counted as written: (the cache, with
        room for them, and the first of them). Another batch size starts new sequences."""
        if self.cache is not None and self.cache.k.shape[1] != B:
            self.reset()  # another batch: new sequences
        start = self.length.get(t, 0)
        cache = self._room(B, start + T, like)
        self.length[t] = start + T
        return cache, start

    @torch.no_grad()
    def __call__(self, t: int, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        cache, start = self.claim(t, B, T, x)
        cos, sin = self.rope[0][start : start + T], self.rope[1][start : start + T]
        mask = None  # T = 1: every cached position; start = 0: plain causal (Attention's rule)
        if T > 1 and start > 0:  # (T, S) bool: position start + i sees 0 .. start + i
            j = torch.arange(start + T, device=x.device)
            mask = j.unsqueeze(0) <= (start + torch.arange(T, device=x.device)).unsqueeze(1)
        block = self.model.layers[t]
        return block.self_attn(block.input_layernorm(x), cos, sin, mask, cache, t, start)


class PreAttentionPredictor(ContextPredictor):
    """The pre-attention predictor (module docstring): a ContextPredictor whose first input is
    layer t's attention run early on the stand-in state. State: the shadow cache, and (as the
    context predictor) each layer's r_l of the previous pass.

    `observe` at one token (B * T = 1, a decode step) takes a fast path, DecodeStep
    (preattention_step.py): the same guess, built at the first such call on views of the
    model's and the estimator's weights and copies of their gains (replace a weight tensor or
    change a gain after it, and set `_step = None` to build it again). `observe_reference` is
    the definition, which every other call takes;
    `fast_decode = False` (an attribute, or the constructor's keyword) makes every call take it.
    """

    reads_positions = True  # observe takes resid as (B, T, D): attention needs the positions

    def __init__(self, *args, fast_decode: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)  # ContextPredictor's, plus the shadow cache
        self.shadow = ShadowAttention(self.model)
        self.fast_decode = fast_decode
        self._step: DecodeStep | None = None  # built at the first one-token observe

    def reset(self) -> None:
        super().reset()
        self.shadow.reset()

    def observe(self, layer: int, resid: Tensor, u: Tensor, routing: Routing) -> Guess | None:
        if self.fast_decode and resid.numel() == resid.shape[-1]:  # one token
            step = self._step
            if step is None or step.dtype != resid.dtype or step.device != resid.device:
                step = self._step = DecodeStep(self, resid)
            if torch.is_grad_enabled():
                with torch.no_grad():
                    return step(layer, resid, routing)
            return step(layer, resid, routing)
        return self.observe_reference(layer, resid, u, routing)

    @torch.no_grad()
    def observe_reference(
        self, layer: int, resid: Tensor, u: Tensor, routing: Routing
    ) -> Guess | None:
        """The definition (module docstring): any B and T, resid (B, T, D) or (N, D)."""
        cfg = self.model.cfg
        target = layer + self.lookahead
        B, T = resid.shape[:2] if resid.dim() == 3 else (1, resid.shape[0])  # (N, D): one row
        r = resid.reshape(B * T, -1)  # (N, D)
        before = self.previous.get(target) if target < cfg.num_layers else None
        self.previous[layer] = r.clone()  # (a compiled step may reuse resid's memory)
        if target >= cfg.num_layers:
            return None
        x = stand_in(self.default_vectors, layer, r, routing)  # (N, D)
        a = self.shadow(target, x.view(B, T, -1)).reshape(B * T, -1)  # (N, D)
        norm = self.model.layers[target].post_attention_layernorm
        p = self.previous_state(target, before, x)  # (N, D)
        return self.guess([norm(x + a), norm(x), p], target, r.dtype)  # features (N, 3D)


@torch.no_grad()
def preattention_pairs(
    model: MoETransformer, dv: Tensor, run: ExactRunRecord, lookahead: int, seq_len: int
) -> Pairs:
    """Training pairs from an exact run of windows of `seq_len` tokens: for each target layer
    t >= d, ([s, q_{t-d}, Norm_t(r_t of the previous position)] (M, 3D) fp32, true logits
    (M, E)), s made by the very ShadowAttention the predictor runs, each window a sequence."""
    w = model.embed_tokens.weight
    dv = dv.to(w.device, w.dtype)
    pairs: Pairs = {}
    for t in range(lookahead, model.cfg.num_layers):
        l = t - lookahead
        resid = run.resid[l].to(w.device, w.dtype)  # (M, D)
        x = stand_in(dv, l, resid, run.routing(l, w.device)).view(-1, seq_len, resid.shape[-1])
        a = torch.cat([ShadowAttention(model)(t, xb) for xb in x.split(32)])  # (B, T, D)
        norm = model.layers[t].post_attention_layernorm
        r = run.resid[t].to(w.device, w.dtype).view(x.shape)  # (B, T, D)
        r = torch.cat([torch.zeros_like(r[:, :1]), r[:, :-1]], dim=1)  # position i: r_t of i-1
        features = [norm(x + a), norm(x), norm(r)]  # each (B, T, D); Norm(0) = 0
        pairs[t] = (torch.cat(features, dim=-1).flatten(0, 1).float(), run.logits[t].to(w.device))
    return pairs
