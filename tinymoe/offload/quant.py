"""Quantized experts: fewer bytes on the link, dequantized on the device into the slot.

An expert copy costs its bytes; prediction can only hide them. Storing the experts in the host
store with fewer bits per weight shrinks every copy. tinymoe's format, on the packed expert
buffer (engine/experts.py: [gate | up | down], N = 3*I*D weights), is symmetric and group-wise:

    groups    the buffer cut into N / g groups of g consecutive weights (g = 64 by default)
    scale     one per group, fp16:  s = max|w| / qmax over the group   (qmax 127 int8, 7 int4)
    codes     q = round(w / s), clamped to [-qmax, qmax]; w is read back as q * s

    int8:  q    (N,)    uint8 bytes, each an int8 code      1 + 2/g bytes per weight
    int4:  q    (N/2,)  uint8, two codes a byte:            0.5 + 2/g bytes per weight
                        weight 2j in the low nibble, 2j+1 in the high one, each stored as q + 8
    scales      (N/g,)  fp16

Symmetric: no zero point (the weights of a trained layer are centred on zero), so reading a
weight back is one multiply. Groups run along the flat buffer; where a matrix row is a multiple of
g (every published shape) a group is part of one row, as in GPTQ and llama.cpp's Q4_0.

The scale is rounded to fp16 BEFORE the codes are computed, so the codes absorb its rounding and
q * s is exactly what was meant. Reading back computes q * s in fp32, where it is exact (8 bits
times 11 bits of mantissa), then rounds once to the model's dtype: every device, the host's
resident copy and the device's slot alike, gets the same bits. That is why an offloaded run
with quantized experts generates exactly the tokens of a resident run of the same experts.

Where it runs (store.py, transfer.py): experts are quantized once, at load, expert by expert
(engine/loader.py), into the host store; a copy moves the codes and scales (`QuantizedExpert.
nbytes`, what the meter counts and the simulated link charges) and the device dequantizes them
into the slot, so slots, cache and scheduler keep their meaning. Attention, norms, routers and
the LM head stay in the model's dtype.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from tinymoe.errors import TinyMoeError

EXPERT_QUANTS = ("none", "int8", "int4")  # --expert-quant
DEFAULT_GROUP_SIZE = 64  # --expert-group-size
SCALE_DTYPE = torch.float16
_BITS = {"int8": 8, "int4": 4}


@dataclass(frozen=True)
class QuantFormat:
    """A storage format of the experts: `bits` (8 or 4) per weight, one fp16 scale per
    `group_size` consecutive weights of the packed buffer."""

    bits: int
    group_size: int = DEFAULT_GROUP_SIZE

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise TinyMoeError(f"expert quantization: {self.bits} bits is not supported (8 or 4)")
        if self.group_size < 2 or self.group_size % 2:
            raise TinyMoeError(
                f"--expert-group-size must be an even number >= 2, got {self.group_size}"
            )

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    def __str__(self) -> str:
        return f"{self.name}, group {self.group_size}"

    @property
    def tag(self) -> str:
        """ "int4-g64": the format and its group size (the simulator's EXPERT_DTYPES name)."""
        return f"{self.name}-g{self.group_size}"

    @property
    def qmax(self) -> int:
        """The largest code: 127 (int8) or 7 (int4); codes are symmetric, -qmax..qmax."""
        return 2 ** (self.bits - 1) - 1

    def code_bytes(self, numel: int) -> int:
        """Bytes of the codes of `numel` weights: numel (int8) or numel / 2 (int4)."""
        return numel * self.bits // 8

    def groups(self, numel: int) -> int:
        return numel // self.group_size

    def expert_bytes(self, numel: int) -> int:
        """What one expert of `numel` weights moves on the link: its codes and its scales."""
        return self.code_bytes(numel) + self.groups(numel) * SCALE_DTYPE.itemsize

    @property
    def bytes_per_weight(self) -> float:
        """Codes and scales, per weight (the simulator's storage-format table uses this)."""
        return self.bits / 8 + SCALE_DTYPE.itemsize / self.group_size

    def check(self, numel: int) -> None:
        """Refuse a buffer the groups do not tile (every published shape's do at 32..128)."""
        if numel % self.group_size:
            raise TinyMoeError(
                f"--expert-group-size {self.group_size} does not divide an expert's {numel} "
                "weights; choose a divisor (e.g. 32 or 64)"
            )


def quant_format(
    name: str, group_size: int = DEFAULT_GROUP_SIZE, numel: int | None = None
) -> QuantFormat | None:
    """--expert-quant's value as a format (checked to tile experts of `numel` weights, when
    given); None for "none" (the model's own dtype)."""
    if name not in EXPERT_QUANTS:
        raise TinyMoeError(f"--expert-quant {name!r}: expected one of {', '.join(EXPERT_QUANTS)}")
    if name == "none":
        return None
    fmt = QuantFormat(_BITS[name], group_size)
    if numel is not None:
        fmt.check(numel)
    return fmt


# ---------------------------------------------------------------- int4: two codes a byte


def pack_int4(q: Tensor) -> Tensor:
    """Codes q (..., 2n) in [-8, 7] -> (..., n) uint8: q[2j] + 8 in the low nibble of byte j,
    q[2j+1] + 8 in the high one."""
    u = (q + 8).to(torch.uint8).view(*q.shape[:-1], -1, 2)  # (..., n, 2), each in 0..15
    return u[..., 0] | (u[..., 1] << 4)  # (..., n)


def unpack_int4(b: Tensor) -> Tensor:
    """(..., n) uint8 -> codes (..., 2n) int8 in [-8, 7]: pack_int4 undone."""
    low, high = b & 0x0F, b >> 4  # (..., n) each, 0..15
    return torch.stack([low, high], dim=-1).view(*b.shape[:-1], -1).view(torch.int8) - 8


# ---------------------------------------------------------------- one expert


def quantize(w: Tensor, fmt: QuantFormat, codes: Tensor, scales: Tensor) -> None:
    """Quantize the packed buffer w (N,) into codes (code_bytes(N),) uint8 and scales (N/g,)
    fp16, written in place (rows of the host store). Group i is w[i*g : (i+1)*g], g =
    fmt.group_size; its scale is s = max|w| / fmt.qmax over the group, rounded to fp16 and at
    least 2**-24 (fp16's smallest step: an all-zero group stays zero); its codes are round(w / s)
    (ties to even) with s as stored, clamped to [-qmax, qmax]: int8 codes as their own bytes,
    int4 codes two a byte (pack_int4)."""
    g = w.detach().float().view(-1, fmt.group_size)  # (G, g); (a Parameter: no autograd here)
    # The scale as stored (fp16), at least fp16's smallest step: an all-zero group stays zero.
    s = (g.abs().amax(dim=1) / fmt.qmax).clamp(min=2**-24).to(SCALE_DTYPE)  # (G,)
    q = g / s.float()[:, None]  # (G, g) fp32, rounded in place: one temporary, not three
    q = q.round_().clamp_(-fmt.qmax, fmt.qmax).to(torch.int8)  # (G, g)
    scales.copy_(s)
    if fmt.bits == 8:
        codes.copy_(q.view(-1).view(torch.uint8))
    else:
        codes.copy_(pack_int4(q.view(-1)))


def dequantize(codes: Tensor, scales: Tensor, fmt: QuantFormat, out: Tensor) -> None:
    """codes and scales (as `quantize` writes them) -> out (N,) in out's dtype, written in
    place: q * s computed in fp32, where it is exact, rounded once, so every device reads back
    the same bits (see the top). All three on one device."""
    q = codes.view(torch.int8) if fmt.bits == 8 else unpack_int4(codes)  # (N,) int8
    q, s = q.view(-1, fmt.group_size), scales.float()[:, None]  # (G, g), (G, 1)
    if out.dtype == torch.float32:  # straight into the slot: the product is exact in fp32
        torch.mul(q, s, out=out.view(q.shape))
    else:
        out.view(q.shape).copy_(q * s)  # exact in fp32, then one rounding to out's dtype


@dataclass
class QuantizedExpert:
    """One expert in the host store, quantized: the source of one copy (transfer.py)."""

    codes: Tensor  # (code_bytes(N),) uint8, a row of the store
    scales: Tensor  # (N/g,) fp16
    fmt: QuantFormat

    @property
    def nbytes(self) -> int:
        """The bytes a copy moves: the meter counts them, the simulated link charges them."""
        return self.codes.nbytes + self.scales.nbytes

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def copy_into(self, slot: Tensor, non_blocking: bool = False) -> None:
        """Codes and scales to the slot's device (ONE copy each), dequantized there into the
        slot (N,). On a CPU the host is the device: nothing to move, only the dequantizing."""
        codes, scales = self.codes, self.scales
        if slot.device != codes.device:
            codes = codes.to(slot.device, non_blocking=non_blocking)
            scales = scales.to(slot.device, non_blocking=non_blocking)
        dequantize(codes, scales, self.fmt, slot)

    def dequantized(self, dtype: torch.dtype) -> Tensor:
        """The expert's weights (N,) in dtype, where the codes are (the CPU miss handler's)."""
        out = torch.empty(self.codes.numel() * 8 // self.fmt.bits, dtype=dtype)
        dequantize(self.codes, self.scales, self.fmt, out)
        return out


class QuantizedExperts:
    """Every expert of every layer, quantized, on the host: what the host store keeps.

        codes   (L, E, code_bytes(N)) uint8      scales   (L, E, N/g) fp16

    Made by the loader (quantized at load, expert by expert) or by `quantize_experts`; the
    buffers come from the store's host_buffer (page-locked on CUDA, see store.py).
    """

    def __init__(self, codes: Tensor, scales: Tensor, fmt: QuantFormat) -> None:
        self.codes, self.scales, self.fmt = codes, scales, fmt

    def quantize_expert(self, layer: int, expert: int, w: Tensor) -> None:
        quantize(w, self.fmt, self.codes[layer, expert], self.scales[layer, expert])

    def expert(self, layer: int, expert: int) -> QuantizedExpert:
        return QuantizedExpert(self.codes[layer, expert], self.scales[layer, expert], self.fmt)

    def quantize_layer(
        self, layer: int, read: Callable[[int, Tensor], None], dtype: torch.dtype, resident: Tensor
    ) -> None:
        """Quantize layer `layer`'s experts as `read(e, out)` gives them, one at a time, in
        dtype (the loader's); each is read back into resident (E, N) unless that is empty."""
        one = torch.empty(self.codes.shape[2] * 8 // self.fmt.bits, dtype=dtype)  # (N,), reused
        for e in range(self.codes.shape[1]):
            read(e, one)
            self.quantize_expert(layer, e, one)
            if resident.numel():
                self.expert(layer, e).copy_into(resident[e])

    def dequantize_layer(self, layer: int, out: Tensor) -> None:
        """Layer `layer`'s experts read back into out (E, N), expert by expert."""
        for e in range(out.shape[0]):
            self.expert(layer, e).copy_into(out[e])

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scales.nbytes
