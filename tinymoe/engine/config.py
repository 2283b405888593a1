"""Model configuration: one frozen dataclass, built from a Hugging Face `config.json`.

Three architectures share one decoder: Mixtral, OLMoE and Qwen3-MoE. They differ only in a few
switches, which `ModelConfig` names explicitly (`qk_norm`, `clip_qkv`, `norm_topk_prob`, ...)
so the model code never branches on `model_type`.

Two spellings of config.json exist in the wild and both are accepted:
- the published hub form: top-level `rope_theta`, `torch_dtype`, `num_local_experts` (Mixtral)
  or `num_experts` (OLMoE, Qwen3-MoE);
- the form transformers 5 writes: a `rope_parameters` dict, `dtype`, `head_dim: null`.
Unknown keys are ignored, as mlx-lm does. A field config.json leaves out takes the default of the
architecture's transformers config class where that matters to the numbers (`rms_norm_eps`).
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tinymoe.errors import TinyMoeError

# The supported model_types, each with the transformers class its config.json names.
SUPPORTED = {
    "mixtral": "MixtralForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}
# The RMSNorm epsilon when config.json does not give one: each transformers config class's default.
DEFAULT_RMS_NORM_EPS = {"mixtral": 1e-5, "olmoe": 1e-5, "qwen3_moe": 1e-6}


@dataclass(frozen=True)
class ModelConfig:
    model_type: str  # one of SUPPORTED
    vocab_size: int
    hidden_size: int  # D
    num_layers: int  # L
    num_heads: int  # H
    num_kv_heads: int  # Hkv; H % Hkv == 0 (grouped-query attention)
    head_dim: int  # Dh; may differ from D / H (Qwen3-MoE)
    num_experts: int  # E
    top_k: int  # K, experts activated per token
    expert_dim: int  # I, each expert's SwiGLU width
    rms_norm_eps: float = 1e-6  # from_dict: DEFAULT_RMS_NORM_EPS[model_type] if none is given
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    norm_topk_prob: bool = True  # renormalise the top-k routing weights to sum to one
    qk_norm: str = "none"  # "none" | "full" (OLMoE: over the whole projection) | "head" (Qwen3)
    clip_qkv: float | None = None  # OLMoE: clamp q, k, v to [-clip, clip]
    attention_bias: bool = False
    sliding_window: int | None = None  # Mixtral: attend to at most this many past positions
    tie_word_embeddings: bool = False
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    dtype: str | None = None  # the storage dtype config.json states (None: it states none)

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED:
            raise TinyMoeError(
                f"config.json: model_type {self.model_type!r} is not supported; "
                f"expected one of {', '.join(SUPPORTED)}"
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "num_experts",
            "top_k",
            "expert_dim",
        ):
            if int(getattr(self, name)) <= 0:
                raise TinyMoeError(
                    f"config.json: {name} must be positive, got {getattr(self, name)}"
                )
        if self.num_heads % self.num_kv_heads:
            raise TinyMoeError(
                f"config.json: num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.top_k > self.num_experts:
            raise TinyMoeError(
                f"config.json: num_experts_per_tok ({self.top_k}) exceeds the number of experts "
                f"({self.num_experts})"
            )
        if self.head_dim % 2:
            raise TinyMoeError(
                f"config.json: head_dim must be even for rotary embeddings, got {self.head_dim}"
            )
        if self.qk_norm not in ("none", "full", "head"):
            raise TinyMoeError(f"qk_norm must be 'none', 'full' or 'head', got {self.qk_norm!r}")

    @property
    def fp32_routing_weights(self) -> bool:
        """Scale expert outputs by fp32 routing weights (Mixtral) instead of rounding them to
        the activation dtype first (OLMoE, Qwen3-MoE), as each model's transformers code does."""
        return self.model_type == "mixtral"

    @property
    def expert_numel(self) -> int:
        """Elements in one expert's packed buffer: gate and up (2I x D), then down (D x I)."""
        return 3 * self.expert_dim * self.hidden_size

    def expert_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of one expert's packed buffer in `dtype`: what one expert copy moves."""
        return self.expert_numel * dtype.itemsize

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        def need(*names: str) -> Any:
            for n in names:
                if d.get(n) is not None:
                    return d[n]
            raise TinyMoeError(f"{source}: missing field {' or '.join(repr(n) for n in names)}")

        mt = d.get("model_type")
        if mt not in SUPPORTED:
            raise TinyMoeError(
                f"{source}: model_type {mt!r} is not supported; "
                f"expected one of {', '.join(SUPPORTED)}"
            )
        hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))

        # RoPE: published checkpoints put rope_theta at the top level; transformers 5 nests it.
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise TinyMoeError(
                f"{source}: rope type {rope_type!r} is not supported; only 'default'"
            )
        theta = rope.get("rope_theta", d.get("rope_theta"))
        if theta is None:
            raise TinyMoeError(
                f"{source}: missing field 'rope_theta' (top level or in rope_parameters)"
            )

        if mt == "mixtral":
            experts = need("num_local_experts", "num_experts")
            expert_dim = need("intermediate_size")
            norm_topk, qk_norm = True, "none"  # Mixtral always renormalises over the top-k
            window = d.get("sliding_window")
        elif mt == "olmoe":
            experts = need("num_experts", "num_local_experts")
            expert_dim = need("intermediate_size")
            norm_topk, qk_norm = bool(d.get("norm_topk_prob", False)), "full"
            window = None
        else:  # qwen3_moe
            experts = need("num_experts", "num_local_experts")
            expert_dim = need("moe_intermediate_size")
            norm_topk, qk_norm = bool(d.get("norm_topk_prob", False)), "head"
            window = d.get("sliding_window") if d.get("use_sliding_window") else None
            if d.get("mlp_only_layers") or int(d.get("decoder_sparse_step", 1)) != 1:
                raise TinyMoeError(
                    f"{source}: dense layers (mlp_only_layers / decoder_sparse_step != 1) are not "
                    "supported; every layer must be an MoE layer"
                )
        if d.get("hidden_act", "silu") != "silu":
            raise TinyMoeError(
                f"{source}: hidden_act {d['hidden_act']!r} is not supported; only 'silu'"
            )

        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        dtype = d.get("dtype") or d.get("torch_dtype")  # old exporters wrote "torch.bfloat16"
        eps = d.get("rms_norm_eps")
        return cls(
            model_type=mt,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            num_layers=int(need("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(d.get("head_dim") or hidden // heads),
            num_experts=int(experts),
            top_k=int(need("num_experts_per_tok")),
            expert_dim=int(expert_dim),
            rms_norm_eps=DEFAULT_RMS_NORM_EPS[mt] if eps is None else float(eps),
            rope_theta=float(theta),
            max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
            norm_topk_prob=norm_topk,
            qk_norm=qk_norm,
            clip_qkv=float(d["clip_qkv"]) if d.get("clip_qkv") is not None else None,
            attention_bias=bool(d.get("attention_bias", False)),
            sliding_window=int(window) if window else None,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            eos_token_ids=eos_ids,
            bos_token_id=d.get("bos_token_id"),
            dtype=None if dtype is None else str(dtype).removeprefix("torch."),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json transformers writes for this architecture (published key names)."""
        eos = self.eos_token_ids  # one id is written as an int, several as a list
        d: dict[str, Any] = {
            "architectures": [SUPPORTED[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "num_experts_per_tok": self.top_k,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "attention_bias": self.attention_bias,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": self.dtype,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(eos) if len(eos) > 1 else (eos[0] if eos else None),
        }
        if self.model_type == "mixtral":
            d.update(
                num_local_experts=self.num_experts,
                intermediate_size=self.expert_dim,
                sliding_window=self.sliding_window,
            )
        elif self.model_type == "olmoe":
            d.update(
                num_experts=self.num_experts,
                intermediate_size=self.expert_dim,
                norm_topk_prob=self.norm_topk_prob,
                clip_qkv=self.clip_qkv,
            )
        else:
            d.update(
                num_experts=self.num_experts,
                moe_intermediate_size=self.expert_dim,
                intermediate_size=self.expert_dim,
                norm_topk_prob=self.norm_topk_prob,
                use_sliding_window=self.sliding_window is not None,
                sliding_window=self.sliding_window,
                decoder_sparse_step=1,
                mlp_only_layers=[],
            )
        return d

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise TinyMoeError(
                f"{path}: not found; a checkpoint directory needs a config.json"
            ) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TinyMoeError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise TinyMoeError(f"{path}: expected a JSON object")
        try:
            return cls.from_dict(d, source=str(path))
        except (TypeError, ValueError) as e:  # e.g. "hidden_size": "big" fails in int()
            raise TinyMoeError(f"{path}: a field has a value of the wrong type ({e})") from None
