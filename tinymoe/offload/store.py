"""The host expert store: every expert of every layer in host memory, where copies start from.

    layers[l]   (E, 3*I*D) on the host; row e is expert e of layer l, packed as in experts.py

A row is contiguous, so moving an expert to the device is ONE copy. The store is read-only:
eviction from the device cache never copies anything back.

Pinned, exactly. When the compute device is CUDA the rows are page-locked ("pinned"): only
page-locked memory is copied by the DMA engine while the GPU computes (`non_blocking=True`); a
copy from ordinary (pageable) memory goes through a staging buffer and blocks the host.
`host_buffer` allocates the experts of all layers as ONE (L, E, 3*I*D) buffer and locks exactly
its pages: anonymous memory from mmap (page-aligned, so every locked page is the buffer's own and
none is shared with a neighbour), registered with cudaHostRegister. Two alternatives were
rejected:
- `torch.empty(..., pin_memory=True)`: PyTorch's pinned allocator caches blocks for reuse and
  rounds every allocation up to a power of two, so Mixtral-8x7B's 84 GiB of bf16 experts would
  lock about 128 GiB of RAM that nothing else can use.
- `PYTORCH_CUDA_ALLOC_CONF=pinned_use_cuda_host_register:True`: it changes how that allocator
  pins (malloc + cudaHostRegister), not how it rounds, and it is process-wide state that has to
  be set before CUDA starts, which a library must not do to its caller.
torch.cuda.cudart() binds cudaHostRegister/cudaHostUnregister (since long before torch 2.5), and
`is_pinned()` is true for registered memory (PyTorch's own test_cudart_register checks both).

Lifetime. A registration lasts exactly as long as its memory: it is released, after a device
synchronize (a copy may still be reading), when the last tensor viewing the buffer is freed. So
whoever holds the experts keeps them pinned, and nothing is unregistered under a live tensor.
`take_from` adopts experts already pinned on the host (`load_model(..., expert_device="cpu")`
reads them straight into a `host_buffer`), or copies them off the device into a new one;
`give_back` returns them, and on the host they stay pinned with the model, ready for the next
runtime to adopt. Either way the host never holds the experts twice.

Quantized experts (quant.py). With a QuantFormat the store holds the experts' codes and scales
instead (`QuantizedExperts`, in host_buffers, pinned as above), and `expert()` is a
`QuantizedExpert`: a copy moves its bytes and the device dequantizes them into the slot. The
store adopts the quantized experts the loader made (`load_model(expert_quant=...)`, the way to
never hold an expert in the model's dtype on the host), or quantizes the model's resident
experts, expert by expert, leaving them where they are (they are the model's, untouched, and
nothing has to be given back). `quantized_resident` puts a model's experts in quantized form in
place for a while (a resident run of the very weights an offloaded one copies).
"""

import contextlib
import math
import mmap
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from tinymoe.errors import TinyMoeError
from tinymoe.offload.quant import QuantFormat, QuantizedExpert, QuantizedExperts

if TYPE_CHECKING:  # a type only: the loader imports host_buffer from here, so no engine import
    from tinymoe.engine.model import MoETransformer


def _lock(ptr: int, nbytes: int) -> int:
    """Page-lock [ptr, ptr + nbytes) for CUDA copies; returns the device to sync on release."""
    cudart = torch.cuda.cudart()
    # Flags 0 (cudaHostRegisterDefault): with unified addressing, mapped and usable by every GPU.
    err = cudart.cudaHostRegister(ptr, nbytes, 0)
    if int(err) != 0:
        raise TinyMoeError(
            f"cannot page-lock {nbytes / 2**30:.2f} GiB of host memory for the experts "
            f"({cudart.cudaGetErrorString(err)}); free host memory, or keep the experts on the GPU "
            "(no offloading) if they fit"
        )
    return torch.cuda.current_device()


def _unlock(ptr: int, device: int) -> None:
    torch.cuda.synchronize(device)  # SYNC: an in-flight copy may still be reading these pages
    torch.cuda.cudart().cudaHostUnregister(ptr)


class _PageLocked(mmap.mmap):
    """Anonymous host memory (page-aligned), page-locked for CUDA until it is freed.

    Tensors made from it with torch.frombuffer keep it alive; when the last one is freed it is
    unlocked here, just before the mapping goes away.
    """

    ptr = 0  # the registered address; 0 while not registered
    device = 0

    def lock(self, ptr: int) -> None:
        self.device = _lock(ptr, len(self))
        self.ptr = ptr

    def __del__(self) -> None:
        if self.ptr:
            ptr, self.ptr = self.ptr, 0
            # At interpreter exit CUDA may be gone already; the driver unlocks everything then.
            with contextlib.suppress(Exception):
                _unlock(ptr, self.device)


def host_buffer(shape: tuple[int, ...], dtype: torch.dtype, pin: bool) -> Tensor:
    """An uninitialised host tensor; with pin, page-locked for CUDA copies, exactly its own pages.

    The pinned form is one allocation of exactly prod(shape) * itemsize bytes (the kernel maps
    whole pages, so at most one page more), locked as a whole and unlocked when freed.
    """
    if not pin:
        return torch.empty(shape, dtype=dtype)
    numel = math.prod(shape)
    # -1: anonymous memory, not a file. MAP_PRIVATE: ordinary process memory, as malloc gives
    # (mmap's default, MAP_SHARED, would be shared memory); Windows has no flags to pass.
    private = {"flags": mmap.MAP_PRIVATE} if hasattr(mmap, "MAP_PRIVATE") else {}
    mem = _PageLocked(-1, numel * dtype.itemsize, **private)
    buf = torch.frombuffer(mem, dtype=dtype, count=numel).view(shape)  # shares mem, keeps it alive
    try:
        mem.lock(buf.data_ptr())
    except BaseException:
        del buf
        mem.close()  # return the pages now, not whenever the traceback is dropped
        raise
    return buf


def quantized_buffers(
    num_layers: int, num_experts: int, numel: int, fmt: QuantFormat, pin: bool
) -> QuantizedExperts:
    """Room for every expert quantized as `fmt`, on the host (pinned when `pin`)."""
    codes = host_buffer((num_layers, num_experts, fmt.code_bytes(numel)), torch.uint8, pin)
    scales = host_buffer((num_layers, num_experts, fmt.groups(numel)), torch.float16, pin)
    return QuantizedExperts(codes, scales, fmt)


def quantize_weights(weights: list[Tensor], fmt: QuantFormat, pin: bool) -> QuantizedExperts:
    """Quantize layers of experts [(E, 3*I*D)] * L, wherever they are, expert by expert (a
    device's experts come to the host one at a time: never a second whole copy)."""
    L, (E, N) = len(weights), weights[0].shape
    fmt.check(N)
    q = quantized_buffers(L, E, N, fmt, pin)
    for layer, w in enumerate(weights):
        for e in range(E):
            q.quantize_expert(layer, e, w[e].cpu())  # SYNC (CUDA): one expert read, at setup
    return q


@contextlib.contextmanager
def quantized_resident(model: "MoETransformer", fmt: QuantFormat) -> Iterator[QuantizedExperts]:
    """While inside, the model's experts are `fmt`-quantized: `model.experts.quantized` holds
    the codes and scales (an OffloadRuntime with this format adopts them) and its resident
    weights are what they read back as, so the bare model is the resident run of the very
    experts an offloaded run copies. On exit the original weights are back. (The original and
    the read-back weights are both held meanwhile: a tool's comparison, not a way to run.)"""
    experts = model.experts
    saved, before = [p.data for p in experts.weights], experts.quantized
    q = quantize_weights(saved, fmt, pin=model.embed_tokens.weight.is_cuda)
    try:
        with torch.inference_mode(False), torch.no_grad():  # (see take_from)
            for layer, p in enumerate(experts.weights):
                back = torch.empty_like(saved[layer])
                q.dequantize_layer(layer, back)
                p.data = back
        experts.quantized = q
        yield q
    finally:
        with torch.inference_mode(False), torch.no_grad():
            for p, w in zip(experts.weights, saved, strict=True):
                p.data = w
        experts.quantized = before


class HostExpertStore:
    def __init__(
        self,
        layers: list[Tensor],
        home: torch.device,
        quantized: QuantizedExperts | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.layers = layers  # [(E, 3*I*D)] * L, on the host (often views of one host_buffer)
        self.home = home  # where the model kept its experts (give_back returns them there)
        self.quantized = quantized  # instead of layers: the experts' codes and scales
        self.dtype = dtype or layers[0].dtype  # what an expert is computed in
        self.expert_bytes = self.expert(0, 0).nbytes  # what one copy moves

    @classmethod
    def quantize_from(cls, model: "MoETransformer", fmt: QuantFormat) -> "HostExpertStore":
        """A store of the model's experts quantized as `fmt` (see the top): the loader's
        quantized experts adopted when their format is `fmt`, else the model's resident experts
        quantized, expert by expert; the model's own weights are left as they are."""
        experts, dtype = model.experts, model.embed_tokens.weight.dtype
        home = experts.weights[0].device
        q = experts.quantized
        if q is None or q.fmt != fmt:
            if q is not None or experts.weights[0].numel() == 0:
                have = "none in the model's dtype" if q is None else f"{q.fmt}"
                raise TinyMoeError(
                    f"expert quantization {fmt}: the model's experts were loaded as {have}; "
                    "load them again with this --expert-quant/--expert-group-size"
                )
            q = quantize_weights(list(experts.weights), fmt, pin=home.type == "cuda")
        return cls([], home, q, dtype)

    @classmethod
    def take_from(cls, model: "MoETransformer", pin: bool | None = None) -> "HostExpertStore":
        """Move model.experts' weights into a host store, leaving the model without experts.

        All or nothing: every layer is on the host before the model lets go of any, so on an
        error the model is untouched. Each expert tensor is then replaced by an empty one, so
        code that would still read resident experts fails loudly instead of computing with them.
        pin: page-lock the host copy (default: when the model computes on CUDA).
        """
        if pin is None:
            pin = model.embed_tokens.weight.device.type == "cuda"
        params = list(model.experts.weights)
        home = params[0].device
        layers = [p.data for p in params]  # (E, 3*I*D) each, where the loader put them
        # Already where copies start from (load_model(expert_device="cpu")): adopt, no copy.
        move = [i for i, w in enumerate(layers) if not (w.is_cpu and (w.is_pinned() or not pin))]
        # Ordinary tensors even inside torch.inference_mode(): they go back into the model's
        # Parameters (give_back), which must stay usable like any other outside it.
        with torch.inference_mode(False), torch.no_grad():
            if move:
                buf = host_buffer((len(move), *layers[0].shape), layers[0].dtype, pin)
                try:
                    for row, i in enumerate(move):
                        buf[row].copy_(layers[i])  # SYNC: a blocking device-to-host copy, at setup
                except BaseException:
                    del buf  # unlock and free now, not whenever the traceback is dropped
                    raise
                for row, i in enumerate(move):
                    layers[i] = buf[row]
            for p in params:  # only now does the model let go of its experts
                p.data = torch.empty(0, device=home, dtype=p.dtype)
        return cls(layers, home)

    def give_back(self, model: "MoETransformer") -> None:
        """Put the experts back where the model kept them (on the GPU: needs room for all).
        Quantized, nothing moved: the model still has its weights and its quantized experts."""
        if self.quantized is not None:
            self.close()
            return
        with torch.inference_mode(False), torch.no_grad():  # (see take_from)
            for param, host in zip(model.experts.weights, self.layers, strict=True):
                param.data = host if self.home.type == "cpu" else host.to(self.home)
        self.close()

    def close(self) -> None:
        """Drop the store's hold on the host memory: pinned memory nothing else views is
        unlocked and freed now; rows given back to a model on the host stay pinned with it."""
        self.layers, self.quantized = [], None

    @property
    def num_layers(self) -> int:
        return len(self.layers) if self.quantized is None else self.quantized.codes.shape[0]

    def expert(self, layer: int, expert: int) -> "Tensor | QuantizedExpert":
        """Expert `expert` of layer `layer`, the source of one copy: a (3*I*D,) host view, or
        its codes and scales (QuantizedExpert.copy_into dequantizes them into the slot)."""
        if self.quantized is not None:
            return self.quantized.expert(layer, expert)
        return self.layers[layer][expert]

    def host_weights(self, layer: int, expert: int) -> Tensor:
        """The expert's (3*I*D,) weights on the host, to compute with there (the CPU miss
        handler): the store's row, or a quantized expert read back in the model's dtype."""
        src = self.expert(layer, expert)
        return src if isinstance(src, Tensor) else src.dequantized(self.dtype)
