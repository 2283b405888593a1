"""The host expert store: every expert of every layer in host memory, where copies start from.

    layers[l]   (E, 3*I*D) on the host; row e is expert e of layer l, packed as in experts.py

A row is contiguous, so moving an expert to the device is ONE copy. When the compute device is
CUDA the rows live in pinned (page-locked) memory: only pinned memory can be copied with
`non_blocking=True`, i.e. by the DMA engine while the GPU computes; a copy from ordinary
(pageable) memory goes through a staging buffer and blocks the host.

The store takes the experts out of a loaded model layer by layer and frees each layer's
original as it goes, so the process never holds a second full copy of the experts (at most one
extra layer, during the move). On the CPU there is nothing to move: the store keeps the model's
own tensors. `give_back` puts the experts back into the model, on its device. The store is
read-only: eviction from the device cache never copies anything back.
"""

import torch
from torch import Tensor

from tinymoe.model import MoETransformer


class HostExpertStore:
    def __init__(self, layers: list[Tensor]) -> None:
        self.layers = layers  # [(E, 3*I*D)] * L, on the host
        self.expert_bytes = layers[0][0].numel() * layers[0].element_size()

    @classmethod
    def take_from(cls, model: MoETransformer) -> "HostExpertStore":
        """Move model.experts' weights into a host store, leaving the model without experts.

        Each of the model's expert tensors is replaced by an empty one, so any code that would
        still read resident experts fails loudly instead of computing with them.
        """
        device = model.embed_tokens.weight.device
        pin = device.type == "cuda"
        layers = []
        with torch.no_grad():
            for param in model.experts.weights:
                w = param.data  # (E, 3*I*D) on the model's device
                if pin:
                    host = torch.empty(w.shape, dtype=w.dtype, pin_memory=True)
                    host.copy_(w)  # SYNC: a blocking device-to-host copy, once, at setup
                else:
                    host = w  # already on the host: keep it, no copy
                layers.append(host)
                param.data = torch.empty(0, device=device, dtype=w.dtype)  # free the original
        return cls(layers)

    def give_back(self, model: MoETransformer) -> None:
        """Put the experts back into the model, on its device (needs room for all of them)."""
        device = model.embed_tokens.weight.device
        with torch.no_grad():
            for param, host in zip(model.experts.weights, self.layers, strict=True):
                param.data = host if device.type == "cpu" else host.to(device)
        self.layers = []

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def expert(self, layer: int, expert: int) -> Tensor:
        """Expert `expert` of layer `layer`: a (3*I*D,) host view, the source of one copy."""
        return self.layers[layer][expert]
