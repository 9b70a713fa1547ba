"""Composed models: CALM (Bansal et al. 2024), a frozen anchor LM augmented by a frozen second LM.

At each connection (augmenting layer j, anchor layer i) a learned projection maps the augmenting
model's residual stream after block j into the anchor's width, and a cross-attention block (queries
from the anchor's residual stream entering block i, keys / values from the projected states) adds its
output to that stream. Only the projections and cross-attention blocks train. Both models must share
the tokenizer (the same ids go into both). Connections default to every ``every``-th augmenting layer
(``every - 1``, ``2 * every - 1``, ...) paired in order with evenly spaced anchor layers starting at
block 0. With zero-initialised output projections the composition starts as exactly the anchor.

``readout="vocab"`` (an extension, not in the paper) also gives each bridge the augmenting model's next-token
distribution read from the connected state (its final norm and LM head; a logit lens for earlier layers) and
embedded by the anchor's token table: a soft token in the anchor's input space, concatenated to the state before
the projection. The learned parts are the same projection + cross-attention.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from modformer.layers.attention.cross import CrossAttention


def default_connections(n_aug: int, n_anchor: int, every: int = 1) -> list[tuple[int, int]]:
    """[(augmenting layer, anchor layer)] for every ``every``-th augmenting layer."""
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    aug = list(range(every - 1, n_aug, every)) or [n_aug - 1]
    return [(j, round(k * n_anchor / len(aug))) for k, j in enumerate(aug)]


class Bridge(nn.Module):
    """Projection of augmenting states into the anchor's width + cross-attention into the anchor."""

    def __init__(self, d_in: int, d_anchor: int, n_head: int, zero_init: bool = True) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, d_anchor)
        self.xattn = CrossAttention(d_anchor, n_head, causal=True, zero_init=zero_init)

    def forward(self, anchor_x: Tensor, aug_h: Tensor, key_valid: Tensor | None = None) -> Tensor:
        return self.xattn(anchor_x, self.proj(aug_h), key_valid)


class CALM(nn.Module):
    """``CALM(anchor, augmenting)(idx) -> anchor logits (B, T, V)`` with augmenting states cross-attended."""

    def __init__(self, anchor: nn.Module, augmenting: nn.Module, connections: Sequence[Sequence[int]] | None = None,
                 every: int = 1, n_head: int = 4, zero_init: bool = True, readout: str = "states") -> None:
        super().__init__()
        if readout not in ("states", "vocab"):
            raise ValueError(f"readout must be 'states' or 'vocab', got {readout!r}")
        if readout == "vocab" and anchor.cfg.vocab_size != augmenting.cfg.vocab_size:
            raise ValueError("readout='vocab' needs one vocabulary: anchor and augmenting vocab_size differ")
        self.anchor, self.augmenting, self.readout = anchor, augmenting, readout
        for p in [*anchor.parameters(), *augmenting.parameters()]:
            p.requires_grad_(False)
        n_aug, n_anc = len(augmenting.blocks), len(anchor.blocks)
        conns = [tuple(c) for c in connections] if connections else default_connections(n_aug, n_anc, every)
        for j, i in conns:
            if not (0 <= j < n_aug and 0 <= i < n_anc):
                raise ValueError(f"connection ({j}, {i}) outside the models' layers ({n_aug}, {n_anc})")
        self.connections = conns
        d_in = augmenting.cfg.d_model + (anchor.cfg.d_model if readout == "vocab" else 0)
        self.bridges = nn.ModuleList(Bridge(d_in, anchor.cfg.d_model, n_head, zero_init) for _ in conns)
        self.train(False)

    def train(self, mode: bool = True) -> CALM:
        """Only the bridges change mode; the frozen models always run in eval mode."""
        super().train(mode)
        self.anchor.eval()
        self.augmenting.eval()
        return self

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.bridges.parameters())

    @torch.no_grad()
    def soft_tokens(self, h: Tensor) -> Tensor:
        """``(B, T, D_anchor)``: the augmenting model's next-token distribution from states ``h``, embedded by the
        anchor's token table (as the anchor's own input would be)."""
        aug = self.augmenting
        probs = torch.softmax(aug.lm_head(aug.ln_f(h)).float(), -1)
        table = self.anchor.tok_emb.weight.float() * getattr(self.anchor, "embed_scale", 1.0)
        return (probs @ table).to(h.dtype)

    def forward(self, idx: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Anchor logits; ``attention_mask`` (B, T) 0/1 padding goes to both models and the bridges."""
        names = sorted({f"blocks.{j}.hook_resid_post" for j, _ in self.connections})
        masked = {} if attention_mask is None else {"attention_mask": attention_mask}
        valid = None if attention_mask is None else attention_mask.bool()
        with torch.no_grad():
            _, states = self.augmenting.run_with_cache(idx, names, **masked)
        hooks = []
        for (j, i), bridge in zip(self.connections, self.bridges):
            h = states[f"blocks.{j}.hook_resid_post"]
            if self.readout == "vocab":
                h = torch.cat([h, self.soft_tokens(h)], -1)

            def add(x: Tensor, hook: object, h: Tensor = h, bridge: nn.Module = bridge) -> Tensor:
                return x + bridge(x, h, valid).to(x.dtype)

            hooks.append((f"blocks.{i}.hook_resid_pre", add))
        return self.anchor.run_with_hooks(idx, hooks, **masked)
