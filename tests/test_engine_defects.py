"""Engine defects found in review, each pinned by a test that failed before its fix.

- rms_norm_eps absent from config.json takes each architecture's transformers default.
- dtype "auto": the checkpoint's dtype on an accelerator, float32 on the CPU.
"""

import json

import pytest
import torch
from conftest import make_checkpoint

import tinymoe
from tinymoe import ModelConfig

ARCHS = ("mixtral", "olmoe", "qwen3_moe")
TRANSFORMERS_CONFIG = {
    "mixtral": "MixtralConfig",
    "olmoe": "OlmoeConfig",
    "qwen3_moe": "Qwen3MoeConfig",
}


def baby_config_dict(model_type: str) -> dict:
    cfg = ModelConfig(
        model_type=model_type,
        vocab_size=96,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        num_experts=4,
        top_k=2,
        expert_dim=16,
    )
    return cfg.to_hf_dict()


# ---- rms_norm_eps ----


@pytest.mark.parametrize("arch, eps", [("mixtral", 1e-5), ("olmoe", 1e-5), ("qwen3_moe", 1e-6)])
def test_missing_rms_norm_eps_takes_the_architectures_default(arch, eps):
    d = baby_config_dict(arch)
    del d["rms_norm_eps"]
    assert ModelConfig.from_dict(d).rms_norm_eps == eps
    d["rms_norm_eps"] = 3e-7  # a stated value is kept
    assert ModelConfig.from_dict(d).rms_norm_eps == 3e-7


@pytest.mark.parametrize("arch", ARCHS)
def test_rms_norm_eps_default_is_transformers_default(arch):
    """The defaults above are transformers' own, read from its config classes (the oracle)."""
    transformers = pytest.importorskip("transformers")
    want = getattr(transformers, TRANSFORMERS_CONFIG[arch])().rms_norm_eps
    d = baby_config_dict(arch)
    del d["rms_norm_eps"]
    assert ModelConfig.from_dict(d).rms_norm_eps == want


def test_model_loaded_without_rms_norm_eps_computes_with_the_default(tmp_path):
    """Every norm of the loaded model uses the default: logits equal those of a stated 1e-5."""
    path = make_checkpoint(tmp_path / "m", model_type="mixtral", rms_norm_eps=1e-5)
    want = tinymoe.load_model(path)
    d = json.loads((path / "config.json").read_text())
    del d["rms_norm_eps"]
    (path / "config.json").write_text(json.dumps(d))
    got = tinymoe.load_model(path)
    assert got.norm.eps == 1e-5 and got.layers[0].input_layernorm.eps == 1e-5
    ids = torch.arange(10)[None]
    with torch.no_grad():
        assert torch.equal(got(ids), want(ids))
