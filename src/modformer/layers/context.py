"""Per-forward state shared by every block: positions, the position module and the KV cache."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from modformer.layers.cache import KVCache
from modformer.layers.position import Position


@dataclass
class Context:
    pos: Tensor                     # (T,) absolute positions of this call's tokens
    position: Position              # the model's (shared) position module
    cache: KVCache | None = None    # updated in place by each attention layer
    q_offset: int | None = 0        # absolute position of the first token; None = only known as `pos`
    block_mask: object | None = None  # optional flex BlockMask (sparse attention variants)
    memo: dict = field(default_factory=dict)  # values every layer would recompute (e.g. the causal mask bias)
