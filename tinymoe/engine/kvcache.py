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

    def update(
        self, layer: int, start: int | Tensor, k: Tensor, v: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Write k, v (B, Hkv, T, Dh) at start..start+T-1; return views of 0..start+T-1.

        An int start whose T positions do not fit in max_len raises TinyMoeError.

        start as a (1,) tensor (the static-shape decode step, T = 1): write at that position and
        return the whole (B, Hkv, max_len, Dh) cache; the caller masks what lies after start.
        A position past the cache is the caller's to prevent: checking it here would read start
        to the host (index_copy_ itself fails on it, on CUDA as a device-side assert).
        """
        if isinstance(start, Tensor):
            # (self.k[layer], not the list of views below: under torch.compile a list index pins
            # `layer` to a constant, and a step cut into pieces would compile once per layer)
            k_all, v_all = self.k[layer], self.v[layer]  # (B, Hkv, max_len, Dh) each
            k_all.index_copy_(2, start, k)
            v_all.index_copy_(2, start, v)
            return k_all, v_all
        k_all, v_all = self._layers[layer]
        end = start + k.shape[2]
        if end > self.max_len:
            raise TinyMoeError(
                f"KV cache holds {self.max_len} positions; asked to write up to {end}"
            )
        k_all.narrow(2, start, end - start).copy_(k)
        v_all.narrow(2, start, end - start).copy_(v)
        return k_all.narrow(2, 0, end), v_all.narrow(2, 0, end)  # (B, Hkv, S, Dh) each
