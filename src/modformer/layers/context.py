"""Per-forward state shared by every block: positions, the position module, the KV cache and, for padded or
packed batches, the per-row key masks (all keys of the call, cached ones included)."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from modformer.layers.cache import KVCache
from modformer.layers.position import Position


@dataclass
class Context:
    pos: Tensor                     # (T,) absolute positions of this call's tokens; (B, T) per row when padded
    position: Position              # the model's (shared) position module
    cache: KVCache | None = None    # updated in place by each attention layer
    q_offset: int | None = 0        # absolute position of the first token; None = only known as `pos`
    block_mask: object | None = None  # optional flex BlockMask (sparse attention variants)
    memo: dict = field(default_factory=dict)  # values every layer would recompute (e.g. the causal mask bias)
    slots: Tensor | None = None     # (T,) cache slots of this call's tokens when ``pos`` is per row (else = pos)
    key_valid: Tensor | None = None  # (B, Tk) bool: False for padding keys (None: no padding / packing)
    key_pos: Tensor | None = None   # (B, Tk) per-row key positions
    key_doc: Tensor | None = None   # (B, Tk) document ids (packed batches)
    value_embeds: dict[int, Tensor] | None = None   # layer -> (B, T, Hkv*Dh) value embedding (model.value_embeds)

    @property
    def q_slots(self) -> Tensor:
        """(T,) slot indices of the queries (what causality compares)."""
        return self.pos if self.slots is None else self.slots

    def mask_fields(self) -> dict:
        """The padding / document fields of an ``AttnSpec`` for this call."""
        return dict(key_valid=self.key_valid, key_pos=self.key_pos, key_doc=self.key_doc)
