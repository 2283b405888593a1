"""The KV cache: preallocated keys and values for every layer, with one update method."""

import torch
from torch import Tensor

from tinymoe.errors import TinyMoeError


class KVCache:
    """k and v of shape (L, B, Hkv, max_len, Dh), filled left to right.

    Mixtral's sliding window is applied by the attention mask, not by evicting old positions:
    simpler, and the cache of a single generation is small next to the experts.
    """

    def __init__(
        self,
        num_layers: int,
        batch: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> None:
        shape = (num_layers, batch, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        # Each layer's (B, Hkv, max_len, Dh) views, taken once: a decode step indexes these
        # instead of slicing k and v anew (a decode step is bound by the number of operations).
        self._layers = list(zip(self.k.unbind(0), self.v.unbind(0), strict=True))

    def update(self, layer: int, start: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, Hkv, T, Dh) at start..start+T-1; return views of 0..start+T-1."""
        end = start + k.shape[2]
        if end > self.max_len:
            raise TinyMoeError(
                f"KV cache holds {self.max_len} positions; asked to write up to {end}"
            )
        k_all, v_all = self._layers[layer]  # (B, Hkv, max_len, Dh) each
        k_all.narrow(2, start, end - start).copy_(k)
        v_all.narrow(2, start, end - start).copy_(v)
        return k_all.narrow(2, 0, end), v_all.narrow(2, 0, end)  # (B, Hkv, S, Dh) each
