"""Engine defects found in review, each pinned by a test that failed before its fix.

- rms_norm_eps absent from config.json takes each architecture's transformers default.
- dtype "auto" (load_model's default): the checkpoint's dtype on a GPU, float32 on the CPU.
"""

import json
from pathlib import Path

import pytest
import torch
from conftest import make_checkpoint

import tinymoe
from tinymoe import ModelConfig, TinyMoeError
from tinymoe.engine.loader import DTYPES, Checkpoint, resolve_dtype, save_model

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


# ---- dtype "auto" ----


def bf16_checkpoint(path: Path, state_dtype: bool) -> Path:
    """A baby checkpoint stored in bf16; config.json states the dtype iff state_dtype."""
    make_checkpoint(path)
    save_model(tinymoe.load_model(path, dtype=torch.float32), path, dtype=torch.bfloat16)
    d = json.loads((path / "config.json").read_text())
    d["torch_dtype"] = "bfloat16" if state_dtype else None
    (path / "config.json").write_text(json.dumps(d))
    return path


def test_auto_is_a_dtype_choice():
    assert "auto" in DTYPES and {"float32", "bfloat16", "float16"} <= set(DTYPES)


@pytest.mark.parametrize(
    "stored, device, want",
    [
        ("bfloat16", "cuda", torch.bfloat16),
        ("float16", "cuda:1", torch.float16),
        ("float32", "cuda", torch.float32),
        ("bfloat16", "cpu", torch.float32),  # CPU bf16 kernels are slow: compute in fp32
        ("float16", torch.device("cpu"), torch.float32),
    ],
)
def test_auto_resolves_to_the_checkpoint_dtype_on_a_gpu_and_fp32_on_the_cpu(stored, device, want):
    assert resolve_dtype("auto", stored, device) == want


def test_explicit_dtypes_ignore_the_checkpoint_and_device():
    assert resolve_dtype("bfloat16", "float32", "cpu") == torch.bfloat16
    assert resolve_dtype("float32", "bfloat16", "cuda") == torch.float32
    assert resolve_dtype(torch.float16, "bfloat16", "cpu") == torch.float16


def test_auto_refuses_a_storage_dtype_tinymoe_cannot_compute_in():
    with pytest.raises(TinyMoeError, match=r"float8_e4m3fn.*--dtype"):
        resolve_dtype("auto", "float8_e4m3fn", "cuda")
    assert resolve_dtype("auto", "float8_e4m3fn", "cpu") == torch.float32
    with pytest.raises(TinyMoeError, match="auto, float32, bfloat16, float16"):
        resolve_dtype("int8", "bfloat16", "cpu")


@pytest.mark.parametrize("state_dtype", [True, False])
def test_storage_dtype_from_config_or_from_the_file(tmp_path, state_dtype):
    """config.json's dtype when it states one, else the safetensors header's."""
    path = bf16_checkpoint(tmp_path / "m", state_dtype)
    assert Checkpoint(path).storage_dtype() == "bfloat16"
    assert Checkpoint(make_checkpoint(tmp_path / "f32")).storage_dtype() == "float32"


def test_load_model_defaults_to_auto_which_is_fp32_on_the_cpu(tmp_path):
    path = bf16_checkpoint(tmp_path / "m", state_dtype=True)
    for model in (tinymoe.load_model(path), tinymoe.load_model(path, dtype="auto")):
        assert {p.dtype for p in model.parameters()} == {torch.float32}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_on_cuda_loads_the_checkpoint_dtype(tmp_path):
    path = bf16_checkpoint(tmp_path / "m", state_dtype=False)
    model = tinymoe.load_model(path, device="cuda")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    host = tinymoe.load_model(path, device="cuda", expert_device="cpu")
    assert host.experts.weights[0].dtype == torch.bfloat16
