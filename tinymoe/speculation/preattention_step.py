"""The pre-attention predictor's decode step: one token (N = 1) in few operations.

PreAttentionPredictor.observe_reference (preattention.py) is the definition. At one token it
costs little arithmetic but ~100 small operations, each paying a fixed dispatch price, and a
decode step pays that after every layer. `DecodeStep` computes the same guess in ~45, into
preallocated buffers, reading the model's and the estimator's own weights (no copy of them:
on a real model they are the size of its attention, on the device the experts do not fit):

    x~  = r_l + g_E @ v[l]                       one addmm, g_E the routing weights over all E
    n   = x~ / rms(x~), p = prev / rms(prev)     one norm for both rows, the gains apart
    qkv = (g_attn * n) @ Wqkv^T                  input_layernorm's gain, then the projection
    q,k = q/k-normed, 1/sqrt(Dh) folded into q's gain (with no q/k norm or with clip_qkv, a
          multiply after); RoPE as qk * cos + swap(qk) * (-sin, sin), the halves swapped by
          two copies
    k,v -> the shadow cache; attention at T = 1 as two bmm, the GQA groups as (Hkv, G, Dh)
    s   = (x~ + a) / rms(x~ + a)
    f   = [s, n, p] * [g_post; g_post; g_post]   post_attention_layernorm's gain, one multiply
    logits = (f W^T + b) + silu(f U^T + c) V^T   the estimator, then one topk(K + 1): ids,
                                                 weights, margin

Every norm is RMSNorm's (over fp32 for a narrower model dtype), only reassociated, so in fp32
the guesses equal the reference's up to rounding (tests/test_predictor_preattention.py checks
ids, sureness and weights step by step, and the shadow cache and `previous` after a run).
Keys and values go into the very ShadowAttention cache the reference fills, so a prefill
through the reference and decode steps through here mix, and the cache grows the same way.
No host reads: positions are the Python ints ShadowAttention keeps.

What remains is mostly reading the weights (in fp32 ~0.9 MB a layer on the demo model, cold in
a decode step: the experts in between push them out of the caches). Folding the gains into
copies of the matrices would save three small multiplies, at the price of a second copy of
every target layer's q, k, v, o and estimator weights (for Mixtral-8x7B's 31 target layers,
2.6 GB of attention in bf16): not worth it.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from tinymoe.engine.kvcache import KVCache
from tinymoe.engine.moe import Routing, routing_weights_dtype
from tinymoe.speculation.context import Guess


class _Target(NamedTuple):
    """One target layer t's weights: views of the model's (model dtype) and the estimator's
    (its dtype), and a few gain vectors, the only copies."""

    g_attn: Tensor  # (D,) input_layernorm's gain
    wqkv: Tensor  # (D, (H + 2Hkv) Dh): qkv_proj's weight, transposed (a view)
    bqkv: Tensor | None  # ((H + 2Hkv) Dh,) with attention_bias
    gains: Tensor | None  # (1, (H + Hkv) Dh): q_norm's and k_norm's, 1/sqrt(Dh) in q's
    wo: Tensor  # (H Dh, D): o_proj's weight, transposed (a view)
    bo: Tensor | None  # (D,) with attention_bias
    dv: Tensor | None  # (E, D): the source layer's default vectors
    g_post: Tensor  # (1, 3D): post_attention_layernorm's gain, once per feature block
    W: Tensor  # (3D, E), b (E,): the estimator's linear part (views)
    b: Tensor
    U: Tensor  # (3D, Hd), c (Hd,): its feed-forward branch in ...
    c: Tensor
    V: Tensor  # (Hd, E): ... and out
    threshold: Tensor  # () a view of the estimator's: a threshold set later still counts


class DecodeStep:
    """PreAttentionPredictor's one-token observe in few operations (module docstring).

    Built for one predictor, on `like`'s device and dtype (the model's activations); call it as
    the predictor's observe at N = 1. The buffers are shared by all layers: what it returns and
    what it keeps (`previous`, the shadow cache) never points into them.
    """

    def __init__(self, predictor, like: Tensor) -> None:
        # Plain tensors even when built inside inference_mode (a decode step's), so that the
        # buffers may be written outside it too.
        with torch.inference_mode(False), torch.no_grad():
            self._build(predictor, like)

    def _build(self, predictor, like: Tensor) -> None:
        self.p = predictor
        cfg = self.cfg = predictor.model.cfg
        dev, md, ed = like.device, like.dtype, predictor.dtype  # model and estimator dtypes
        self.dtype, self.device = md, dev
        D, H, Hkv, Dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        E, K, nqk = cfg.num_experts, cfg.top_k, (H + Hkv) * Dh
        self.same = md == ed  # then x~ and s are computed straight into the feature buffer
        self.wdtype = routing_weights_dtype(cfg, md)
        self.eps = torch.full((1, 1), cfg.rms_norm_eps, dtype=torch.float32, device=dev)
        # 1/sqrt(Dh) into the q/k norm's gain, unless there is none or the clamp comes between
        self.fold_scale = cfg.clip_qkv is None and cfg.qk_norm != "none"
        self.scale = Dh**-0.5  # SDPA's default
        self.q_scale = torch.tensor(self.scale, dtype=md, device=dev)
        # Buffers, and the views of them the step uses (taking a view is an operation too).
        self.gE = torch.zeros(1, E, dtype=md, device=dev)  # the routing weights over all E
        # raw: [x~; prev] (2, D); feats: [s, n, p] (3, D), the estimator's input.
        self.raw = torch.zeros(2, D, dtype=ed, device=dev)
        self.raw_x, self.raw_p = self.raw[:1], self.raw[1:]  # (1, D) each
        self.feats = torch.zeros(3, D, dtype=ed, device=dev)
        self.s, self.n, self.np = self.feats[:1], self.feats[1:2], self.feats[1:]
        self.feats_row = self.feats.view(1, 3 * D)
        self.n_attn = torch.zeros(1, D, dtype=md, device=dev)  # g_attn * n: what qkv reads
        self.qkv = torch.zeros(1, nqk + Hkv * Dh, dtype=md, device=dev)
        self.qk_flat, self.q_flat = self.qkv[:, :nqk], self.qkv[:, : H * Dh]
        self.qk_heads = self.qk_flat.view(H + Hkv, Dh)  # q heads, then k heads
        self.q_groups = self.qk_heads[:H].view(Hkv, H // Hkv, Dh)  # (Hkv, G, Dh): GQA groups
        self.rot = torch.zeros(H + Hkv, Dh, dtype=md, device=dev)  # rotate-half of qk_heads
        half = Dh // 2
        self.rot_lo, self.rot_hi = self.rot[:, :half], self.rot[:, half:]
        self.qk_lo, self.qk_hi = self.qk_heads[:, :half], self.qk_heads[:, half:]
        self.k_new = self.qk_heads[H:].view(Hkv, 1, Dh)
        self.v_new = self.qkv[:, nqk:].view(Hkv, 1, Dh)
        # q/k norm rows, each normalised on its own: Qwen3's heads; OLMoE's q and k whole
        if cfg.qk_norm == "head":
            self.qk_rows = [(self.qk_heads, 1 / Dh)]
        elif cfg.qk_norm == "full" and Hkv == H:
            self.qk_rows = [(self.qk_flat.view(2, H * Dh), 1 / (H * Dh))]
        elif cfg.qk_norm == "full":  # q and k of different lengths: two rows apart
            k_flat = self.qkv[:, H * Dh : nqk]
            self.qk_rows = [(self.q_flat, 1 / (H * Dh)), (k_flat, 1 / (Hkv * Dh))]
        else:
            self.qk_rows = []
        self.y = torch.zeros(Hkv, H // Hkv, Dh, dtype=md, device=dev)  # attention output
        self.y_row = self.y.view(1, H * Dh)
        Hd = predictor.estimator.ff_in.shape[1]
        self.zW = torch.zeros(1, E, dtype=ed, device=dev)
        self.zU = torch.zeros(1, Hd, dtype=ed, device=dev)
        self.top = torch.zeros(1, K + 1, dtype=ed, device=dev)
        self.top_ids = torch.zeros(1, K + 1, dtype=torch.long, device=dev)
        self.top_k = self.top[:, :K], self.top_ids[:, :K]
        self.kth, self.next = self.top[:, K - 1], self.top[:, K]  # (1,) each: the margin's ends
        d = predictor.lookahead
        self.targets = {t: self._target(t, t - d, dev, md, ed) for t in range(d, cfg.num_layers)}
        self.cache: KVCache | None = None  # the shadow cache the views below are of
        self.views: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
        self.cos: tuple[Tensor, ...] = ()  # the shadow's RoPE table, one (Dh,) view a row
        self.sin: tuple[Tensor, ...] = ()

    def _target(self, t: int, src: int, dev, md: torch.dtype, ed: torch.dtype) -> _Target:
        """Target layer t's weights, read by source layer src; md, ed: model, estimator dtype.
        Views where the weights already are on `dev` in their dtype (the model's, when `like`
        is its activations), so that nothing big is copied."""
        cfg, est, p = self.cfg, self.p.estimator, self.p
        H = cfg.num_heads
        blk = p.model.layers[t]
        att = blk.self_attn
        gains = None
        if cfg.qk_norm != "none":
            gq, gk = att.q_norm.weight.to(dev, md), att.k_norm.weight.to(dev, md)
            if cfg.qk_norm == "head":
                gq, gk = gq.repeat(H), gk.repeat(cfg.num_kv_heads)
            gains = torch.cat((gq * self.scale if self.fold_scale else gq, gk)).unsqueeze(0)
        bqkv, bo, dv = att.qkv_proj.bias, att.o_proj.bias, p.default_vectors
        return _Target(
            g_attn=blk.input_layernorm.weight.to(dev, md),
            wqkv=att.qkv_proj.weight.to(dev, md).T,
            bqkv=None if bqkv is None else bqkv.to(dev, md),
            gains=gains,
            wo=att.o_proj.weight.to(dev, md).T,
            bo=None if bo is None else bo.to(dev, md),
            dv=None if dv is None else dv[src].to(dev, md),
            g_post=blk.post_attention_layernorm.weight.to(dev, ed).repeat(3).unsqueeze(0),
            W=est.weight[t].to(dev, ed).T,
            b=est.bias[t].to(dev, ed),
            U=est.ff_in[t].to(dev, ed).T,
            c=est.ff_in_bias[t].to(dev, ed),
            V=est.ff_out[t].to(dev, ed).T,
            threshold=est.threshold[t],
        )

    @torch.inference_mode(False)
    def _bind(self, cache: KVCache) -> None:
        """Views of a (new) shadow cache: per target layer k, v (Hkv, max_len, Dh) and k^T;
        and its RoPE table's rows."""
        self.cache = cache
        k, v = cache.k[:, 0], cache.v[:, 0]  # (L, Hkv, max_len, Dh): the one sequence
        self.views = {t: (k[t], v[t], k[t].transpose(1, 2)) for t in self.targets}
        cos, sin = self.p.shadow.rope
        half = sin.shape[1] // 2
        signed = torch.cat((-sin[:, :half], sin[:, half:]), dim=1)  # (max_len, Dh)
        self.cos, self.sin = cos.unbind(0), signed.unbind(0)

    def __call__(self, layer: int, resid: Tensor, routing: Routing) -> Guess | None:
        """observe at one token; call it without autograd (observe does: no_grad costs ~1 us,
        inference_mode, a decode step's, already is)."""
        p, cfg = self.p, self.cfg
        t = layer + p.lookahead
        r = resid.reshape(1, -1)  # (1, D)
        before = p.previous.get(t) if t < cfg.num_layers else None
        p.previous[layer] = r.clone()  # as the reference: (a compiled step may reuse resid)
        if t >= cfg.num_layers:
            return None
        w = self.targets[t]
        # x~ = r + sum_k g_k v[l, e_k]  (1, D), and the previous token's r_t beside it
        if w.dv is None:
            x = r
            self.raw_x.copy_(r)
        else:
            g = routing.weights if routing.weights.dtype == self.dtype else routing.weights.to(r)
            # over all E, not the K rows picked: one read in order beats K scattered ones
            gE = self.gE.zero_().scatter_add_(1, routing.ids, g)  # (1, E)
            if self.same:
                x = torch.addmm(r, gE, w.dv, out=self.raw_x)
            else:
                x = torch.addmm(r, gE, w.dv)
                self.raw_x.copy_(x)
        if before is None:  # a sequence's first position: p = 0
            self.raw_p.zero_()
        else:  # after a prefill, its last row
            self.raw_p.copy_(before if before.shape[0] == 1 else before[-1])
        # n and p: both rows normalised at once (their gains come later)
        nrm = torch.linalg.vector_norm(self.raw, dim=1, keepdim=True)  # (2, 1)
        rs = torch.addcmul(self.eps, nrm, nrm, value=1 / cfg.hidden_size).rsqrt_()
        torch.mul(self.raw, rs, out=self.np)
        n = self.n if self.same else self.n.to(self.dtype)  # (1, D)
        # q, k, v of layer t (input_layernorm's gain after the cast, as RMSNorm); q/k norm; RoPE
        qkv = self.qkv
        n_attn = torch.mul(n, w.g_attn, out=self.n_attn)
        if w.bqkv is None:
            torch.mm(n_attn, w.wqkv, out=qkv)
        else:
            torch.addmm(w.bqkv, n_attn, w.wqkv, out=qkv)
        for rows, inv in self.qk_rows:
            nq = torch.linalg.vector_norm(rows, dim=1, keepdim=True, dtype=torch.float32)
            rows.mul_(torch.addcmul(self.eps, nq, nq, value=inv).rsqrt_())
        if w.gains is not None:
            self.qk_flat.mul_(w.gains)
        if cfg.clip_qkv is not None:
            qkv.clamp_(-cfg.clip_qkv, cfg.clip_qkv)
        if not self.fold_scale:
            self.q_flat.mul_(self.q_scale)
        cache, start = p.shadow.claim(t, 1, 1, r)  # position `start` of layer t, one sequence
        if cache is not self.cache:
            self._bind(cache)
        # RoPE: qk * cos + cat(-qk2, qk1) * sin, the halves swapped by two copies and the
        # sign kept in the sine table (-sin, sin)
        self.rot_lo.copy_(self.qk_hi)
        self.rot_hi.copy_(self.qk_lo)
        self.qk_heads.mul_(self.cos[start]).addcmul_(self.rot, self.sin[start])
        # k and v into the shadow cache; attention at T = 1 over its S positions
        kc, vc, kT = self.views[t]  # (Hkv, max_len, Dh), ..., (Hkv, Dh, max_len)
        kc.narrow(1, start, 1).copy_(self.k_new)
        vc.narrow(1, start, 1).copy_(self.v_new)
        S = start + 1
        a = torch.bmm(self.q_groups, kT.narrow(2, 0, S)).softmax(-1)  # (Hkv, G, S)
        torch.bmm(a, vc.narrow(1, 0, S), out=self.y)  # (Hkv, G, Dh)
        # s = Norm_t(x~ + Attention_t)
        if self.same:
            s = torch.addmm(x, self.y_row, w.wo, out=self.s)
        else:
            s = self.s
            s.copy_(torch.addmm(x, self.y_row, w.wo))
        if w.bo is not None:
            s.add_(w.bo)
        nrm = torch.linalg.vector_norm(s, dim=1, keepdim=True)
        s.mul_(torch.addcmul(self.eps, nrm, nrm, value=1 / cfg.hidden_size).rsqrt_())
        # the estimator on f = [s, n, p] * g_post: logits = (f W^T + b) + silu(f U^T + c) V^T
        f = self.feats_row.mul_(w.g_post)  # (1, 3D)
        torch.addmm(w.b, f, w.W, out=self.zW)
        torch.addmm(w.c, f, w.U, out=self.zU)
        logits = torch.addmm(self.zW, F.silu(self.zU, inplace=True), w.V)  # (1, E)
        torch.topk(logits, cfg.top_k + 1, out=(self.top, self.top_ids))  # K, and one more
        top, ids = self.top_k
        if cfg.norm_topk_prob:  # softmax over all E, top K, renormalised = softmax of the top K
            weights = top.softmax(-1)
        else:
            weights = (top - logits.logsumexp(-1, keepdim=True)).exp_()
        if weights.dtype != self.wdtype:
            weights = weights.to(self.wdtype)
        sure = torch.sub(self.kth, self.next) >= w.threshold  # (1,): the margin clears it
        return Guess(ids=ids.clone(), weights=weights, sure=sure)
