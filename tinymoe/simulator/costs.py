"""What each piece of work costs in a replay: measured here, or projected onto other hardware.

`MeasuredCosts` takes every time from the trace (what this machine did) and the link from a
LinkSpec: with the link the trace was recorded over, a replay should reproduce the real run
(`python -m tinymoe.simulate --validate` checks that).

`RooflineCosts` projects onto a `Hardware` preset. At batch 1 every decode-step kernel is bound
by memory bandwidth, so each piece costs the bytes it reads over the bandwidth that reads them,
plus a fixed cost per layer for launching its kernels:

    one expert on the device   expert_bytes / (device GB/s * efficiency)
    one expert on the host     expert_bytes / (host GB/s * host efficiency)  (miss handler "cpu")
    a layer's host experts     + their inputs to the host and outputs back: one copy each
                               way, latency + rows x hidden x 2 B / link GB/s each
    attention + router         (attention weights + KV cache + router) / device GB/s + overhead
    one expert copy            the link: latency + expert_bytes / link GB/s
    norm + LM head             (vocab x hidden) / device GB/s

A layer's host experts run beside its device experts, as the engine runs them (experts.py, "Host
experts"): the layer takes max(device experts, copy in + host experts + copy out).

expert_bytes follows the experts' storage format (EXPERT_DTYPES: bf16, fp16, fp32, fp8, int8,
int4, llama.cpp's Q8_0/Q4_0/Q4_K, scales included); activations and the KV cache stay bf16.

The presets' figures are the vendors' published peaks (sources beside each); the efficiencies
and the overheads are assumptions, each named with its source in `RooflineCosts.assumptions()`
(which `simulate --hardware --json` prints) and docs/simulator.md. `projected_depth` is exact
prefetch's depth from these costs, not from this machine's.
"""

import math
from dataclasses import dataclass

import torch

from tinymoe.engine.config import ModelConfig
from tinymoe.errors import TinyMoeError
from tinymoe.offload.link import LinkSpec
from tinymoe.offload.quant import QuantFormat
from tinymoe.offload.scheduler import throttle_depth
from tinymoe.simulator.record import LayerRecord, PassRecord, RoutingTrace
from tinymoe.simulator.scale import BucketRotation


@dataclass(frozen=True)
class Hardware:
    name: str
    device_gbps: float  # device memory bandwidth, peak
    link: LinkSpec  # host-to-device, pinned, as typically measured (not the bus peak)
    host_peak_gbps: float  # host memory bandwidth, peak (RooflineCosts.host_efficiency of it)
    source: str


# PCIe: PCI-SIG peak 31.5 GB/s (4.0 x16) and 63.0 (5.0 x16); pinned cudaMemcpy reaches about 80%
# of it in practice (CUDA bandwidthTest), so 25 and 50 GB/s, 10 us per copy (an assumption).
# Host memory: channels x MT/s x 8 bytes (JEDEC), its peak (a GEMV's share: RooflineCosts).
HARDWARE = {
    "rtx4090": Hardware(
        "RTX 4090, desktop (PCIe 4.0 x16, 2 ch DDR5-5600)",
        1008.0,
        LinkSpec(25.0, 10.0, "PCIe 4.0 x16, typical pinned"),
        89.6,
        "NVIDIA Ada Lovelace whitepaper: 21 Gbps GDDR6X x 384 bit = 1008 GB/s; host 2 x 5600 MT/s"
        " x 8 B = 89.6 GB/s",
    ),
    "a6000": Hardware(
        "RTX A6000, workstation (PCIe 4.0 x16, 8 ch DDR4-3200)",
        768.0,
        LinkSpec(25.0, 10.0, "PCIe 4.0 x16, typical pinned"),
        204.8,
        "NVIDIA RTX A6000 datasheet: 768 GB/s GDDR6; host 8 x 3200 MT/s x 8 B = 204.8 GB/s"
        " (the paper's GPU)",
    ),
    "h100-pcie": Hardware(
        "H100 PCIe, server (PCIe 5.0 x16, 8 ch DDR5-4800 per socket)",
        2000.0,
        LinkSpec(50.0, 10.0, "PCIe 5.0 x16, typical pinned"),
        307.2,
        "NVIDIA H100 datasheet: 2.0 TB/s HBM2e (PCIe card); host 8 x 4800 MT/s x 8 B = 307.2 GB/s",
    ),
}


QUANT_LAYOUT = {8: "int8", 4: "int4, two a byte"}


def quant_dtype(fmt: QuantFormat) -> str:
    """The EXPERT_DTYPES name of tinymoe's quantized format `fmt`: "int4-g64" and the like."""
    return fmt.tag


# Bytes per weight of an expert in each storage format, the format's scales (and zero points)
# included, with where its layout is defined. A quantized expert costs its bytes to copy and to
# read: the GEMV is assumed to stay memory-bound (dequantising is hidden under the loads).
EXPERT_DTYPES: dict[str, tuple[float, str]] = {
    "float32": (4.0, "IEEE 754 binary32"),
    "bfloat16": (2.0, "bfloat16, the published checkpoints' dtype (config.json torch_dtype)"),
    "float16": (2.0, "IEEE 754 binary16"),
    "float8": (
        1 + 4 / (128 * 128),
        "FP8 e4m3 + one fp32 scale per 128x128 block (DeepSeek-V3's, Qwen3-*-FP8's layout)",
    ),
    "int8": (1 + 2 / 128, "int8 + one fp16 scale per group of 128 weights (GPTQ's group size)"),
    "int4": (
        0.5 + (2 + 0.5) / 128,
        "int4 + per group of 128 one fp16 scale and one int4 zero point (GPTQ/AWQ, group 128)",
    ),
    # tinymoe's own (--expert-quant, offload/quant.py): symmetric, no zero point; the bytes a
    # copy moves in `tinymoe bench --expert-quant`, named by group size (int4-g64 the default)
    **{
        quant_dtype(fmt): (
            fmt.bytes_per_weight,
            f"tinymoe --expert-quant: {QUANT_LAYOUT[fmt.bits]}"
            f" + one fp16 scale per group of {fmt.group_size} (symmetric; offload/quant.py)",
        )
        for fmt in (QuantFormat(b, g) for b in (8, 4) for g in (32, 64, 128))
    },  # fmt: skip
    "q8_0": (34 / 32, "llama.cpp GGUF Q8_0: blocks of 32 int8 + one fp16 scale, 34 B"),
    "q4_0": (18 / 32, "llama.cpp GGUF Q4_0: blocks of 32 4-bit + one fp16 scale, 18 B"),
    "q4_k": (
        144 / 256,
        "llama.cpp GGUF Q4_K: super-blocks of 256 4-bit, 6-bit sub-scales, fp16 d, dmin: 144 B",
    ),
}


def expert_bytes(cfg: ModelConfig, expert_dtype: str = "bfloat16") -> int:
    """One expert of `cfg` stored as `expert_dtype` (EXPERT_DTYPES), scales included: bytes."""
    if expert_dtype not in EXPERT_DTYPES:
        raise TinyMoeError(
            f"expert dtype {expert_dtype!r}: expected one of {', '.join(EXPERT_DTYPES)}"
        )
    one_byte_each = cfg.expert_bytes(torch.uint8)  # the engine's size formula, at 1 B/weight
    return math.ceil(one_byte_each * EXPERT_DTYPES[expert_dtype][0])


class MeasuredCosts:
    """Every time as the trace recorded it, times `compute_scale`; the link as given (see the
    top). compute_scale: 1 replays the recorded run's compute; validation sets it to what a real
    run's own compute measured over the replay's (validate.py), so that the comparison tests the
    simulator's copies, stalls and overlap rather than how busy the machine was in each run."""

    host_parallel = False  # recorded on a CPU: the host *is* the device

    def __init__(self, trace: RoutingTrace, link: LinkSpec, compute_scale: float = 1.0) -> None:
        self.trace, self.link, self.scale = trace, link, compute_scale
        self.expert_bytes = trace.model["expert_bytes"]

    def layer_s(self, p: int, layer: int, rec: LayerRecord) -> float:
        return (rec.attention_s + rec.router_s) * self.scale

    def expert_s(self, p: int, layer: int, rec: LayerRecord) -> float:
        return rec.expert_s * self.scale

    def host_expert_s(self, p: int, layer: int, rec: LayerRecord) -> float:
        return rec.expert_s * self.scale  # the same CPU computes it, from the host store

    def host_copies_s(
        self, p: int, layer: int, rec: LayerRecord, rows_in: int, rows_out: int
    ) -> float:
        return 0.0  # the host is the device: host experts' inputs and outputs stay where they are

    def guess_s(self, p: int, layer: int, rec: LayerRecord, predictor: str) -> float:
        return rec.guess_s.get(predictor, 0.0) * self.scale

    def head_s(self, p: int) -> float:
        return self.trace.passes[p].head_s * self.scale


class RooflineCosts:
    """Bytes over bandwidth on `hw` for a model shaped like `cfg`, its experts stored as
    `expert_dtype` (EXPERT_DTYPES); see the top. Every figure it assumes: `assumptions()`."""

    host_parallel = True
    # Assumptions (sources: ASSUMPTION_SOURCES, docs/simulator.md). Activations, attention
    # weights and the KV cache in bf16; batch-1 GEMVs reach 70% of the device's peak bandwidth
    # and of the host's; some ten kernel launches per layer cost 40 us.
    dtype, efficiency, host_efficiency, layer_overhead_s = torch.bfloat16, 0.7, 0.7, 40e-6

    def __init__(
        self, hw: Hardware, cfg: ModelConfig, context: int, expert_dtype: str = "bfloat16"
    ) -> None:
        self.hw, self.cfg, self.link, self.context = hw, cfg, hw.link, context
        self.expert_dtype = expert_dtype
        D, Dh, b = cfg.hidden_size, cfg.head_dim, self.dtype.itemsize
        self.expert_bytes = expert_bytes(cfg, expert_dtype)
        bw = hw.device_gbps * 1e9 * self.efficiency
        attn = (2 * cfg.num_heads + 2 * cfg.num_kv_heads) * Dh * D * b  # q, o and k, v
        kv = 2 * context * cfg.num_kv_heads * Dh * b  # this layer's cache, read once
        overhead = self.layer_overhead_s
        self._layer = (attn + kv + D * cfg.num_experts * b) / bw + overhead
        self._expert = self.expert_bytes / bw
        self._host = self.expert_bytes / (hw.host_peak_gbps * 1e9 * self.host_efficiency)
        self._row_bytes = D * b  # one token's activations
        self._head = cfg.vocab_size * D * b / bw
        self._guess = (D * cfg.num_experts * b) / bw + overhead / 4  # a few small kernels

    def layer_s(self, p: int, layer: int, rec: LayerRecord) -> float:
        return self._layer

    def expert_s(self, p: int, layer: int, rec: LayerRecord) -> float:
        return self._expert

    def host_expert_s(self, p: int, layer: int, rec: LayerRecord) -> float:
        return self._host

    def host_copies_s(
        self, p: int, layer: int, rec: LayerRecord, rows_in: int, rows_out: int
    ) -> float:
        """A layer's host experts: their inputs to the host, then their outputs back (rows)."""
        return self.link.seconds(rows_in * self._row_bytes) + self.link.seconds(
            rows_out * self._row_bytes
        )

    def guess_s(self, p: int, layer: int, rec: LayerRecord, predictor: str) -> float:
        return self._guess

    def head_s(self, p: int) -> float:
        return self._head

    def assumptions(self, trace: RoutingTrace | None = None) -> dict:
        """Every figure this projection assumes: {name: {"value", "source"}}; with the replayed
        `trace`, how its routing was mapped onto the target (scale_trace) too."""
        hw, link = self.hw, self.link
        per_param, dtype_source = EXPERT_DTYPES[self.expert_dtype]
        got = {
            "hardware": (hw.name, hw.source),
            "device_gbps_peak": (hw.device_gbps, hw.source),
            "device_efficiency": (self.efficiency, ASSUMPTION_SOURCES["efficiency"]),
            "layer_overhead_us": (self.layer_overhead_s * 1e6, ASSUMPTION_SOURCES["overhead"]),
            "kv_context_tokens": (self.context, "--context: cached positions each layer reads"),
            "activation_dtype": ("bfloat16", "activations, attention, KV cache, LM head"),
            "link_gbps": (link.gbps, f"{link.name}; {ASSUMPTION_SOURCES['link']}"),
            "link_latency_us": (link.latency_us, ASSUMPTION_SOURCES["latency"]),
            "host_gbps_peak": (hw.host_peak_gbps, hw.source),
            "host_efficiency": (self.host_efficiency, ASSUMPTION_SOURCES["host_efficiency"]),
            "host_experts": ("overlapped", ASSUMPTION_SOURCES["host_experts"]),
            "expert_dtype": (self.expert_dtype, dtype_source),
            "expert_bytes_per_param": (per_param, dtype_source),
            "expert_bytes": (self.expert_bytes, "weights per expert x bytes per param, rounded up"),
        }
        scaled = trace.machine.get("scale_mapping") if trace is not None else None
        got["routing"] = (
            (scaled["name"], scaled["description"])
            if scaled
            else ("recorded", "the recorded model's own routing, unchanged")
        )
        return {k: {"value": v, "source": s} for k, (v, s) in got.items()}


ASSUMPTION_SOURCES = {
    "efficiency": "batch-1 GEMVs reach 60-80% of peak memory bandwidth (memory-bound kernels on "
    "NVIDIA GPUs, as STREAM-like copies do); the middle, 0.7",
    "overhead": "some ten kernel launches per layer at ~4 us each (CUDA launch latency)",
    "link": "about 80% of the PCI-SIG x16 peak (31.5 / 63.0 GB/s), what pinned cudaMemcpy "
    "reaches (CUDA bandwidthTest)",
    "latency": "an assumption: the fixed cost of one cudaMemcpyAsync, issue to completion",
    "host_efficiency": "a batch-1 GEMV streams its weights once, as STREAM's triad does, which "
    "reaches 70-80% of the DRAM peak (McCalpin, STREAM, cs.virginia.edu/stream); the low end, "
    "0.7. Assumes the host kernel is memory-bound: a CPU without native bf16 math may be slower",
    "host_experts": "as the engine runs them (experts.py, 'Host experts'): per layer one copy "
    "of the inputs to the host, the host experts in turn beside the device's, one copy back, "
    "each a link latency + rows x hidden x 2 B (off the expert link's queue)",
}


def projected_depth(costs: "RooflineCosts | MeasuredCosts", trace: RoutingTrace) -> int:
    """Exact prefetch's depth under `costs` (throttle_depth): one layer's compute is the
    resident decode step the costs give (attention and router, the step's experts on the device,
    the head, averaged over the trace's decode steps) over the layers; one copy is the costs'
    link carrying one expert. For a projection, the projected GPU's figures, not this machine's."""
    steps = [(p, ps) for p, ps in enumerate(trace.passes) if ps.phase == "decode"] or [
        (0, trace.passes[0])
    ]
    total = 0.0
    for p, ps in steps:
        for layer, rec in enumerate(ps.layers):
            n = len({e for row in rec.experts for e in row})
            total += costs.layer_s(p, layer, rec) + n * costs.expert_s(p, layer, rec)
        total += costs.head_s(p)
    layer_s = total / len(steps) / trace.model["num_layers"]
    copy_s = costs.link.seconds(costs.expert_bytes)
    return throttle_depth(layer_s, copy_s, trace.model["num_experts"])


def scale_trace(
    trace: RoutingTrace,
    cfg: ModelConfig,
    expert_dtype: str = "bfloat16",
    stay: float | None = None,
) -> RoutingTrace:
    """The recorded routing, re-expressed for a model shaped like `cfg` (an approximation):
    the "bucket-rotation" mapping. Every target expert is reachable and every token gets
    exactly K distinct ones; the recording's reuse is kept as far as the shapes allow.

    Layers: target layer l replays recorded layer l mod L_rec (as a layer of its own: its
    choices below are hashed with l). Buckets: recorded expert e stands for target experts
    [e*E // E_rec, (e+1)*E // E_rec) (E >= E_rec: the buckets partition the target's experts),
    or for expert e*E // E_rec alone (E < E_rec). A token (sequence position t) that recorded
    experts R at a layer gets K target experts: q = K // |R| from each e in R, one more from r =
    K mod |R| of them (the first r in the order of mix(t, l, e), which also settles collisions).
    Which members: e's candidates are its bucket rotated to start at (mix(l, e, 2) + epoch x C)
    mod b (b: bucket size, C = ceil(K / K_rec)), then the other experts, cyclically after the
    bucket; e takes its first candidates no one took. The epoch advances with e's uses at that
    layer: epoch = floor((n + phase) x (1 - stay)), n its uses before t, phase = mix(l, e, 1) /
    2^64. So a reuse of e keeps its members with probability `stay`, else moves to the next C
    of its bucket. Default stay = min(1, (K/E) / (K_rec/E_rec)): a target expert recurs as far
    above its chance K/E as the recorded expert did above K_rec/E_rec (Qwen3-30B-A3B from the
    demo's 32/top-4: 0.5; the same sparsity: 1, a pure relabelling). mix is splitmix64: fixed.

    Guesses: the guess recorded at layer l for layer l + lookahead maps as that layer's routing
    of the same token does (a g-id guess gets round(g K / K_rec) ids): a guess naming the
    routing's experts, in any order, maps to the routing's target experts. What recurs and how
    often a guess is right stay the recorded model's; expert_bytes follows `expert_dtype`.
    """
    E_rec, K_rec, L_rec = (trace.model[k] for k in ("num_experts", "top_k", "num_layers"))
    E, K, L, d = cfg.num_experts, cfg.top_k, cfg.num_layers, trace.lookahead
    m = BucketRotation(trace, E, K, stay)

    def layer(p: int, t: int) -> LayerRecord:
        r = trace.passes[p].layers[t % L_rec]
        lr = t % L_rec
        guesses = {n: m.rows(g, p, t + d, (lr + d) % L_rec) for n, g in r.guesses.items()}
        return LayerRecord(m.rows(r.experts, p, t, lr), guesses)

    passes = [
        PassRecord(ps.phase, [layer(p, t) for t in range(L)]) for p, ps in enumerate(trace.passes)
    ]
    model = {
        "model_type": cfg.model_type,
        "num_layers": L,
        "num_experts": E,
        "top_k": K,
        "hidden_size": cfg.hidden_size,
        "expert_dim": cfg.expert_dim,
        "expert_dtype": expert_dtype,
        "expert_bytes": expert_bytes(cfg, expert_dtype),
    }
    mapping = {
        "name": m.name,
        "stay": m.stay,
        "description": f"recorded {E_rec} experts top-{K_rec} x {L_rec} layers -> {E} top-{K} x "
        f"{L}: buckets of {E / E_rec:g}, a reuse keeps its members with probability "
        f"{m.stay:.3g} (scale_trace, docs/simulator.md)",
    }
    machine = {**trace.machine, "scaled_from": trace.model, "scale_mapping": mapping}
    return RoutingTrace(model, machine, trace.lookahead, trace.predictors, passes)
