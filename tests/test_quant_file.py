"""Quantized experts saved beside the checkpoint (offload/quant_file.py, `tinymoe quantize`):
written once, read by every later load instead of quantizing again; refused in one line when
the file is of another version or made for other experts."""

import pytest
import torch
from conftest import make_checkpoint
from safetensors import safe_open
from safetensors.torch import save_file

from tinymoe import TinyMoeError, generate, load_model, quantize
from tinymoe.offload.quant import QuantFormat
from tinymoe.offload.quant_file import quant_path

PROMPT = [5, 17, 3, 42, 8, 61, 23, 7]


@pytest.fixture
def ckpt(tmp_path):
    return make_checkpoint(tmp_path / "baby")


def write(ckpt, *flags: str) -> int:
    return quantize.cli(["--model", str(ckpt), *flags])


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_saved_experts_load_bit_exact_without_quantizing_again(ckpt, quant, monkeypatch, capsys):
    fresh = load_model(ckpt, expert_quant=quant)  # quantized at load
    assert write(ckpt, "--expert-quant", quant) == 0
    path = quant_path(ckpt, QuantFormat(8 if quant == "int8" else 4))
    assert path.name == f"experts-{quant}-g64.safetensors"
    assert f"wrote {path}" in capsys.readouterr().err
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["version"] == "1" and f.metadata()["bits"] == quant[3:]

    def no_quantizing(*a, **k):
        raise AssertionError("quantized again")

    monkeypatch.setattr(type(fresh.experts.quantized), "quantize_layer", no_quantizing)
    for expert_device in (None, "cpu"):  # resident (read back from the file) and offloaded
        saved = load_model(ckpt, expert_quant=quant, expert_device=expert_device)
        q, want = saved.experts.quantized, fresh.experts.quantized
        assert torch.equal(q.codes, want.codes) and torch.equal(q.scales, want.scales)
    pairs = zip(saved.experts.weights, fresh.experts.weights, strict=True)
    assert all(w.numel() == 0 for w, _ in pairs)  # offloaded: the codes only
    saved = load_model(ckpt, expert_quant=quant)
    pairs = zip(saved.experts.weights, fresh.experts.weights, strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)  # resident: the same read-back weights
    want = generate(fresh, PROMPT, 4, eos_ids=()).tokens
    assert generate(saved, PROMPT, 4, eos_ids=()).tokens == want


def test_codes_do_not_depend_on_the_dtype_of_the_load(ckpt):
    """Read in fp32 before quantizing: one saved file serves a bf16 load and an fp32 one."""
    a = load_model(ckpt, dtype=torch.bfloat16, expert_quant="int4").experts.quantized
    b = load_model(ckpt, dtype=torch.float32, expert_quant="int4").experts.quantized
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales)


def test_an_unknown_version_is_refused_in_one_line(ckpt, capsys):
    assert write(ckpt, "--expert-quant", "int4") == 0
    path = quant_path(ckpt, QuantFormat(4))
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iter)
        meta = f.metadata()
    save_file(tensors, str(path), metadata=meta | {"version": "2"})
    with pytest.raises(
        TinyMoeError, match="not a tinymoe-quantized-experts file of version 1"
    ) as e:
        load_model(ckpt, expert_quant="int4")
    assert "\n" not in str(e.value) and "--force" in str(e.value)
    path.write_bytes(b"not safetensors")
    with pytest.raises(TinyMoeError, match="not a readable safetensors file"):
        load_model(ckpt, expert_quant="int4")


def test_a_file_made_for_other_experts_is_refused_not_quantized_again(ckpt, tmp_path, capsys):
    """The same name beside a checkpoint whose experts changed shape: refused, naming what
    differs and how to write it again (the file cannot be trusted for these weights)."""
    other = make_checkpoint(tmp_path / "wider", expert_dim=32)
    assert write(other, "--expert-quant", "int4") == 0
    path = quant_path(other, QuantFormat(4))
    path.rename(quant_path(ckpt, QuantFormat(4)))
    with pytest.raises(TinyMoeError, match=r"made for other experts: expert_numel 3072 \(not 1536"):
        load_model(ckpt, expert_quant="int4")
    assert load_model(ckpt, expert_quant="int4", use_saved=False)  # quantizing at load still works
    assert write(ckpt, "--expert-quant", "int4") == 2  # there: --force to replace it
    assert "exists; add --force" in capsys.readouterr().err
    assert write(ckpt, "--expert-quant", "int4", "--force") == 0
    assert load_model(ckpt, expert_quant="int4").experts.quantized.codes.shape[2] == 768


def test_quantize_mistakes_are_one_line(ckpt, capsys):
    assert write(ckpt) == 2
    assert "--expert-quant int8 or int4" in capsys.readouterr().err
    assert write(ckpt, "--expert-quant", "int4", "--expert-group-size", "40") == 2
    assert "does not divide" in capsys.readouterr().err
    assert not list(ckpt.glob("experts-*"))  # nothing written
