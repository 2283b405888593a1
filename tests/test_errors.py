"""Bad input: every user mistake raises TinyMoeError with a message naming what is wrong.

Each test breaks one thing in a good baby checkpoint (or in a call) and checks that the message
names the file, tensor, field or option at fault, and what was expected where that helps.
"""

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import make_checkpoint
from safetensors.torch import load_file, save_file

import tinymoe
from tinymoe import TinyMoeError

WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("good") / "ckpt")


@pytest.fixture
def ckpt(good: Path, tmp_path: Path) -> Path:
    """A private copy of the good checkpoint, for a test to break."""
    return Path(shutil.copytree(good, tmp_path / "ckpt"))


def edit_config(path: Path, edit: Callable[[dict], None]) -> None:
    d = json.loads((path / "config.json").read_text())
    edit(d)
    (path / "config.json").write_text(json.dumps(d))


def edit_tensors(path: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(path / WEIGHTS)
    edit(tensors)
    save_file(tensors, path / WEIGHTS, metadata={"format": "pt"})


def load_error(path: Path | str, **kwargs) -> str:
    with pytest.raises(TinyMoeError) as info:
        tinymoe.load_model(path, **kwargs)
    return str(info.value)


def test_good_checkpoint_loads(ckpt):
    """The baseline the other tests break: it loads, so each failure below is their one change."""
    assert tinymoe.load_model(ckpt).cfg.num_layers == 3


# ---- paths and config.json ----


def test_nonexistent_path(tmp_path):
    msg = load_error(tmp_path / "nowhere")
    assert "nowhere" in msg and "not a directory" in msg


def test_directory_without_config(tmp_path):
    msg = load_error(tmp_path)
    assert "config.json" in msg and "not found" in msg


def test_config_not_json(ckpt):
    (ckpt / "config.json").write_text("{not json")
    assert "not valid JSON" in load_error(ckpt)


def test_unknown_model_type(ckpt):
    edit_config(ckpt, lambda d: d.update(model_type="llama"))
    msg = load_error(ckpt)
    assert "'llama'" in msg and "mixtral, olmoe, qwen3_moe" in msg


@pytest.mark.parametrize("field", ["hidden_size", "num_experts_per_tok", "rope_theta"])
def test_missing_config_field(ckpt, field):
    edit_config(ckpt, lambda d: d.pop(field))
    msg = load_error(ckpt)
    assert "config.json" in msg and f"missing field '{field}'" in msg


def test_config_field_of_wrong_type(ckpt):
    edit_config(ckpt, lambda d: d.update(hidden_size="big"))
    msg = load_error(ckpt)
    assert "config.json" in msg and "wrong type" in msg


def test_inconsistent_heads(ckpt):
    edit_config(ckpt, lambda d: d.update(num_key_value_heads=3))
    assert "num_key_value_heads (3)" in load_error(ckpt)


# ---- tensors ----


@pytest.mark.parametrize(
    "key",
    ["model.layers.1.self_attn.k_proj.weight", "model.layers.0.mlp.experts.3.up_proj.weight"],
)
def test_missing_tensor(ckpt, key):
    edit_tensors(ckpt, lambda t: t.pop(key))
    msg = load_error(ckpt)
    assert "missing tensor" in msg and key.removeprefix("model.") in msg


def test_unexpected_tensor(ckpt):
    edit_tensors(
        ckpt, lambda t: t.update({"model.layers.0.mlp.shared_expert.weight": torch.zeros(4, 32)})
    )
    msg = load_error(ckpt)
    assert "unexpected tensor 'model.layers.0.mlp.shared_expert.weight'" in msg and WEIGHTS in msg


def test_wrong_shape(ckpt):
    key = "model.layers.2.self_attn.k_proj.weight"  # (Hkv*Dh, D) = (16, 32)
    edit_tensors(ckpt, lambda t: t.update({key: torch.zeros(16, 31)}))
    msg = load_error(ckpt)
    assert key in msg and WEIGHTS in msg
    assert "shape (16, 31), expected (16, 32)" in msg


def test_wrong_expert_shape_in_fused_layout(ckpt):
    """The fused layout (E, 2I, D) is checked too; E=8, I=16, D=32 here."""

    def fuse(t: dict[str, torch.Tensor]) -> None:
        for layer in range(3):
            p = f"model.layers.{layer}.mlp.experts."
            gate = [t.pop(f"{p}{e}.gate_proj.weight") for e in range(8)]
            up = [t.pop(f"{p}{e}.up_proj.weight") for e in range(8)]
            down = [t.pop(f"{p}{e}.down_proj.weight") for e in range(8)]
            t[p + "gate_up_proj"] = torch.stack(
                [torch.cat(gu) for gu in zip(gate, up, strict=True)]
            )
            t[p + "down_proj"] = torch.stack(down)[:7]  # one expert short

    edit_tensors(ckpt, fuse)
    msg = load_error(ckpt)
    assert "model.layers.0.mlp.experts.down_proj" in msg
    assert "shape (7, 32, 16), expected (8, 32, 16)" in msg


# ---- files ----


def test_truncated_file(ckpt):
    f = ckpt / WEIGHTS
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    msg = load_error(ckpt)
    assert str(f) in msg and "truncated" in msg


def test_corrupt_header(ckpt):
    f = ckpt / WEIGHTS
    data = bytearray(f.read_bytes())
    data[8:40] = b"\xff" * 32  # the JSON header starts after an 8-byte length
    f.write_bytes(bytes(data))
    msg = load_error(ckpt)
    assert str(f) in msg and "safetensors" in msg


def test_pickle_only_checkpoint(ckpt):
    (ckpt / WEIGHTS).unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"never unpickled")
    msg = load_error(ckpt)
    assert "pickle" in msg and "safetensors only" in msg


def test_no_weights(ckpt):
    (ckpt / WEIGHTS).unlink()
    assert "no model.safetensors" in load_error(ckpt)


def test_index_lists_missing_shard(ckpt):
    keys = list(load_file(ckpt / WEIGHTS))
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    (ckpt / WEIGHTS).rename(ckpt / shards[0])  # the second shard never existed
    weight_map = {k: shards[i % 2] for i, k in enumerate(keys)}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    msg = load_error(ckpt)
    assert "model.safetensors.index.json" in msg and shards[1] in msg and "does not exist" in msg


def test_bad_dtype_name(ckpt):
    msg = load_error(ckpt, dtype="int8")
    assert "'int8'" in msg and "float32" in msg


# ---- generation arguments ----


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(input_ids=[], max_new_tokens=4), "prompt is empty"),
        (dict(input_ids=[1, 2], max_new_tokens=0), "max_new_tokens must be >= 1, got 0"),
        (dict(input_ids=[1, 2], max_new_tokens=4, top_p=2.0), "top_p must be in (0, 1], got 2.0"),
        (dict(input_ids=[1, 500], max_new_tokens=4), "token id 500 is outside the vocabulary"),
    ],
)
def test_bad_generation_arguments(good, kwargs, words):
    model = tinymoe.load_model(good)
    with pytest.raises(TinyMoeError) as info:
        tinymoe.generate(model, **kwargs)
    assert words in str(info.value)
