"""Memory before loading: every tool compares what --model needs in --dtype with the memory free,
from config.json alone, before any weight is read (tinymoe/cli.py dtype_from_args).

Full-size published configs (docs/configs/) are used WITHOUT their weights: a checkpoint folder
here holds config.json and the demo model's tokenizer.json, nothing else, and the memory free is
patched (23 GiB: the two-core machine's). So a tool that got past the check would fail to find
any weights; `load_model` is patched too, to catch the dtype it is given and stop there.
"""

import argparse
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import add_tokenizer, make_checkpoint

from tinymoe import (
    ModelConfig,
    TinyMoeError,
    bench,
    calibrate,
    cli,
    evaluate,
    load_model,
    run,
    simulate,
)
from tinymoe.engine import loader
from tinymoe.engine.loader import resolve_dtype
from tinymoe.engine.memory import memory_needs, weight_bytes, with_headroom

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "docs" / "configs"
DEMO = ROOT / "weights" / "pydoc-moe"
GiB = 2**30
# Parameters of the published checkpoints (their model cards: 6.92B, 46.7B, 30.5B).
PUBLISHED = {
    "olmoe-1b-7b": 6_919_161_856,
    "mixtral-8x7b": 46_702_792_704,
    "qwen3-30b-a3b": 30_532_122_624,
}
OPEN = loader.Checkpoint.__init__
TOOLS = {
    "run": run,
    "bench": bench,
    "calibrate": calibrate,
    "evaluate": evaluate,
    "simulate": simulate,
}


class Loaded(Exception):  # noqa: N818 (not an error: the tool got as far as loading)
    """Raised by the patched load_model: the tool passed the memory check."""

    def __init__(self, dtype: torch.dtype, expert_device) -> None:
        super().__init__(f"load_model(dtype={dtype}, expert_device={expert_device})")
        self.dtype, self.expert_device = dtype, expert_device


@pytest.fixture
def machine(monkeypatch):
    """This machine, as the tools see it: `free(host_gib, gpu_gb=None)` sets the memory free
    (a GPU too, when gpu_gb is given); load_model, in every tool, raises Loaded."""

    def fake_load(path, device="cpu", dtype="auto", expert_device=None, **quant):
        raise Loaded(dtype, expert_device)

    for module in TOOLS.values():
        monkeypatch.setattr(module, "load_model", fake_load)
    # Nothing of a checkpoint but config.json is read: opening one would be a failure.
    monkeypatch.setattr(loader.Checkpoint, "__init__", lambda *a: pytest.fail("opened shards"))

    def free(host_gib: float, gpu_gb: float | None = None) -> None:
        monkeypatch.setattr(cli, "free_host_bytes", lambda: int(host_gib * GiB))
        if gpu_gb is not None:
            monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
            monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (int(gpu_gb * 1e9),) * 2)

    return free


def published(tmp_path: Path, name: str) -> Path:
    """A checkpoint folder with a published config.json and a tokenizer, and no weights."""
    path = tmp_path / name
    path.mkdir()
    shutil.copy(CONFIGS / f"{name}.json", path / "config.json")
    shutil.copy(DEMO / "tokenizer.json", path / "tokenizer.json")
    return path


def call(tool: str, argv: list[str], capsys) -> tuple[int | Loaded, str]:
    """Run a tool's cli(argv): (its exit status, or the Loaded it reached; stderr)."""
    try:
        result = TOOLS[tool].cli(argv)
    except Loaded as e:
        result = e
    return result, capsys.readouterr().err


def one_error_line(result, err: str, *words: str) -> str:
    assert result == 2, result
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------- counting


@pytest.mark.parametrize("name", PUBLISHED)
def test_weights_counted_from_config_alone_match_the_published_models(name):
    cfg = ModelConfig.from_file(CONFIGS / f"{name}.json")
    other, experts = weight_bytes(cfg, torch.bfloat16)
    assert (other + experts) // 2 == PUBLISHED[name]
    assert experts == cfg.num_layers * cfg.num_experts * cfg.expert_bytes(torch.bfloat16)
    assert sum(weight_bytes(cfg, torch.float32)) == 2 * (other + experts)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(model_type="olmoe"),
        dict(model_type="mixtral", tie_word_embeddings=True),
        dict(model_type="qwen3_moe", attention_bias=True),
    ],
)
def test_weights_counted_are_what_load_model_allocates(tmp_path, overrides):
    model = load_model(make_checkpoint(tmp_path / "m", **overrides), dtype=torch.bfloat16)
    other, experts = weight_bytes(model.cfg, torch.bfloat16)
    assert experts == sum(w.nbytes for w in model.experts.weights)
    assert other + experts == sum(p.nbytes for p in model.parameters())  # tied: counted once


def test_olmoe_config_parses_as_transformers_reads_it():
    transformers = pytest.importorskip("transformers")
    d = json.loads((CONFIGS / "olmoe-1b-7b.json").read_text())
    cfg = ModelConfig.from_dict(d)
    assert (cfg.num_layers, cfg.num_experts, cfg.top_k, cfg.expert_dim) == (16, 64, 8, 1024)
    assert (cfg.qk_norm, cfg.norm_topk_prob, cfg.dtype) == ("full", False, "bfloat16")
    hf = transformers.OlmoeConfig(**{k: v for k, v in d.items() if k != "torch_dtype"})
    with torch.device("meta"):
        n = sum(p.numel() for p in transformers.OlmoeForCausalLM(hf).parameters())
    assert n == PUBLISHED["olmoe-1b-7b"]
    assert hf.rms_norm_eps == cfg.rms_norm_eps and hf.max_position_embeddings == 4096


def test_resolve_dtype_auto_takes_float32_on_a_cpu_only_where_it_fits():
    assert resolve_dtype("auto", "bfloat16", "cpu") == torch.float32  # no check: as before
    assert resolve_dtype("auto", "bfloat16", "cpu", lambda d: True) == torch.float32
    assert resolve_dtype("auto", "bfloat16", "cpu", lambda d: False) == torch.bfloat16
    assert resolve_dtype("auto", "float8_e4m3fn", "cpu", lambda d: False) == torch.float32
    assert resolve_dtype("auto", "bfloat16", "cuda", lambda d: True) == torch.bfloat16
    assert resolve_dtype("float32", "bfloat16", "cpu", lambda d: False) == torch.float32


def test_offloading_on_a_cpu_saves_nothing_and_its_slots_are_extra():
    """On a CPU the host store adopts the model's experts (no copy) and the slots are extra."""
    cfg = ModelConfig.from_file(CONFIGS / "olmoe-1b-7b.json")
    cpu = torch.device("cpu")
    resident = memory_needs(cfg, torch.bfloat16, cpu)
    offloaded = memory_needs(cfg, torch.bfloat16, cpu, slots=64, experts="host")
    assert list(offloaded) == ["host"]
    extra = sum(offloaded["host"].values()) - sum(resident["host"].values())
    assert extra == 64 * cfg.expert_bytes(torch.bfloat16)
    on_gpu = memory_needs(cfg, torch.bfloat16, torch.device("cuda"), slots=64, experts="host")
    assert "experts" not in on_gpu["cuda"]  # on CUDA the host is another pool: they go there
    assert on_gpu["host"] == {"experts": resident["host"]["experts"]}


# ---------------------------------------------------------------- run, end to end


def test_default_run_of_olmoe_on_23_gib_takes_bfloat16_and_says_so(tmp_path, machine, capsys):
    machine(23)
    argv = ["--model", str(published(tmp_path, "olmoe-1b-7b")), "--prompt", "The list type"]
    result, err = call("run", argv, capsys)
    assert isinstance(result, Loaded) and result.dtype == torch.bfloat16
    assert err.splitlines() == [
        "dtype auto: bfloat16, the checkpoint's (float32 would need 30.5 GB of host memory with "
        "headroom, 24.7 GB available)"
    ]


def test_olmoe_in_float32_is_one_line_naming_bfloat16(tmp_path, machine, capsys):
    machine(23)
    argv = ["--model", str(published(tmp_path, "olmoe-1b-7b")), "--prompt", "x"]
    result, err = call("run", [*argv, "--dtype", "float32"], capsys)
    line = one_error_line(result, err, "float32 needs 30.5 GB of host memory", "24.7 GB")
    assert line.endswith("; use --dtype bfloat16")
    assert "offload" not in line  # on a CPU offloading saves no memory: not a way out there
    # More memory: the same command loads, in float32, without a word.
    machine(40)
    result, err = call("run", [*argv, "--dtype", "float32"], capsys)
    assert isinstance(result, Loaded) and result.dtype == torch.float32 and err == ""


def test_mixtral_does_not_fit_in_23_gib_in_any_dtype(tmp_path, machine, capsys):
    machine(23)
    argv = ["--model", str(published(tmp_path, "mixtral-8x7b")), "--prompt", "x"]
    for dtype in ("auto", "bfloat16"):
        result, err = call("run", [*argv, "--dtype", dtype], capsys)
        one_error_line(result, err, "bfloat16 needs 102.8 GB", "experts 90.2 GB", "in any dtype")


def test_expert_slots_on_a_cpu_are_counted(tmp_path, machine, capsys):
    machine(23)
    argv = ["--model", str(published(tmp_path, "olmoe-1b-7b")), "--prompt", "x"]
    result, _ = call("run", [*argv, "--offload-policy", "lru"], capsys)  # 256 slots: 3.2 GB
    assert isinstance(result, Loaded) and result.dtype == torch.bfloat16
    result, err = call("run", [*argv, "--offload-policy", "lru", "--expert-slots", "1024"], capsys)
    one_error_line(result, err, "expert slots 12.9 GB", "give fewer --expert-slots")


def test_a_kv_cache_that_tips_it_over_names_max_new_tokens(tmp_path, machine, capsys):
    machine(23)  # bf16 weights 13.8 GB; 80,000 new tokens of KV cache 10.5 GB more
    argv = ["--model", str(published(tmp_path, "olmoe-1b-7b")), "--prompt", "x"]
    result, err = call("run", [*argv, "--max-new-tokens", "80000", "--allow-long"], capsys)
    assert result == 2
    warning, error = err.strip().splitlines()
    assert warning.startswith("warning: ") and "--allow-long" in warning
    assert error.startswith("error: bfloat16 needs") and "KV cache 10.5 GB" in error
    assert error.endswith("; lower --max-new-tokens")


def test_the_demo_model_still_gets_float32_silently(machine, capsys):
    machine(23)
    result, err = call("run", ["--prompt", "The list type"], capsys)
    assert isinstance(result, Loaded) and result.dtype == torch.float32 and err == ""


def test_a_config_without_dtype_and_no_weights_is_one_clear_line(
    tmp_path, machine, monkeypatch, capsys
):
    """config.json states no dtype: it is read from a shard's header, and there is no shard."""
    machine(23)
    monkeypatch.setattr(loader.Checkpoint, "__init__", OPEN)  # headers may be read here
    path = published(tmp_path, "olmoe-1b-7b")
    d = json.loads((path / "config.json").read_text())
    del d["torch_dtype"]
    (path / "config.json").write_text(json.dumps(d))
    result, err = call("run", ["--model", str(path), "--prompt", "x"], capsys)
    one_error_line(result, err, "no model.safetensors or model.safetensors.index.json")


# ---------------------------------------------------------------- on CUDA (no GPU needed)


def test_on_a_gpu_resident_mixtral_names_an_offloading_policy(tmp_path, machine, capsys):
    machine(128, gpu_gb=80)
    argv = ["--model", str(published(tmp_path, "mixtral-8x7b")), "--prompt", "x"]
    result, err = call("run", [*argv, "--device", "cuda"], capsys)
    words = "bfloat16 needs 102.8 GB of GPU memory", "80.0 GB is available", "--offload-policy lru"
    one_error_line(result, err, *words)
    # Offloaded: experts in host memory (read straight there), 64 slots on the GPU.
    result, err = call("run", [*argv, "--device", "cuda", "--offload-policy", "lru"], capsys)
    assert isinstance(result, Loaded) and err == ""
    assert result.dtype == torch.bfloat16 and result.expert_device == "cpu"
    # ... as long as the host holds the experts,
    machine(64, gpu_gb=80)
    result, err = call("run", [*argv, "--device", "cuda", "--offload-policy", "lru"], capsys)
    one_error_line(result, err, "of host memory (experts 90.2 GB, + headroom)", "in any dtype")
    # ... and the GPU the slots.
    machine(128, gpu_gb=80)
    slots = ["--offload-policy", "lru", "--expert-slots", "256"]
    result, err = call("run", [*argv, "--device", "cuda", *slots], capsys)
    one_error_line(result, err, "expert slots 90.2 GB", "give fewer --expert-slots")


def test_on_a_gpu_auto_is_the_checkpoint_dtype_and_float32_names_bfloat16(tmp_path, machine):
    machine(128, gpu_gb=80)
    args = argparse.Namespace(model=published(tmp_path, "olmoe-1b-7b"), dtype="auto")
    assert cli.dtype_from_args(args, torch.device("cuda")) == torch.bfloat16
    machine(128, gpu_gb=20)  # fp32: 27.7 GB of weights
    args.dtype = "float32"
    with pytest.raises(TinyMoeError, match="GPU memory.*; use --dtype bfloat16$"):
        cli.dtype_from_args(args, torch.device("cuda"))


# ---------------------------------------------------------------- every tool that loads


def tool_argv(tool: str, model: Path, tmp_path: Path) -> list[str]:
    text = str(ROOT / "tests" / "fixtures" / "heldout_sample.txt")
    return ["--model", str(model)] + {
        "run": ["--prompt", "The list type"],
        "bench": [],
        "calibrate": ["--text", text, "--out", str(tmp_path / "cal"), "--tokens", "1280"],
        "evaluate": ["--text", text, "--predictors", "router", "--stepwise", "--tokens", "1280"],
        "simulate": [],
    }[tool]


@pytest.mark.parametrize("tool", TOOLS)
def test_every_tool_checks_memory_before_loading(tool, tmp_path, machine, capsys):
    machine(23)
    argv = tool_argv(tool, published(tmp_path, "olmoe-1b-7b"), tmp_path)
    result, err = call(tool, argv, capsys)
    assert isinstance(result, Loaded) and result.dtype == torch.bfloat16
    # (the figure depends on the tool: its KV cache and expert slots)
    note = r"dtype auto: bfloat16, the checkpoint's \(float32 would need 3\d\.\d GB of host memory"
    assert re.fullmatch(note + r" with headroom, 24\.7 GB available\)\n", err), err
    result, err = call(tool, [*argv, "--dtype", "float32"], capsys)
    one_error_line(result, err, "float32 needs", "use --dtype bfloat16")
    argv = tool_argv(tool, published(tmp_path, "mixtral-8x7b"), tmp_path)
    result, err = call(tool, argv, capsys)
    one_error_line(result, err, "bfloat16 needs", "in any dtype")


# ---------------------------------------------------------------- the real thing, small


def test_a_bf16_checkpoint_runs_in_bf16_where_only_that_fits(tmp_path, monkeypatch, capsys):
    """No patched loading: a baby checkpoint stored in bf16, with no dtype in config.json (so
    it is read from the safetensors header), and exactly the memory bf16 needs."""
    path = add_tokenizer(make_checkpoint(tmp_path / "b"))
    loader.save_model(load_model(path), path, dtype=torch.bfloat16)
    cfg = ModelConfig.from_file(path / "config.json")
    assert cfg.dtype is None  # make_checkpoint states none: the header decides
    argv = ["--model", str(path), "--prompt", "the cat sat on the", "--max-new-tokens", "2"]
    prompt = len(run.load_tokenizer(path).encode("the cat sat on the").ids)
    needs = memory_needs(cfg, torch.bfloat16, torch.device("cpu"), positions=prompt + 2)
    monkeypatch.setattr(cli, "free_host_bytes", lambda: with_headroom(sum(needs["host"].values())))
    rc, err = call("run", [*argv, "--json"], capsys)
    assert rc == 0
    assert err.startswith("dtype auto: bfloat16, the checkpoint's (float32 would need")
    rc, err = call("run", [*argv, "--dtype", "float32"], capsys)
    one_error_line(rc, err, "float32 needs", "use --dtype bfloat16")
