"""What a run needs in memory, counted from config.json before any weight is read.

The tools check it against the memory free before their long work (tinymoe/cli.py,
dtype_from_args): a run that cannot fit stops in one line instead of after minutes of loading.
Every figure here is what the code allocates, by memory pool ("host", "cuda") and part:

    other weights        attention, norms, routers, embeddings and LM head, in the model's dtype
    experts              every expert in the model's dtype (resident, or the host store's)
    quantized experts    their codes and scales (--expert-quant; offload/quant.py), on the host
    expert slots         an offloading runtime's slots on the device, in the model's dtype
    KV cache             keys and values of `positions` positions

plus headroom for what is not counted (activations, the allocator's slack).
"""

import contextlib
import os

import torch

from tinymoe.engine.config import ModelConfig
from tinymoe.engine.model import MoETransformer
from tinymoe.offload.quant import QuantFormat


def weight_bytes(cfg: ModelConfig, dtype: torch.dtype) -> tuple[int, int]:
    """Bytes load_model allocates for cfg's weights in dtype: (all but the experts, the experts).

    Counted on the very model load_model builds, on the `meta` device (shapes only, nothing
    allocated; a tied LM head counted once), so the count cannot drift from the model code.
    """
    with torch.device("meta"):
        model = MoETransformer(cfg)
    experts = cfg.num_layers * cfg.num_experts * cfg.expert_numel
    total = sum(p.numel() for p in model.parameters())
    return (total - experts) * dtype.itemsize, experts * dtype.itemsize


def quantized_bytes(cfg: ModelConfig, fmt: QuantFormat) -> int:
    """Bytes of every expert of cfg quantized as fmt: the host store's codes and scales."""
    return cfg.num_layers * cfg.num_experts * fmt.expert_bytes(cfg.expert_numel)


# What a run allocates beyond what memory_needs counts (weights, expert slots, KV cache):
# activations (a prefill's logits alone are T x V floats), the allocator's rounding and
# fragmentation, the tensor being cast (or the expert being quantized) while loading. 10% of
# what is counted, at least 256 MiB. (The process itself, Python and torch, is already running
# when free memory is read.)
HEADROOM_SHARE = 0.10
HEADROOM_MIN_BYTES = 256 * 2**20


def with_headroom(nbytes: int) -> int:
    """nbytes plus the headroom above (0 stays 0: a pool nothing goes to needs nothing)."""
    return nbytes + max(int(nbytes * HEADROOM_SHARE), HEADROOM_MIN_BYTES) if nbytes else 0


def memory_needs(
    cfg: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    positions: int = 0,
    slots: int = 0,
    experts: str = "device",
    quant: QuantFormat | None = None,
    beside: str = "",
) -> dict[str, dict[str, int]]:
    """Bytes a run allocates, by memory pool and part: {"host": parts} on a CPU (the device is
    the host), {"cuda": parts, "host": parts} on CUDA.

    positions: the KV cache's. slots: the offloading runtime's expert slots, on the device; on
    a CPU they add to the experts, which the host store adopts from the model without a copy.
    experts: "device" (resident), "host" (load_model(expert_device="cpu"): on the device only
    the rest), or "device+host" (loaded on the device; an offloading runtime allocates its
    slots, then moves them to the host: on CUDA both, at the peak).
    quant: the experts' format (load_model(expert_quant=...)): the host holds their codes and
    scales, and, unless experts is "host", the model holds what they read back as, in dtype
    (the resident run of the same experts; an offloading runtime adopts the codes, the model
    keeps its experts). With experts "host" the codes are all there is of them.
    beside: what a tool keeps in dtype beside quantized experts, to compare them with the
    model's own: "experts" (bench: quantized_resident's two sets) or "model" (evaluate's
    reference model, loaded unquantized).
    """
    weights, expert_bytes = weight_bytes(cfg, dtype)
    kv = 2 * cfg.num_layers * cfg.num_kv_heads * positions * cfg.head_dim * dtype.itemsize
    parts = {"other weights": weights, "experts": expert_bytes}
    if quant is not None and beside:  # in the model's dtype, where the model is
        parts["reference " + beside] = expert_bytes + (weights if beside == "model" else 0)
    parts.update({"expert slots": slots * cfg.expert_bytes(dtype), "KV cache": kv})
    codes = {"quantized experts": quantized_bytes(cfg, quant)} if quant is not None else {}
    if experts == "host" and (quant is not None or device.type != "cpu"):
        del parts["experts"]  # read to the host: as codes only, or (CUDA) into the host's pool
    if device.type == "cpu":
        return {"host": parts | codes}
    host = codes or ({} if experts == "device" else {"experts": expert_bytes})
    return {device.type: parts, "host": host}


def shortfall(needs: dict[str, dict[str, int]], free: dict[str, int]) -> tuple[str, int] | None:
    """The first pool where what goes there, with headroom, exceeds what is free: (pool,
    bytes without headroom); None when everything fits."""
    for pool, parts in needs.items():
        if with_headroom(total := sum(parts.values())) > free[pool]:
            return pool, total
    return None


def free_host_bytes() -> int:
    """Host memory a new allocation can get: Linux's MemAvailable (free memory plus the page
    cache it would evict), else all physical memory."""
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # the file counts kB
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): do not refuse
        return 2**62
