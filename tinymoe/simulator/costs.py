"""What each piece of work costs in a replay: measured here, or projected onto other hardware.

`MeasuredCosts` takes every time from the trace (what this machine did) and the link from a
LinkSpec: with the link the trace was recorded over, a replay should reproduce the real run
(`python -m tinymoe.simulate --validate` checks that).

`RooflineCosts` projects onto a `Hardware` preset. At batch 1 every decode-step kernel is bound
by memory bandwidth, so each piece costs the bytes it reads over the bandwidth that reads them,
plus a fixed cost per layer for launching its kernels:

    one expert on the device   expert_bytes / (device GB/s * efficiency)
    one expert on the host     expert_bytes / host GB/s                (miss handler "cpu")
    a layer's host experts     + their inputs to the host and outputs back: one copy each
                               way, latency + rows x hidden x 2 B / link GB/s each
    attention + router         (attention weights + KV cache + router) / device GB/s + overhead
    one expert copy            the link: latency + expert_bytes / link GB/s
    norm + LM head             (vocab x hidden) / device GB/s

A layer's host experts run beside its device experts, as the engine runs them (experts.py, "Host
experts"): the layer takes max(device experts, copy in + host experts + copy out).

The presets' figures are the vendors' published peaks (sources beside each); the efficiency
and the overheads are assumptions (RooflineCosts).
"""

from dataclasses import dataclass

import torch

from tinymoe.engine.config import ModelConfig
from tinymoe.offload.link import LinkSpec
from tinymoe.simulator.record import LayerRecord, PassRecord, RoutingTrace


@dataclass(frozen=True)
class Hardware:
    name: str
    device_gbps: float  # device memory bandwidth, peak
    link: LinkSpec  # host-to-device, pinned, as typically measured (not the bus peak)
    host_gbps: float  # host memory bandwidth a CPU expert GEMV can use
    source: str


# PCIe: PCI-SIG peak 31.5 GB/s (4.0 x16) and 63.0 (5.0 x16); pinned cudaMemcpy reaches about 80%
# of it in practice (CUDA bandwidthTest), so 25 and 50 GB/s, 10 us per copy (an assumption).
# Host memory: channels x MT/s x 8 bytes (JEDEC), of which a CPU GEMV uses ~70%.
HARDWARE = {
    "rtx4090": Hardware(
        "RTX 4090, desktop (PCIe 4.0 x16, 2 ch DDR5-5600)",
        1008.0,
        LinkSpec(25.0, 10.0, "PCIe 4.0 x16, typical pinned"),
        0.7 * 89.6,
        "NVIDIA Ada Lovelace whitepaper: 21 Gbps GDDR6X x 384 bit = 1008 GB/s; host 2 x 5600 MT/s"
        " x 8 B = 89.6 GB/s",
    ),
    "a6000": Hardware(
        "RTX A6000, workstation (PCIe 4.0 x16, 8 ch DDR4-3200)",
        768.0,
        LinkSpec(25.0, 10.0, "PCIe 4.0 x16, typical pinned"),
        0.7 * 204.8,
        "NVIDIA RTX A6000 datasheet: 768 GB/s GDDR6; host 8 x 3200 MT/s x 8 B = 204.8 GB/s"
        " (the paper's GPU)",
    ),
    "h100-pcie": Hardware(
        "H100 PCIe, server (PCIe 5.0 x16, 8 ch DDR5-4800 per socket)",
        2000.0,
        LinkSpec(50.0, 10.0, "PCIe 5.0 x16, typical pinned"),
        0.7 * 307.2,
        "NVIDIA H100 datasheet: 2.0 TB/s HBM2e (PCIe card); host 8 x 4800 MT/s x 8 B = 307.2 GB/s",
    ),
}


class MeasuredCosts:
    """Every time as the trace recorded it; the link as given (see the top)."""

    host_parallel = False  # recorded on a CPU: the host *is* the device

    def __init__(self, trace: RoutingTrace, link: LinkSpec) -> None:
        self.trace, self.link = trace, link
        self.expert_bytes = trace.model["expert_bytes"]

    def layer_s(self, p: int, layer: int, rec: LayerRecord) -> float:
        return rec.attention_s + rec.router_s

    def expert_s(self, p: int, layer: int, rec: LayerRecord) -> float:
        return rec.expert_s

    def host_expert_s(self, p: int, layer: int, rec: LayerRecord) -> float:
        return rec.expert_s  # the same CPU computes it, from the host store instead of a slot

    def host_copies_s(
        self, p: int, layer: int, rec: LayerRecord, rows_in: int, rows_out: int
    ) -> float:
        return 0.0  # the host is the device: host experts' inputs and outputs stay where they are

    def guess_s(self, p: int, layer: int, rec: LayerRecord, predictor: str) -> float:
        return rec.guess_s.get(predictor, 0.0)

    def head_s(self, p: int) -> float:
        return self.trace.passes[p].head_s


class RooflineCosts:
    """Bytes over bandwidth on `hw` for a model shaped like `cfg` (see the top)."""

    host_parallel = True
    # Assumptions: bf16 weights and activations; batch-1 GEMVs reach 60-80% of peak bandwidth;
    # some ten kernel launches per layer (40 us); the host experts' two copies cost what the
    # link's copies do (its latency each), device to host as host to device.
    dtype, efficiency, layer_overhead_s = torch.bfloat16, 0.7, 40e-6

    def __init__(self, hw: Hardware, cfg: ModelConfig, context: int) -> None:
        self.hw, self.cfg, self.link = hw, cfg, hw.link
        D, Dh, b = cfg.hidden_size, cfg.head_dim, self.dtype.itemsize
        self.expert_bytes = cfg.expert_bytes(self.dtype)
        bw = hw.device_gbps * 1e9 * self.efficiency
        attn = (2 * cfg.num_heads + 2 * cfg.num_kv_heads) * Dh * D * b  # q, o and k, v
        kv = 2 * context * cfg.num_kv_heads * Dh * b  # this layer's cache, read once
        overhead = self.layer_overhead_s
        self._layer = (attn + kv + D * cfg.num_experts * b) / bw + overhead
        self._expert = self.expert_bytes / bw
        self._host = self.expert_bytes / (hw.host_gbps * 1e9)
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


def scale_trace(trace: RoutingTrace, cfg: ModelConfig) -> RoutingTrace:
    """The recorded routing, re-expressed for a model shaped like `cfg` (an approximation).

    Layer l of the target replays recorded layer l mod L_rec (as a layer of its own). A recorded
    expert e stands for the target experts of its bucket, e*b .. e*b+b-1 with b = E / E_rec (or
    e mod E when the target has fewer experts); a token's K target experts are taken from its
    recorded experts in order, K / K_rec from each bucket. Which experts recur, and how often a
    guess is right, are the recorded model's: cache hit rates come out optimistic.
    """
    E_rec, K_rec, L_rec = (trace.model[k] for k in ("num_experts", "top_k", "num_layers"))
    E, K = cfg.num_experts, cfg.top_k
    b = max(E // E_rec, 1)
    per = max(K // K_rec, 1)

    def remap(rows: list[list[int]]) -> list[list[int]]:
        out = []
        for row in rows:
            ids: list[int] = []
            for e in row:
                members = [e * b + i for i in range(min(per, b))] if E_rec <= E else [e % E]
                ids += [x for x in members if x not in ids]
            out.append(ids[:K])
        return out

    def layer(r: LayerRecord) -> LayerRecord:
        return LayerRecord(remap(r.experts), {n: remap(g) for n, g in r.guesses.items()})

    passes = [
        PassRecord(p.phase, [layer(p.layers[l % L_rec]) for l in range(cfg.num_layers)])
        for p in trace.passes
    ]
    model = {
        "model_type": cfg.model_type,
        "num_layers": cfg.num_layers,
        "num_experts": E,
        "top_k": K,
        "hidden_size": cfg.hidden_size,
        "expert_dim": cfg.expert_dim,
        "expert_bytes": cfg.expert_bytes(torch.bfloat16),
    }
    machine = {**trace.machine, "scaled_from": trace.model}
    return RoutingTrace(model, machine, trace.lookahead, trace.predictors, passes)
