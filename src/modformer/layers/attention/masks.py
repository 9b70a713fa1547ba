"""Per-row masks of padded and packed batches: which keys are real, which document each token is in, and
each token's position counted from its row's first real token (left padding, as HF's ``position_ids``) or
from its document's start (packing), so a sequence sees the same positions however it is batched.

Packed streams separate documents with an EOS token; a document *begins* at its separator (the EOS acts as
the next document's BOS), so every target is predicted from inside one document and nothing is dropped.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from modformer.layers.cache import KVCache


def document_ids(idx: Tensor, eos_id: int) -> Tensor:
    """``(B, T)`` document index of every token: it increases at each ``eos_id`` (which opens a document)."""
    return (idx == eos_id).long().cumsum(-1)


def row_positions(valid: Tensor, doc: Tensor | None = None) -> Tensor:
    """``(B, T)`` positions: real tokens before this one in its row (and document); padding gets the next one's."""
    count = valid.long().cumsum(-1)                                       # real tokens up to and including j
    if doc is not None:
        j = torch.arange(doc.shape[1], device=doc.device)
        start = torch.ones_like(doc, dtype=torch.bool)
        start[:, 1:] = doc[:, 1:] != doc[:, :-1]
        first = torch.where(start, j, 0).cummax(-1).values                 # index where j's document starts
        before = (count - valid.long()).gather(1, first)                   # real tokens before that start
        count = count - before
    return (count - 1).clamp_min(0)


@dataclass
class RowMasks:
    """Key masks of one forward (every key: cached ones first), and the queries' per-row positions."""

    key_valid: Tensor          # (B, Tk) bool
    key_pos: Tensor            # (B, Tk) long
    key_doc: Tensor | None     # (B, Tk) document ids or None
    pos: Tensor                # (B, T) positions of this call's tokens


def row_masks(batch: int, slots: Tensor, cache: KVCache | None, attention_mask: Tensor | None,
              document_ids: Tensor | None) -> RowMasks:
    """Masks of a call whose tokens sit at cache slots ``slots (T,)``. ``attention_mask`` is ``(B, T)`` for
    this call's tokens or ``(B, cached + T)`` (HF style; the cached part is then taken from the cache)."""
    T, device = slots.shape[0], slots.device
    if attention_mask is None:
        valid = torch.ones(batch, T, dtype=torch.bool, device=device)
    else:
        if attention_mask.dim() != 2 or attention_mask.shape[0] != batch or attention_mask.shape[1] < T:
            raise ValueError(f"attention_mask must be (B, T) = ({batch}, {T}) or (B, cached + T); "
                             f"got {tuple(attention_mask.shape)}")
        valid = attention_mask[:, -T:].to(device=device, dtype=torch.bool)
    if document_ids is not None and tuple(document_ids.shape) != (batch, T):
        raise ValueError(f"document_ids must be (B, T) = ({batch}, {T}); got {tuple(document_ids.shape)}")
    if document_ids is not None and cache is not None:
        raise ValueError("document_ids (packed batches) are for training and evaluation; not with a KV cache")
    doc = document_ids.to(device=device, dtype=torch.long) if document_ids is not None else None
    if cache is not None:
        valid = cache.update_mask("valid", valid)
    key_pos = row_positions(valid, doc)
    return RowMasks(valid, key_pos, doc, key_pos[:, slots])


def segments(key_valid: Tensor, key_doc: Tensor | None, slots: Tensor) -> Iterator[tuple[int, Tensor, Tensor]]:
    """``(row, I, J)`` for every run of real tokens of one row and document: ``I`` indexes this call's queries
    (into ``slots``), ``J`` the key slots (cached ones included). Attention kinds whose computation is not a mask
    (the learned gate's block choice, Performer's prefix sums) run each segment alone, as if unpadded."""
    last = int(slots[-1])
    for b in range(key_valid.shape[0]):
        valid = key_valid[b].clone()
        valid[last + 1:] = False                      # unwritten slots of a static cache
        docs = [None] if key_doc is None else key_doc[b][valid].unique().tolist()
        for d in docs:
            inside = valid if d is None else valid & (key_doc[b] == d)
            queries = inside[slots].nonzero().squeeze(-1)
            if queries.numel():
                yield b, queries, inside.nonzero().squeeze(-1)
