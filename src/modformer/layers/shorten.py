"""Causal shortening and upsampling for the hourglass model (``models/hourglass.py``).

Shortening (one level, group length g, K latents per group) on a sequence x of length L::

    s = [pad] * (g - 1) ++ x[: n g - g + 1]          n = ceil(L / g) groups, shift right by g - 1
    group i = s[i g : i g + g] = x[i g - g + 1 .. i g]   (positions < 0 are the learned pad)
    latents of group i = compress(group i)  -> K vectors

Group i is served (after upsampling) to positions ``i g .. i g + g - 1`` and contains exactly the
positions ``<= i g``: a shift of g - 1 is the largest that stays causal (g - 2 would put position
``i g + 1`` into the latent serving ``i g``) and the Hourglass paper's choice (Nawrot et al. 2022,
"Hierarchical Transformers Are More Efficient Language Models").

Compressors map groups ``(N, g, D)`` to latents ``(N, K, D)`` (N = B n). Every element of a group may
see every other (all are ``<= i g``), so both attend bidirectionally within the group:

- ``perceiver``: K learned queries cross-attend to the group (+ a learned within-group position
  vector), then an FFN; a Perceiver cross-attention block (Jaegle et al. 2021).
- ``last_k``: one standard Block (causal, model.attention) over the group, keeping its last K outputs
  (Mirasol's Combiner, Piergiovanni et al. 2024).

Upsampling, latents ``(B, n K, D)`` -> ``(B, L, D)``:

- ``repeat``: ``repeat_interleave(g / K)``: position ``i g + r`` receives latent ``(i, r K // g)`` of its
  own group (nearest previous group in unshifted terms; with K = 1 the seed's replication). With the skip
  connection the model uses ``upsample_add`` (the repeat and the skip add as one broadcast add).
- ``attention``: repeat, then the Hourglass paper's attention upsampling: each position cross-attends to
  the latents of every group serving it or an earlier position (latent m visible from position t iff
  ``m // K <= t // g``). The mask is not a causal/offset mask, so this call uses SDPA with an explicit
  boolean mask rather than the kernels dispatcher.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modformer.config import ModelConfig
from modformer.layers.attention.kernels import AttnSpec, attend
from modformer.layers.block import Block, build_component
from modformer.layers.context import Context
from modformer.layers.hooks import HookPoint
from modformer.layers.norm import build_norm


def n_groups(length: int, g: int) -> int:
    return math.ceil(length / g)


def _rows(table: Tensor, n: int) -> Tensor:
    """``table[:n]`` (no slice op when that is the whole table)."""
    return table if table.shape[0] == n else table[:n]


def shift_and_group(x: Tensor, pad: Tensor, g: int) -> Tensor:
    """(B, L, D) -> groups (B, n, g, D) of the sequence shifted right by g - 1 (pad in front)."""
    B, L, D = x.shape
    n = n_groups(L, g)
    s = torch.cat([pad.to(x.dtype).expand(B, g - 1, D), x[:, : n * g - g + 1]], dim=1)   # (B, n g, D)
    return s.view(B, n, g, D)


class PerceiverCompress(nn.Module):
    """K learned queries cross-attend to a group, then an FFN: ``(N, g, D) -> (N, K, D)``."""

    def __init__(self, cfg: ModelConfig, g: int, k: int) -> None:
        super().__init__()
        D, H, Dh = cfg.d_model, cfg.n_head, cfg.head_dim
        self.n_head, self.head_dim, self.backend = H, Dh, cfg.attn_backend
        self.queries = nn.Parameter(torch.zeros(k, D))
        self.group_pos = nn.Parameter(torch.zeros(g, D))      # order within the group (any position kind)
        self.ln_q, self.ln_kv, self.ln2 = build_norm(cfg), build_norm(cfg), build_norm(cfg)
        self.q = nn.Linear(D, H * Dh, bias=cfg.bias)
        self.kv = nn.Linear(D, 2 * H * Dh, bias=cfg.bias)
        self.out = nn.Linear(H * Dh, D, bias=cfg.bias)
        self.mlp = build_component("ffn", cfg.ffn, cfg.ffn_options, cfg)

    def kv_side(self) -> list[nn.Module]:
        """Modules that run once per group element (the rest run once per latent); for FLOP counts."""
        return [self.ln_kv, self.kv]

    def forward(self, groups: Tensor, position: nn.Module) -> Tensor:
        N, g, D = groups.shape
        H, Dh = self.n_head, self.head_dim
        kv = self.kv(self.ln_kv(groups + _rows(self.group_pos, g).to(groups.dtype)))
        k, v = (t.view(N, g, H, Dh).transpose(1, 2) for t in kv.split(H * Dh, dim=-1))  # (N, H, g, Dh) each
        lat = self.queries.to(groups.dtype).expand(N, -1, -1)                        # (N, K, D)
        q = self.q(self.ln_q(lat)).view(N, -1, H, Dh).transpose(1, 2)                # (N, H, K, Dh)
        z, _ = attend(q, k, v, AttnSpec(causal=False), self.backend)
        lat = lat + self.out(z.transpose(1, 2).reshape(N, -1, H * Dh))
        return lat + self.mlp(self.ln2(lat))


class LastKCompress(nn.Module):
    """One causal Block over the group; its last K outputs are the latents (Mirasol's Combiner)."""

    def __init__(self, cfg: ModelConfig, g: int, k: int, layer_idx: int) -> None:
        super().__init__()
        self.k = k
        self.group_pos = nn.Parameter(torch.zeros(g, cfg.d_model))
        self.block = Block(cfg, layer_idx)

    def kv_side(self) -> list[nn.Module]:
        return [self.block]

    def forward(self, groups: Tensor, position: nn.Module) -> Tensor:
        N, g, D = groups.shape
        pos = torch.arange(g, device=groups.device)
        y = self.block(groups + _rows(self.group_pos, g).to(groups.dtype), Context(pos=pos, position=position))
        return y[:, -self.k:]


class Shorten(nn.Module):
    """Shift right by g - 1, group, compress: ``(B, L, D) -> (B, ceil(L / g) K, D)``.

    Hook point ``hook_latents`` ``(B, n K, D)``: the latents (the model adds the next level's positions
    after it, so the hook sees the compressor's output).
    """

    def __init__(self, cfg: ModelConfig, g: int, k: int, kind: str, layer_idx: int) -> None:
        super().__init__()
        self.g, self.k, self.kind = g, k, kind
        self.pad = nn.Parameter(torch.zeros(cfg.d_model))       # stands for the positions before 0
        self.compress = PerceiverCompress(cfg, g, k) if kind == "perceiver" else LastKCompress(cfg, g, k, layer_idx)
        self.hook_latents = HookPoint()

    def forward(self, x: Tensor, position: nn.Module) -> Tensor:
        B, L, D = x.shape
        groups = shift_and_group(x, self.pad, self.g)                             # (B, n, g, D)
        n = groups.shape[1]
        lat = self.compress(groups.reshape(B * n, self.g, D), position)           # (B n, K, D)
        return self.hook_latents(lat.reshape(B, n * self.k, D))


def upsample_repeat(lat: Tensor, g: int, k: int, length: int) -> Tensor:
    """(B, n K, D) -> (B, length, D): each latent repeated g / K times, cropped to ``length``."""
    return lat.repeat_interleave(g // k, dim=1)[:, :length]


def upsample_add(lat: Tensor, skip: Tensor, g: int, k: int) -> Tensor:
    """``upsample_repeat(lat, g, k, L) + skip`` for ``skip`` (B, L, D): when L = n g, one broadcast add of
    ``lat`` viewed (B, n K, 1, D) to ``skip`` viewed (B, n K, g / K, D), without materialising the repeat
    (same values: each output element is one latent element plus one skip element)."""
    B, L, D = skip.shape
    r = g // k
    if L != lat.shape[1] * r:
        return upsample_repeat(lat, g, k, L) + skip
    return (lat.unsqueeze(2) + skip.reshape(B, lat.shape[1], r, D)).view(B, L, D)


def upsample_mask(length: int, n_lat: int, g: int, k: int, device: torch.device, q_start: int = 0) -> Tensor:
    """Boolean (length, n_lat): position t (from ``q_start``) may read latent m iff m's group serves t or earlier."""
    t = torch.arange(q_start, q_start + length, device=device)
    m = torch.arange(n_lat, device=device)
    return (m[None, :] // k) <= (t[:, None] // g)


class AttentionUpsample(nn.Module):
    """Cross-attention from the full-resolution stream to the latents (Hourglass attention upsampling)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        D, H, Dh = cfg.d_model, cfg.n_head, cfg.head_dim
        self.n_head, self.head_dim = H, Dh
        self.ln_q, self.ln_kv = build_norm(cfg), build_norm(cfg)
        self.q = nn.Linear(D, H * Dh, bias=cfg.bias)
        self.kv = nn.Linear(D, 2 * H * Dh, bias=cfg.bias)
        self.out = nn.Linear(H * Dh, D, bias=cfg.bias)

    def forward(self, x: Tensor, lat: Tensor, g: int, k: int, q_start: int = 0) -> Tensor:
        B, L, D = x.shape
        H, Dh = self.n_head, self.head_dim
        q = self.q(self.ln_q(x)).view(B, L, H, Dh).transpose(1, 2)                 # (B, H, L, Dh)
        k_, v = (t.view(B, lat.shape[1], H, Dh).transpose(1, 2)                   # (B, H, nK, Dh) each
                 for t in self.kv(self.ln_kv(lat)).split(H * Dh, dim=-1))
        mask = upsample_mask(L, lat.shape[1], g, k, x.device, q_start)
        z = F.scaled_dot_product_attention(q, k_, v, attn_mask=mask)
        return self.out(z.transpose(1, 2).reshape(B, L, H * Dh))
