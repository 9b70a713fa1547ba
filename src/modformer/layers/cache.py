"""Key/value caches for incremental decoding.

``KVCache`` grows by concatenation (simple, any length). ``StaticKVCache`` preallocates
``(B, Hkv, max_len, Dh)`` buffers once and writes in place, so tensor shapes never change
between decoding steps (what torch.compile / CUDA graphs need); unwritten slots sit at
positions after every query and the causal mask hides them.

Besides the standard per-layer key/value slots, both caches hold a generic per-layer tensor store,
``append(layer, name, x)``, for attention variants that cache something else (MLA's compressed latent
and shared RoPE key, multichannel's per-channel K/V). Stored tensors have the time axis at ``-2``;
the static cache allocates each entry (and the standard slots) on first use with ``max_len`` slots.
``blocks`` holds per-layer tensors indexed by key block on axis ``-2`` (the learned gate's pooled key summaries,
one row per block of ``block_size`` slots); ``crop`` keeps them, since every block a later step reads is rewritten
from the cached keys before use. ``state`` holds per-layer values without a time axis (the learned gate's kept
blocks of the current query block); ``crop`` forgets them.
``bytes_per_token()`` reports cache bytes per cached token of one sequence, summed over layers.

Padded batches also keep per-row key masks (``update_mask(name, x)``: ``valid`` padding flags, ``doc``
document ids, ``(B, T)``), so later calls mask the cached padding without being told again.
"""

from __future__ import annotations

import torch
from torch import Tensor


def fixed_zeros(shape: tuple[int, ...], device: torch.device | str, dtype: torch.dtype) -> Tensor:
    """A zero buffer marked as a static address: compiled steps and CUDA graphs write it in place."""
    buf = torch.zeros(shape, device=device, dtype=dtype)
    torch._dynamo.mark_static_address(buf)
    return buf


class KVCache:
    """Per-layer growing key/value tensors ``(B, Hkv, T, Dh)``."""

    def __init__(self, n_layer: int) -> None:
        self.keys: list[Tensor | None] = [None] * n_layer
        self.values: list[Tensor | None] = [None] * n_layer
        self.tensors: dict[tuple[int, str], Tensor] = {}   # generic store, time on axis -2
        self.masks: dict[str, Tensor] = {}                  # per-row key masks (B, T): "valid", "doc"
        self.blocks: dict[tuple[int, str], tuple[Tensor, int]] = {}   # per-block tensors and their block size
        self.state: dict[tuple[int, str], object] = {}      # per-layer values with no time axis (crop forgets them)
        self.length = 0   # tokens already cached (= absolute position of the next token)

    def update_mask(self, name: str, x: Tensor) -> Tensor:
        """Append this call's per-row mask ``x (B, T)`` to ``name``; return it for all keys so far."""
        old = self.masks.get(name)
        if old is not None:
            x = torch.cat([old, x], dim=1)
        self.masks[name] = x
        return x

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append this call's keys/values for ``layer``; return all keys/values so far."""
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def append(self, layer: int, name: str, x: Tensor) -> Tensor:
        """Generic store: append ``x`` (time on axis -2) to entry ``name`` of ``layer``; return all so far."""
        old = self.tensors.get((layer, name))
        if old is not None:
            x = torch.cat([old, x], dim=-2)
        self.tensors[(layer, name)] = x
        return x

    def block_buffer(self, layer: int, name: str, shape: tuple[int, ...], block_size: int,
                     like: Tensor) -> Tensor:
        """Per-block store: entry ``name`` of ``layer``, ``shape`` with blocks of ``block_size`` slots on axis -2,
        zero-filled at a fixed address on first use (compiled steps write it in place); the same tensor after."""
        entry = self.blocks.get((layer, name))
        if entry is None:
            entry = self.blocks[(layer, name)] = (fixed_zeros(shape, like.device, like.dtype), block_size)
        return entry[0]

    def advance(self, n: int) -> None:
        """Called once per forward, after every layer has been updated with ``n`` tokens."""
        self.length += n

    def crop(self, length: int) -> None:
        """Forget everything after ``length`` tokens (e.g. to reuse a shared prompt)."""
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            if k is not None:
                self.keys[i], self.values[i] = k[:, :, :length], v[:, :, :length]
        for key, x in self.tensors.items():
            self.tensors[key] = x[..., :length, :]
        for key, x in self.masks.items():
            self.masks[key] = x[:, :length]
        self.state.clear()
        self.length = min(self.length, length)

    def _all(self) -> list[Tensor]:
        return [t for t in self.keys + self.values + list(self.tensors.values()) if t is not None]

    def memory_bytes(self) -> int:
        tensors = self._all() + [t for t, _ in self.blocks.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def bytes_per_token(self) -> float:
        """Bytes per cached token (slot) of one sequence, all layers: ``(B, ..., T, d)`` -> numel / (B * T); a
        per-block tensor counts ``1 / block_size`` of a row per token."""
        per_slot = sum(t.numel() * t.element_size() / (t.shape[0] * t.shape[-2]) for t in self._all())
        return per_slot + sum(t.numel() * t.element_size() / (t.shape[0] * t.shape[-2] * bs)
                              for t, bs in self.blocks.values())


class StaticKVCache(KVCache):
    """Preallocated cache of fixed capacity ``max_len``; returns the whole buffers.

    With ``n_kv_heads`` and ``head_dim`` given, the standard key/value buffers are allocated now;
    with None (what ``GPT.new_cache`` passes) each layer's buffers are allocated on its first write,
    so variants that never use the standard slots (e.g. MLA) hold only what they store.
    """

    def __init__(self, n_layer: int, batch: int, n_kv_heads: int | None, max_len: int, head_dim: int | None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        super().__init__(n_layer)
        self.max_len, self.device, self.dtype = max_len, device, dtype
        self.kv: list[Tensor | None] = [None] * n_layer     # (2, B, Hkv, max_len, Dh): keys[i], values[i] are views
        if n_kv_heads is not None and head_dim is not None:
            like = torch.empty(batch, n_kv_heads, 1, head_dim, device=device, dtype=dtype)
            for layer in range(n_layer):
                self._alloc_kv(layer, like)

    # Writes go to the absolute positions in ``self.positions`` (a (T,) tensor the model sets before
    # each forward) with index_copy_, so no Python int that changes per step enters a compiled graph.
    positions: Tensor | None = None

    def _check(self, t: int) -> None:
        if not torch.compiler.is_compiling() and self.length + t > self.max_len:
            raise ValueError(f"static KV cache holds {self.max_len} tokens; "
                             f"cannot add {t} after {self.length}")

    def _buffer(self, like: Tensor, lead: tuple[int, ...] = ()) -> Tensor:
        return fixed_zeros((*lead, *like.shape[:-2], self.max_len, like.shape[-1]), self.device, self.dtype)

    def _alloc_kv(self, layer: int, k: Tensor, v: Tensor | None = None) -> None:
        """One buffer for a layer's keys and values of the same shape, so a compiled step writes both with one
        ``index_copy_`` (one scatter for Inductor to emit, not two); values of another head size get their own."""
        if v is not None and v.shape[1:] != k.shape[1:]:
            self.keys[layer], self.values[layer] = self._buffer(k), self._buffer(v)
            return
        kv = self.kv[layer] = self._buffer(k, (2,))
        self.keys[layer], self.values[layer] = kv[0], kv[1]

    def _write(self, buf: Tensor, x: Tensor) -> None:
        t = x.shape[-2]
        if self.positions is not None:
            buf.index_copy_(buf.dim() - 2, self.positions.to(buf.device), x.to(buf.dtype))
        else:
            buf[..., self.length:self.length + t, :] = x

    def append(self, layer: int, name: str, x: Tensor) -> Tensor:
        self._check(x.shape[-2])
        buf = self.tensors.get((layer, name))
        if buf is None:
            buf = self.tensors[(layer, name)] = self._buffer(x)
        self._write(buf, x)
        return buf

    def update_mask(self, name: str, x: Tensor) -> Tensor:
        self._check(x.shape[-1])
        buf = self.masks.get(name)
        if buf is None:
            buf = self.masks[name] = fixed_zeros((x.shape[0], self.max_len), self.device, x.dtype)
        self._write(buf[..., None], x[..., None])
        return buf

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self._check(k.shape[2])
        kv = self.kv[layer]
        if kv is None and self.keys[layer] is None:
            self._alloc_kv(layer, k, v)
            kv = self.kv[layer]
        if kv is not None and self.positions is not None:
            # write and return views of the one buffer: ``keys[i]`` / ``values[i]`` would enter a compiled step as
            # further inputs aliasing it, and a mutated input with aliases is copied whole on every step
            self._write(kv, torch.stack([k, v]))
            return kv[0], kv[1]
        self._write(self.keys[layer], k)
        self._write(self.values[layer], v)
        return self.keys[layer], self.values[layer]

    def write_rows(self, layer: int, rows: Tensor, start: int, k: Tensor, v: Tensor, batch: int) -> None:
        """Keys and values ``(len(rows), Hkv, T, Dh)`` of some rows at slots ``[start, start + T)`` (a prefill run
        in groups of rows); ``batch`` is the cache's row count, for buffers not allocated yet."""
        if self.keys[layer] is None:
            self._alloc_kv(layer, k.new_empty(batch, k.shape[1], 1, k.shape[-1]),
                           v.new_empty(batch, v.shape[1], 1, v.shape[-1]))
        t = k.shape[2]
        self.keys[layer][rows, :, start:start + t] = k.to(self.dtype)
        self.values[layer][rows, :, start:start + t] = v.to(self.dtype)

    def crop(self, length: int) -> None:
        self.state.clear()
        self.length = min(self.length, length)
