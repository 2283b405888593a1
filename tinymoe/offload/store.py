"""The host expert store: every expert of every layer in host memory, where copies start from.

    layers[l]   (E, 3*I*D) on the host; row e is expert e of layer l, packed as in experts.py

A row is contiguous, so moving an expert to the device is ONE copy. When the compute device is
CUDA the rows live in pinned (page-locked) memory: only pinned memory can be copied with
`non_blocking=True`, i.e. by the DMA engine while the GPU computes; a copy from ordinary
(pageable) memory goes through a staging buffer and blocks the host.

The store takes the experts out of a loaded model layer by layer and frees each layer's
original as it goes, so the process never holds a second full copy of the experts (at most one
extra layer, during the move). Experts already on the host (on the CPU, or loaded with
`load_model(..., expert_device="cpu")`, which reads them straight into pinned memory when the
compute device is CUDA) are kept as they are: nothing to move. `give_back` puts the experts back
where the model kept them. The store is read-only: eviction from the device cache never copies
anything back.
"""

import torch
from torch import Tensor

from tinymoe.engine.model import MoETransformer


class HostExpertStore:
    def __init__(self, layers: list[Tensor], home: torch.device) -> None:
        self.layers = layers  # [(E, 3*I*D)] * L, on the host
        self.home = home  # where the model kept its experts (give_back returns them there)
        self.expert_bytes = layers[0][0].numel() * layers[0].element_size()

    @classmethod
    def take_from(cls, model: MoETransformer) -> "HostExpertStore":
        """Move model.experts' weights into a host store, leaving the model without experts.

        Each of the model's expert tensors is replaced by an empty one, so any code that would
        still read resident experts fails loudly instead of computing with them.
        """
        device = model.embed_tokens.weight.device
        pin = device.type == "cuda"
        home = model.experts.weights[0].device
        layers = []
        with torch.no_grad():
            for param in model.experts.weights:
                w = param.data  # (E, 3*I*D) where the loader put them
                if w.device.type == "cpu" and (w.is_pinned() or not pin):
                    host = w  # already where copies start from (load_model(expert_device="cpu"))
                else:
                    host = torch.empty(w.shape, dtype=w.dtype, pin_memory=pin)
                    host.copy_(w)  # SYNC: a blocking device-to-host copy, once, at setup
                layers.append(host)
                param.data = torch.empty(0, device=home, dtype=w.dtype)  # free the original
        return cls(layers, home)

    def give_back(self, model: MoETransformer) -> None:
        """Put the experts back where the model kept them (on the GPU: needs room for all)."""
        with torch.no_grad():
            for param, host in zip(model.experts.weights, self.layers, strict=True):
                param.data = host if self.home.type == "cpu" else host.to(self.home)
        self.layers = []

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def expert(self, layer: int, expert: int) -> Tensor:
        """Expert `expert` of layer `layer`: a (3*I*D,) host view, the source of one copy."""
        return self.layers[layer][expert]
