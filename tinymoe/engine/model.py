"""The decoder: one readable forward pass shared by Mixtral, OLMoE and Qwen3-MoE.

Dimension legend (used in every shape comment in tinymoe):
    B  batch                      T  new tokens in this step      S  cached + new positions
    D  hidden size                H  query heads                  Hkv key/value heads
    Dh head dim (may != D/H)      V  vocabulary                   N  B*T tokens, flattened
    E  experts per layer          K  experts activated per token  I  expert (SwiGLU) width
    L  layers

Per layer (pre-norm residual):
    r = x + Attention(RMSNorm_attn(x))          r: "residual after attention" (the paper's r_l)
    u = RMSNorm_moe(r)                          the pre-MoE norm; the router reads u
    x = r + sum_k g_k * Expert_{e_k}(u)         g, e: top-K of softmax(router(u))

Routing and the MoE layer (the router, top-K, running the experts) are in moe.py, with the seam
the offloading and speculation code use: a `route_hook` and an `ExpertProvider`. With neither
set, this file is the plain resident reference every fast path is tested against.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tinymoe.engine.config import ModelConfig
from tinymoe.engine.experts import ExpertProvider, ResidentExperts
from tinymoe.engine.kvcache import KVCache
from tinymoe.engine.moe import MoE, RouteHook, moe_forward
from tinymoe.errors import TinyMoeError


def rms_normalize(x: Tensor, eps: float) -> Tensor:
    """x / sqrt(mean(x^2) + eps) over the last dim, computed in fp32, returned in x's dtype.

    (Not yet scaled by a weight: see RMSNorm.) The casts are skipped, not called, in fp32: a
    decode step pays per operation, even for one that would return its input.
    """
    xf = x if x.dtype == torch.float32 else x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return y if y.dtype == x.dtype else y.to(x.dtype)


class RMSNorm(nn.Module):
    """RMS norm over the last dim with a learned scale: `weight` (dim,), `eps` a float."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        """x (..., dim) -> weight * x / sqrt(mean(x^2) + eps), the mean over the last dim.

        Normalised in fp32 and cast back to x's dtype *before* the scale by weight, the order
        Hugging Face uses, so bf16 results match transformers bit for bit.
        """
        return self.weight * rms_normalize(x, self.eps)


def rope_cos_sin(
    positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """cos, sin of shape (T, Dh) for the "rotate-half" convention Hugging Face checkpoints use.

    Position p's angle for pair i (i < Dh/2) is p * theta^(-2i/Dh), the same in both halves of a
    head; computed in fp32 whatever `dtype`, then cast.
    """
    inv_freq = 1.0 / theta ** (
        torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim
    )
    freqs = positions.float()[:, None] * inv_freq[None, :]  # (T, Dh/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, Dh)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (B, heads, T, Dh); rotate each head's halves by the position's angles."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D, H, Hkv, Dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        bias = cfg.attention_bias
        # q, k and v as ONE ((H + 2*Hkv) * Dh, D) matrix, rows q then k then v: one matmul
        # instead of three. The loader fills its row blocks from the checkpoint's q_proj, k_proj
        # and v_proj (save_model splits them again).
        self.qkv_proj = nn.Linear(D, (H + 2 * Hkv) * Dh, bias=bias)
        self.o_proj = nn.Linear(H * Dh, D, bias=bias)
        if cfg.qk_norm == "full":  # OLMoE: one norm over the whole projection, before the split
            self.q_norm = RMSNorm(H * Dh, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(Hkv * Dh, cfg.rms_norm_eps)
        elif cfg.qk_norm == "head":  # Qwen3: one norm per head, shared across heads
            self.q_norm = RMSNorm(Dh, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(Dh, cfg.rms_norm_eps)

    def norm_qk(self, qk: Tensor) -> Tensor:
        """q and k normed, in one call where the rows allow: qk (B, T, (H + Hkv) * Dh) -> same.

        The reference is self.q_norm(q) and self.k_norm(k) apart (the "full" case with H != Hkv
        still does that). Otherwise q and k are viewed as G rows of equal length, normalised
        together, then scaled by each row's weight: "full" (H == Hkv) is two rows of H * Dh,
        "head" is H + Hkv rows of Dh (q's weight for the H query heads, k's for the rest).
        Element for element the arithmetic is RMSNorm.forward's, so the bits are the same.
        """
        cfg = self.cfg
        B, T, _ = qk.shape
        H, Hkv, Dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        wq, wk = self.q_norm.weight, self.k_norm.weight
        if cfg.qk_norm == "head":
            w = torch.cat((wq.expand(H, Dh), wk.expand(Hkv, Dh)))  # (H + Hkv, Dh)
        elif Hkv == H:
            w = torch.stack((wq, wk))  # (2, H * Dh)
        else:
            q, k = qk.split((H * Dh, Hkv * Dh), dim=-1)
            return torch.cat((self.q_norm(q), self.k_norm(k)), dim=-1)
        rows = qk.view(B, T, *w.shape)  # (B, T, G, row)
        return (w * rms_normalize(rows, self.q_norm.eps)).view(B, T, -1)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None,
        cache: KVCache | None,
        layer: int,
        start: int,
    ) -> Tensor:
        cfg = self.cfg
        B, T, _ = x.shape
        H, Hkv, Dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        qkv = self.qkv_proj(x)  # (B, T, (H + 2*Hkv) * Dh): q, k, v side by side
        qk, v = qkv.split(((H + Hkv) * Dh, Hkv * Dh), dim=-1)
        if cfg.qk_norm != "none":  # OLMoE's over the whole projection, Qwen3's per head
            qk = self.norm_qk(qk)
        if cfg.clip_qkv is not None:  # OLMoE: after the q/k norm, on q, k and v alike
            qk, v = qk.clamp(-cfg.clip_qkv, cfg.clip_qkv), v.clamp(-cfg.clip_qkv, cfg.clip_qkv)
        qk = qk.view(B, T, H + Hkv, Dh).transpose(1, 2)  # (B, H + Hkv, T, Dh)
        v = v.view(B, T, Hkv, Dh).transpose(1, 2)  # (B, Hkv, T, Dh)
        qk = apply_rope(qk, cos, sin)  # q and k heads rotated in one go
        q, k = qk[:, :H], qk[:, H:]  # (B, H, T, Dh), (B, Hkv, T, Dh)
        if cache is not None:
            k, v = cache.update(layer, start, k, v)  # (B, Hkv, S, Dh) each
        # mask None means "plain causal over a fresh sequence"; otherwise a boolean (T, S) mask.
        causal, gqa = mask is None and T > 1, Hkv < H  # gqa: grouped-query attention
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa
        )  # (B, H, T, Dh)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, D)


@torch.compiler.disable
def outside_graph(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args), run eagerly even when the forward pass is compiled (generate(compile=True)).

    For the code the model calls but does not own: a route hook or an offloading provider reads
    ids to the host, keeps Python state and times itself, none of which belongs in a graph. In
    eager mode this is a plain call. (Each call cuts the compiled step: see
    MoETransformer._layers_with_host_calls.)
    """
    return fn(*args)


def _call(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg)


class MoETransformer(nn.Module):
    """Embeddings, L blocks, final norm and LM head. Module names mirror the HF checkpoint keys."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.experts = ResidentExperts(cfg.num_layers, cfg.num_experts, cfg.expert_numel)
        # Who decides routing (None: each layer's router) and where experts come from (see
        # `provider`). Plain attributes, not submodules: a runtime is not part of the weights.
        self.route_hook: RouteHook | None = None
        self._provider: ExpertProvider | None = None
        self._rope: tuple[Tensor, Tensor] | None = None  # cos, sin (n, Dh) for positions < n
        self.compiled: dict[str, Callable[..., Tensor]] = {}  # generate.compiled_forward's
        # True during the decode steps generate(compile=True) keeps out of TPOT (the one that
        # compiles; with CUDA graphs, the one that records too: generate.warmup_steps): a
        # runtime's meter files those passes apart, as the GenerationResult keeps them apart.
        self.compiling = False

    @contextmanager
    def routed_by(self, hook: RouteHook) -> Iterator[RouteHook]:
        """`hook` decides every layer's routing inside the `with`; the previous one comes back."""
        previous, self.route_hook = self.route_hook, hook
        try:
            yield hook
        finally:
            self.route_hook = previous

    @property
    def provider(self) -> ExpertProvider:
        """Where the MoE layers get experts: the resident ones, unless a runtime installed one."""
        return self.experts if self._provider is None else self._provider

    @provider.setter
    def provider(self, p: ExpertProvider | None) -> None:
        # None means the resident experts. (An nn.Module provider would be registered as a
        # submodule by nn.Module.__setattr__ before reaching here: pass plain objects.)
        self._provider = p

    @torch.no_grad()
    def init_weights(self, seed: int = 0, std: float = 0.02) -> "MoETransformer":
        """Random init for training and tests: N(0, std) matrices, unit norms (GPT-2 style)."""
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
        return self

    def forward(
        self, input_ids: Tensor, cache: KVCache | None = None, start: int | Tensor = 0
    ) -> Tensor:
        """input_ids (B, T) at positions start..start+T-1 -> logits (B, T, V).

        Without a cache this is a full causal forward. With one, k/v are appended at `start`.
        start may also be a (1,) long tensor, for one new token (T = 1) with a cache: the
        static-shape decode step (see `_static_step`), which the compiled decode uses.
        """
        B, T = input_ids.shape
        x = self.embed_tokens(input_ids)  # (B, T, D)
        if isinstance(start, Tensor):
            cos, sin, mask = self._static_step(start, T, cache, x)
        else:
            pos = torch.arange(start, start + T, device=x.device)  # (T,)
            cos, sin = self._rope_rows(start, T, max(start + T, cache.max_len if cache else 0), x)
            mask = self._mask(pos, start + T, x.device)
        if self.route_hook is None and self._provider is None:
            for i, layer in enumerate(self.layers):
                x = self._layer(i, layer, x, cos, sin, mask, cache, start)  # (B, T, D)
        else:  # the same layers, in a loop of their own (see _layers_with_host_calls)
            x = self._layers_with_host_calls(x, cos, sin, mask, cache, start)  # (B, T, D)
        return self.lm_head(self.norm(x))  # (B, T, V)

    def _layer(
        self,
        i: int,
        layer: Block,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None,
        cache: KVCache | None,
        start: int | Tensor,
    ) -> Tensor:
        """Layer i (its Block passed in, not looked up: see _layers_with_host_calls): x -> x."""
        B, T, _ = x.shape
        # ---- attention ----
        r = x + layer.self_attn(layer.input_layernorm(x), cos, sin, mask, cache, i, start)
        # ---- routing ----
        u = layer.post_attention_layernorm(r).view(B * T, -1)  # (N, D)
        # (outside_graph only while compiling: in eager mode its wrapper is pure host time)
        host_call = outside_graph if torch.compiler.is_compiling() else _call
        if self.route_hook is None:
            routing = layer.mlp.route(u)
        else:
            routing = host_call(self.route_hook, i, r, u, layer.mlp.route)
        # ---- experts ----
        if self._provider is None:  # resident
            y = moe_forward(u, routing, self.experts, i, self.cfg.expert_dim)  # (N, D)
        else:
            y = host_call(moe_forward, u, routing, self._provider, i, self.cfg.expert_dim)
        return r + y.view(B, T, -1)  # (B, T, D)

    def _layers_with_host_calls(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None,
        cache: KVCache | None,
        start: int | Tensor,
    ) -> Tensor:
        """The layer loop when a route hook or a provider is installed: forward's, in a function
        of its own for torch.compile. Dynamo cannot resume a graph cut inside a loop
        (outside_graph cuts every layer twice), so it runs the function holding the loop
        eagerly, and for good: the mark is on the code, so were that forward, every later
        compiled forward of the process, resident ones included, would run eagerly too. Here
        only this loop does, and each `_layer` it calls compiles in pieces around the two host
        calls. The Block is passed in because `self.layers[i]` would specialise those
        graphs on i, compiling them once per layer, past dynamo's recompile limit (8) on a real
        model; as it is, each compiles twice (layer 0, then i symbolic) whatever L
        (tests/test_cuda_path.py runs 48 layers)."""
        for i, layer in enumerate(self.layers):
            x = self._layer(i, layer, x, cos, sin, mask, cache, start)
        return x

    def _rope_rows(self, start: int, T: int, length: int, x: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin (T, Dh) for positions start..start+T-1, rows of a table of `length` rows.

        The angles of a position never change, so they are computed once per generation (the
        table covers the whole KV cache), not once per step; a longer sequence rebuilds it.
        """
        cos = self._rope[0] if self._rope is not None else None
        if cos is None or len(cos) < length or cos.dtype != x.dtype or cos.device != x.device:
            positions = torch.arange(length, device=x.device)
            self._rope = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        cos, sin = self._rope
        return cos[start : start + T], sin[start : start + T]

    def _static_step(
        self, start: Tensor, T: int, cache: KVCache | None, x: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """cos, sin (1, Dh) at position start, a (1,) tensor, and the (1, max_len) mask of the
        cached positions it sees.

        The one-token step then has the same shapes at every position: k/v are written at start
        with index_copy_ (KVCache.update) and attention reads the whole preallocated cache, the
        positions after start masked out (they hold zeros, never NaN). No Python int changes
        between steps, so torch.compile makes one graph for the whole decode, and on CUDA that
        graph can be captured once and replayed (CUDA graphs; generate.compiled_forward).
        The plain path (start an int: narrowed cache, no mask) is the reference it is tested
        against (tests/test_decode_path.py).
        """
        if T != 1 or cache is None:
            raise TinyMoeError("a tensor start is for one new token (T = 1) with a KV cache")
        S = cache.k.shape[3]  # max_len, read off the tensor so that compiling keeps it symbolic
        cos, sin = self._rope_rows(0, S, S, x)  # (S, Dh) each: the whole table
        k_pos = torch.arange(S, device=x.device)  # (S,)
        sees = k_pos <= start  # (S,)
        if self.cfg.sliding_window is not None:  # Mixtral: q - window < k <= q
            sees = sees & (k_pos > start - self.cfg.sliding_window)
        return cos[start], sin[start], sees[None, :]  # (1, Dh), (1, Dh), (1, S)

    def _mask(self, pos: Tensor, S: int, device: torch.device) -> Tensor | None:
        """Boolean (T, S) attention mask, or None when plain causal attention suffices.

        pos (T,) are the new tokens' positions, S - T .. S - 1. Position q sees cached position k
        when k <= q and, with `cfg.sliding_window` W, q - W < k. None means `is_causal` for a
        fresh sequence (T = S) and "everything" for one new token (T = 1).
        """
        T, start = pos.numel(), S - pos.numel()
        window = self.cfg.sliding_window
        if (window is None or window >= S) and (start == 0 or T == 1):
            return None  # fresh sequence (is_causal) or one new token that sees everything
        k_pos = torch.arange(S, device=device)[None, :]  # (1, S)
        sees = k_pos <= pos[:, None]  # (T, S)
        if window is not None:  # Mixtral's sliding window: q sees k when q - window < k <= q
            sees = sees & (k_pos > pos[:, None] - window)
        return sees
