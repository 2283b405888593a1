"""Memory before loading, with quantized experts (--expert-quant): the check counts the experts
as the loader allocates them (engine/memory.py memory_needs, tinymoe/cli.py dtype_from_args).

- offloaded (run.py with an offloading policy): the codes and scales only, plus slots in dtype;
- resident: the model's experts in dtype (what the codes read back as) AND the codes;
- bench and evaluate also keep an unquantized reference beside (experts; a whole model).

The published configs and the patched free memory of tests/test_memory_plan.py (23 GiB).
"""

import pytest
import test_memory_plan
import torch
from conftest import make_checkpoint
from test_memory_plan import CONFIGS, Loaded, call, one_error_line, published, tool_argv

from tinymoe import ModelConfig, load_model
from tinymoe.engine.memory import memory_needs, quantized_bytes, weight_bytes
from tinymoe.offload.quant import QuantFormat

CPU = torch.device("cpu")
machine = test_memory_plan.machine  # the fixture: free memory patched, load_model stopped


def test_quantized_bytes_are_codes_and_fp16_scales_of_every_expert():
    cfg = ModelConfig.from_file(CONFIGS / "olmoe-1b-7b.json")
    n = cfg.num_layers * cfg.num_experts * cfg.expert_numel  # 6.44B expert weights
    assert quantized_bytes(cfg, QuantFormat(4, 64)) == n // 2 + n // 64 * 2
    assert quantized_bytes(cfg, QuantFormat(8, 32)) == n + n // 32 * 2
    _, experts = weight_bytes(cfg, torch.bfloat16)
    assert quantized_bytes(cfg, QuantFormat(4)) / experts == pytest.approx(0.531 / 2, abs=1e-3)


@pytest.mark.parametrize("bits", [8, 4])
def test_counted_parts_are_what_load_model_allocates(tmp_path, bits):
    """Quantized at load, on a baby checkpoint: offloaded (expert_device="cpu"), the model holds
    no expert in its dtype and the codes are all there is; resident, both."""
    path = make_checkpoint(tmp_path / "m")
    fmt = QuantFormat(bits, 64)
    for placement, expert_device in (("host", "cpu"), ("device", None)):
        model = load_model(path, dtype=torch.bfloat16, expert_device=expert_device,
                           expert_quant=fmt.name)  # fmt: skip
        experts = sum(w.nbytes for w in model.experts.weights)
        other = sum(p.nbytes for p in model.parameters()) - experts
        allocated = {"other weights": other, "quantized experts": model.experts.quantized.nbytes}
        if placement == "device":
            allocated["experts"] = experts
        else:
            assert experts == 0
        needs = memory_needs(model.cfg, torch.bfloat16, CPU, experts=placement, quant=fmt)
        assert {k: v for k, v in needs["host"].items() if v} == allocated


def test_on_cuda_offloaded_codes_go_to_the_host_and_resident_experts_stay_on_the_gpu():
    cfg = ModelConfig.from_file(CONFIGS / "mixtral-8x7b.json")
    cuda, bf16, int4 = torch.device("cuda"), torch.bfloat16, QuantFormat(4)
    _, experts = weight_bytes(cfg, bf16)
    off = memory_needs(cfg, bf16, cuda, slots=64, experts="host", quant=int4)
    assert "experts" not in off["cuda"] and off["host"] == {"quantized experts": 23_957_864_448}
    res = memory_needs(cfg, bf16, cuda, quant=int4)
    assert res["cuda"]["experts"] == experts and list(res["host"]) == ["quantized experts"]


# ---------------------------------------------------------------- the tools, end to end


def test_olmoe_offloaded_int4_fits_in_float32_where_unquantized_needed_bfloat16(
    tmp_path, machine, capsys
):
    machine(23)
    argv = ["--model", str(published(tmp_path, "olmoe-1b-7b")), "--prompt", "x"]
    argv += ["--offload-policy", "on-demand"]
    result, err = call("run", argv, capsys)
    assert isinstance(result, Loaded) and result.dtype == torch.bfloat16  # as before
    assert "float32 would need 30.7 GB" in err
    for quant in ("int8", "int4"):  # 6.6 / 3.4 GB of codes, 1.9 GB of other fp32 weights
        result, err = call("run", [*argv, "--expert-quant", quant], capsys)
        assert isinstance(result, Loaded) and err == ""
        assert result.dtype == torch.float32 and result.expert_device == "cpu"


def test_resident_quantized_counts_the_experts_twice_in_a_way(tmp_path, machine, capsys):
    """No offloading: the model's experts in dtype AND the codes (what the loader allocates)."""
    machine(23)
    argv = ["--model", str(published(tmp_path, "olmoe-1b-7b")), "--prompt", "x"]
    result, err = call("run", [*argv, "--expert-quant", "int4"], capsys)
    assert isinstance(result, Loaded) and result.dtype == torch.bfloat16
    assert result.expert_device is None
    # fp32: 1.9 + 25.8 + 3.4 (codes) = 31.1 GB, + 10%; without the codes it would be 30.5
    assert "float32 would need 34.2 GB of host memory" in err, err
    result, err = call("run", [*argv, "--expert-quant", "int4", "--dtype", "float32"], capsys)
    one_error_line(result, err, "quantized experts 3.4 GB", "use --dtype bfloat16")


def test_qwen3_30b_fits_on_23_gib_offloaded_in_int4_and_only_so(tmp_path, machine, capsys):
    machine(23)
    argv = ["--model", str(published(tmp_path, "qwen3-30b-a3b")), "--prompt", "x"]
    argv += ["--offload-policy", "on-demand"]
    result, err = call("run", argv, capsys)
    one_error_line(result, err, "bfloat16 needs 67.3 GB", "in any dtype")
    result, err = call("run", [*argv, "--expert-quant", "int8"], capsys)  # 29.9 GB of codes
    one_error_line(result, err, "bfloat16 needs 36.4 GB", "quantized experts 29.9 GB")
    result, err = call("run", [*argv, "--expert-quant", "int4"], capsys)  # 15.4 GB
    assert isinstance(result, Loaded) and err == ""  # even float32: 23.9 GB with headroom
    assert result.dtype == torch.float32 and result.expert_device == "cpu"


def test_mixtral_int4_offloaded_on_a_gpu_needs_only_its_codes_on_the_host(
    tmp_path, machine, capsys
):
    machine(64, gpu_gb=80)  # unquantized: host experts 90.2 GB, refused (test_memory_plan)
    argv = ["--model", str(published(tmp_path, "mixtral-8x7b")), "--prompt", "x", "--device"]
    argv += ["cuda", "--offload-policy", "lru", "--expert-quant", "int4"]
    result, err = call("run", argv, capsys)
    assert isinstance(result, Loaded) and err == "" and result.dtype == torch.bfloat16
    machine(24, gpu_gb=80)
    result, err = call("run", argv, capsys)
    one_error_line(result, err, "of host memory (quantized experts 24.0 GB, + headroom)")


@pytest.mark.parametrize(
    ("tool", "quant", "reference"),
    [
        ("bench", "none,int4", "reference experts 12.9 GB"),
        ("evaluate", "int4", "reference model 13.8 GB"),
    ],
)
def test_a_tools_unquantized_reference_is_counted_and_named(
    tool, quant, reference, tmp_path, machine, capsys
):
    """bench keeps the model's own experts beside their read-back (quantized_resident), evaluate
    a whole second model: on 23 GiB, OLMoE in bf16 then no longer fits, and the line says why."""
    machine(23)
    argv = [*tool_argv(tool, published(tmp_path, "olmoe-1b-7b"), tmp_path), "--expert-quant", quant]
    result, err = call(tool, argv, capsys)
    one_error_line(result, err, reference, "quantized experts 3.4 GB", "tinymoe run --expert-quant")
    machine(40)
    result, err = call(tool, argv, capsys)
    assert isinstance(result, Loaded) and result.dtype == torch.bfloat16
