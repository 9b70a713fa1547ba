"""Key/value caches for incremental decoding.

``KVCache`` grows by concatenation (simple, any length). ``StaticKVCache`` preallocates
``(B, Hkv, max_len, Dh)`` buffers once and writes in place, so tensor shapes never change
between decoding steps (what torch.compile / CUDA graphs need); unwritten slots sit at
positions after every query and the causal mask hides them.
"""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    """Per-layer growing key/value tensors ``(B, Hkv, T, Dh)``."""

    def __init__(self, n_layer: int) -> None:
        self.keys: list[Tensor | None] = [None] * n_layer
        self.values: list[Tensor | None] = [None] * n_layer
        self.length = 0   # tokens already cached (= absolute position of the next token)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append this call's keys/values for ``layer``; return all keys/values so far."""
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def advance(self, n: int) -> None:
        """Called once per forward, after every layer has been updated with ``n`` tokens."""
        self.length += n

    def crop(self, length: int) -> None:
        """Forget everything after ``length`` tokens (e.g. to reuse a shared prompt)."""
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            if k is not None:
                self.keys[i], self.values[i] = k[:, :, :length], v[:, :, :length]
        self.length = min(self.length, length)

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)


class StaticKVCache(KVCache):
    """Preallocated cache of fixed capacity ``max_len``; returns the whole buffers."""

    def __init__(self, n_layer: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        super().__init__(n_layer)
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.max_len = max_len

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        t = k.shape[2]
        if self.length + t > self.max_len:
            raise ValueError(f"static KV cache holds {self.max_len} tokens; "
                             f"cannot add {t} after {self.length}")
        self.keys[layer][:, :, self.length:self.length + t] = k
        self.values[layer][:, :, self.length:self.length + t] = v
        return self.keys[layer], self.values[layer]

    def crop(self, length: int) -> None:
        self.length = min(self.length, length)
