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
"""

import contextlib
import math
import mmap
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from tinymoe.errors import TinyMoeError

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


class HostExpertStore:
    def __init__(self, layers: list[Tensor], home: torch.device) -> None:
        self.layers = layers  # [(E, 3*I*D)] * L, on the host (often views of one host_buffer)
        self.home = home  # where the model kept its experts (give_back returns them there)
        self.expert_bytes = layers[0][0].nbytes

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
        """Put the experts back where the model kept them (on the GPU: needs room for all)."""
        with torch.inference_mode(False), torch.no_grad():  # (see take_from)
            for param, host in zip(model.experts.weights, self.layers, strict=True):
                param.data = host if self.home.type == "cpu" else host.to(self.home)
        self.close()

    def close(self) -> None:
        """Drop the store's hold on the host memory: pinned memory nothing else views is
        unlocked and freed now; rows given back to a model on the host stay pinned with it."""
        self.layers = []

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def expert(self, layer: int, expert: int) -> Tensor:
        """Expert `expert` of layer `layer`: a (3*I*D,) host view, the source of one copy."""
        return self.layers[layer][expert]
