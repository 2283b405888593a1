"""Quantized experts: the format, the host store, the copies, and exactness under every policy."""

import re
from pathlib import Path

import pytest
import torch
from conftest import make_checkpoint
from safetensors.torch import load_file, save_file

from tinymoe import TinyMoeError, generate, load_model
from tinymoe.offload.link import LinkSpec
from tinymoe.offload.quant import (
    QuantFormat,
    dequantize,
    pack_int4,
    quant_format,
    quantize,
    unpack_int4,
)
from tinymoe.offload.runtime import OffloadRuntime
from tinymoe.offload.store import quantized_resident
from tinymoe.simulator.costs import EXPERT_DTYPES, expert_bytes
from tinymoe.speculation.oracle import OraclePredictor, record_routing

FAST = LinkSpec(100.0, 0.0)
PROMPT = [5, 17, 3, 42, 8, 61, 23, 7, 90, 11, 2, 33]
NEW = 8
FORMATS = ["int8", "int4"]


def roundtrip(w: torch.Tensor, fmt: QuantFormat, dtype=torch.float32):
    codes = torch.empty(fmt.code_bytes(w.numel()), dtype=torch.uint8)
    scales = torch.empty(fmt.groups(w.numel()), dtype=torch.float16)
    quantize(w, fmt, codes, scales)
    out = torch.empty(w.numel(), dtype=dtype)
    dequantize(codes, scales, fmt, out)
    return codes, scales, out


# ---------------------------------------------------------------- the format


def test_int4_packs_two_codes_a_byte_low_nibble_first():
    q = torch.tensor([-8, 7, 0, -1, 3, -5], dtype=torch.int8)
    b = pack_int4(q)
    assert b.dtype == torch.uint8 and b.tolist() == [0 | 15 << 4, 8 | 7 << 4, 11 | 3 << 4]
    every = torch.arange(-8, 8, dtype=torch.int8).repeat(3)[torch.randperm(48)]
    assert torch.equal(unpack_int4(pack_int4(every)), every)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_is_symmetric_groupwise_and_within_half_a_step(bits):
    fmt = QuantFormat(bits, 64)
    torch.manual_seed(0)
    w = torch.randn(64 * 12) * torch.linspace(0.001, 3.0, 12).repeat_interleave(64)
    w[64:128] = 0.0  # an all-zero group stays zero
    codes, scales, back = roundtrip(w, fmt)
    assert codes.numel() == 64 * 12 * bits // 8 and scales.numel() == 12
    assert fmt.expert_bytes(w.numel()) == codes.nbytes + scales.nbytes
    step = scales.float().repeat_interleave(64)
    assert ((back - w).abs() <= step / 2 + 1e-7).all()  # round to nearest, per group's scale
    assert torch.equal(back[64:128], torch.zeros(64))
    # The largest weight of each group is a full-scale code: the scale is max|w| / qmax.
    amax = w.view(12, 64).abs().amax(1)
    nonzero = amax > 0
    ratio = amax[nonzero] / (scales.float()[nonzero] * fmt.qmax)
    assert torch.allclose(ratio, torch.ones_like(ratio), rtol=2e-3)  # fp16 scales
    assert (back.view(12, 64).abs().amax(1) - amax).abs().max() < 1e-3 * amax.max()


def test_reading_back_is_the_same_bits_in_every_dtype():
    """q * s is exact in fp32, so a bf16 slot holds the fp32 read-back rounded once: the host's
    resident copy and the device's slot agree whatever computes them."""
    torch.manual_seed(1)
    w = torch.randn(64 * 8)
    for bits in (8, 4):
        _, _, fp32 = roundtrip(w, QuantFormat(bits))
        _, _, bf16 = roundtrip(w, QuantFormat(bits), torch.bfloat16)
        assert torch.equal(bf16, fp32.to(torch.bfloat16))


def test_int4_is_coarser_than_int8_and_group_size_matters():
    torch.manual_seed(2)
    w = torch.randn(4096) * 0.05
    err = {
        (b, g): (roundtrip(w, QuantFormat(b, g))[2] - w).norm() / w.norm()
        for b in (8, 4)
        for g in (32, 128)
    }
    assert err[(8, 32)] < err[(4, 32)] < err[(4, 128)]
    assert err[(8, 32)] < 0.01 and err[(4, 32)] < 0.12


def test_format_errors_are_one_actionable_line():
    with pytest.raises(TinyMoeError, match="expected one of none, int8, int4"):
        quant_format("int3")
    with pytest.raises(TinyMoeError, match="even number"):
        QuantFormat(4, 7)
    with pytest.raises(TinyMoeError, match="does not divide an expert's 1536 weights"):
        quant_format("int4", 100, 1536)
    assert quant_format("none") is None


def test_simulator_projects_this_layout():
    """The simulator's storage formats include tinymoe's own, with the engine's byte count."""
    from tinymoe.engine.config import ModelConfig

    cfg = ModelConfig.from_file("docs/configs/mixtral-8x7b.json")
    for bits in (8, 4):
        fmt = QuantFormat(bits, 64)
        assert expert_bytes(cfg, f"int{bits}-g64") == fmt.expert_bytes(cfg.expert_numel)
        assert "fp16 scale per group of 64" in EXPERT_DTYPES[f"int{bits}-g64"][1]


def test_the_simulator_docs_list_every_storage_format():
    """docs/simulator.md's format table names every EXPERT_DTYPES entry, each in one row."""
    doc = (Path(__file__).parents[1] / "docs" / "simulator.md").read_text()
    rows = [ln for ln in doc.splitlines() if re.match(r"\| `(float|bfloat|int|q\d)", ln)]
    listed = [name for row in rows for name in re.findall(r"`([\w-]+)`", row.split("|")[1])]
    assert sorted(listed) == sorted(EXPERT_DTYPES)


# ---------------------------------------------------------------- the engine


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("quant") / "baby")


@pytest.fixture(scope="module", params=FORMATS)
def quantized(request, ckpt):
    """(format, model loaded with resident quantized experts, its resident tokens, routing)."""
    model = load_model(ckpt, expert_quant=request.param)
    ref, recording = record_routing(model, PROMPT, NEW, eos_ids=())
    return request.param, model, ref.tokens, recording


def test_loaded_quantized_experts_read_back_as_resident_weights(ckpt, quantized):
    name, model, _, _ = quantized
    plain = load_model(ckpt)
    fmt = quant_format(name)
    q = model.experts.quantized
    assert q.fmt == fmt and q.codes.dtype == torch.uint8 and q.scales.dtype == torch.float16
    for layer, (w, orig) in enumerate(
        zip(model.experts.weights, plain.experts.weights, strict=True)
    ):
        assert not torch.equal(w, orig)  # quantized: not the checkpoint's weights
        step = q.scales[layer].float().repeat_interleave(64, dim=1)  # (E, N)
        assert ((w - orig).abs() <= step / 2 + 1e-6).all()


POLICIES = [
    ("on-demand", None),
    ("on-demand", 2),
    ("lru", 3),
    ("lfu", None),
    ("lru", 24),
    ("oracle", None),
    ("speculative+oracle", None),
]


@pytest.mark.parametrize("policy,slots", POLICIES)
def test_offloaded_equals_resident_with_the_same_quantized_experts(quantized, policy, slots):
    """Token for token, every policy and budget; each copy moves the quantized bytes."""
    name, model, want, recording = quantized
    predictor = OraclePredictor(recording) if "oracle" in policy else None
    with OffloadRuntime(
        model, policy, predictor=predictor, slots=slots, link=FAST, expert_quant=name
    ) as rt:
        got = generate(model, PROMPT, NEW, eos_ids=()).tokens
        report = rt.report()
        per_copy = rt.store.expert_bytes
    assert got == want
    fmt, numel = quant_format(name), model.cfg.expert_numel
    assert per_copy == fmt.expert_bytes(numel) < numel * 4 * (0.3 if name == "int8" else 0.15)
    for phase in ("prefill", "decode"):
        assert report[phase]["bytes_copied"] % per_copy == 0 and report[phase]["bytes_copied"]
    assert report["expert_quant"] == name


def test_host_only_load_holds_no_expert_in_the_model_dtype(ckpt, quantized):
    """expert_device="cpu": the codes and scales are all there is; the store adopts them."""
    name, _, want, _ = quantized
    model = load_model(ckpt, expert_quant=name, expert_device="cpu")
    assert all(w.numel() == 0 for w in model.experts.weights)
    codes = model.experts.quantized.codes
    with OffloadRuntime(model, "lru", slots=3, link=FAST, expert_quant=name) as rt:
        assert rt.store.quantized.codes.data_ptr() == codes.data_ptr()  # adopted, not copied
        assert generate(model, PROMPT, NEW, eos_ids=()).tokens == want
    with pytest.raises(TinyMoeError, match="loaded as .* only: pass that --expert-quant"):
        OffloadRuntime(model, "lru", link=FAST)
    with pytest.raises(TinyMoeError, match="load them again"):
        OffloadRuntime(model, "lru", link=FAST, expert_quant="int4", group_size=32)


def test_cpu_miss_handler_computes_the_quantized_expert(ckpt, quantized):
    name, _, want, _ = quantized
    model = load_model(ckpt, expert_quant=name, expert_device="cpu")
    with OffloadRuntime(model, "on-demand", link=FAST, miss_handler="cpu", expert_quant=name):
        assert generate(model, PROMPT, NEW, eos_ids=()).tokens == want


def test_runtime_quantizes_a_plain_model_and_leaves_it_as_it_was(ckpt, quantized):
    """The runtime's own quantization (expert by expert, from the resident weights) is the
    loader's: the same tokens; the model's weights are untouched afterwards."""
    name, _, want, _ = quantized
    plain = load_model(ckpt)
    before = [w.clone() for w in plain.experts.weights]
    plain_tokens = generate(plain, PROMPT, NEW, eos_ids=()).tokens
    with OffloadRuntime(plain, "lru", slots=3, link=FAST, expert_quant=name):
        assert generate(plain, PROMPT, NEW, eos_ids=()).tokens == want
    assert all(torch.equal(a, b) for a, b in zip(before, plain.experts.weights, strict=True))
    assert generate(plain, PROMPT, NEW, eos_ids=()).tokens == plain_tokens
    with pytest.raises(TinyMoeError, match="resident experts in"):
        OffloadRuntime(plain, "resident", expert_quant=name)
    with quantized_resident(plain, quant_format(name)):  # bench's resident row of the format
        assert generate(plain, PROMPT, NEW, eos_ids=()).tokens == want
        with OffloadRuntime(plain, "resident", expert_quant=name):
            assert generate(plain, PROMPT, NEW, eos_ids=()).tokens == want
    assert plain.experts.quantized is None
    assert all(torch.equal(a, b) for a, b in zip(before, plain.experts.weights, strict=True))


def test_the_simulated_link_charges_the_quantized_bytes(ckpt):
    """Each copy moves the quantized bytes and keeps the simulated link busy for them only."""
    slow = LinkSpec(0.05, 0.0)  # 50 MB/s: a 1536-weight int4 expert (816 B) takes ~16 us
    model = load_model(ckpt, expert_quant="int4", expert_device="cpu")
    seen = []
    with OffloadRuntime(model, "on-demand", link=slow, expert_quant="int4") as rt:
        rt.engine.before_copy = seen.append  # (called in the link's worker, before each copy)
        generate(model, PROMPT, 3, eos_ids=())
        for t in seen:
            t.host_wait()
    nbytes = QuantFormat(4).expert_bytes(model.cfg.expert_numel)
    assert seen and all(t.nbytes == nbytes for t in seen)
    busy = [t.end_s - t.start_s for t in seen]
    # the link is busy at least the modelled time of the small copy (an upper bound would read
    # the clock of a machine that may be busy: the bytes above are what the link is charged)
    assert min(busy) >= slow.seconds(nbytes) * 0.999


def test_fused_layout_is_read_one_expert_at_a_time(tmp_path, ckpt):
    """Quantized at load from transformers 5's fused tensors: the same experts."""
    tensors = load_file(ckpt / "model.safetensors")
    for layer in range(3):
        p = f"model.layers.{layer}.mlp.experts."
        gate = [tensors.pop(f"{p}{e}.gate_proj.weight") for e in range(8)]
        up = [tensors.pop(f"{p}{e}.up_proj.weight") for e in range(8)]
        tensors[p + "gate_up_proj"] = torch.stack(
            [torch.cat(gu) for gu in zip(gate, up, strict=True)]
        )
        tensors[p + "down_proj"] = torch.stack(
            [tensors.pop(f"{p}{e}.down_proj.weight") for e in range(8)]
        )
    fused = tmp_path / "fused"
    fused.mkdir()
    save_file(tensors, str(fused / "model.safetensors"), metadata={"format": "pt"})
    (fused / "config.json").write_text((ckpt / "config.json").read_text())
    a = load_model(ckpt, expert_quant="int4").experts.quantized
    b = load_model(fused, expert_quant="int4").experts.quantized
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales)
