"""Multi-channel attention mixer (registry attention ``multichannel``; this project's seed 001 idea,
with the channel merge of Soft MoE, Puigcerver et al. 2024, "From Sparse to Soft Mixtures of
Experts", and DeepSeekMoE's shared expert, Dai et al. 2024).

``s`` channels read the same sequence. Channel c has its own q/k/v and heads (an mha with
``channel_heads`` heads), its own norm and its own MLP of width ``mult * d_ff / s``; on the stream
u it is handed it computes a complete attention + MLP sublayer pair::

    a_c = Attn_c(u)
    y_c = a_c + MLP_c(n_c) [+ MLP_shared(n_c)]     with n_c = norm_c(u + a_c)
    out = sum_c w_c y_c,   w = softmax(u W_merge) over channels     (merge: softmax, Soft-MoE combine)

``merge: mean`` uses w_c = 1/s; ``merge: max`` takes the element-wise max over channels. With s = 1
every merge is the identity and the mixer is exactly a standard attention + MLP pair on u (tested).

It is a whole mixer, so use it as the block's attention with the block's FFN disabled
(``model.attention: multichannel`` plus ``model.attn_only: true``); with ``attn_only: false`` the
block's FFN runs after it as well. The block's residual and norm wrap the mixer as usual: with
pre-norm, u = ln1(x) and the block returns x + out.

``model.attention_options``: ``n_channels`` s (2), ``channel_heads`` (n_head // s, so the attention
parameters match one mha), ``channel_kv_heads`` (keeps the config's GQA ratio), ``mult`` (1.0),
``merge`` (softmax | mean | max), ``shared_mlp`` (False; width ``mult * d_ff / s`` too). The MLP kind
is ``model.ffn`` (with ``model.ffn_options``) and d_ff defaults to 4 * d_model. Each channel keeps
its own K/V in the cache's generic store (``(layer, "ch{c}.k"/"ch{c}.v")``); RoPE works per head as
in mha, ALiBi gives each channel ``alibi_slopes(channel_heads)``.

Parameters, with A(h, hkv) = D (h + 2 hkv) Dh + b (h + 2 hkv) Dh + h Dh D + b D (one mha),
M(w) = that of one ``model.ffn`` of width w (MLP: 2 D w + b (w + D)) and n(D) one norm:
``s (A(channel_heads, channel_kv_heads) + n(D) + M(w)) + [softmax, s > 1] (D s + b s) + [shared] M(w)``
with ``w = round(mult * d_ff / s)``.
Hook points: each channel's ``channels.{c}.attn.hook_*`` (as mha) and ``channels.{c}.mlp.hook_*``;
``hook_merge`` (B, T, s) merge weights (softmax/mean); ``hook_channels`` (B, T, s, D) channel outputs.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn

from modformer.config import ModelConfig
from modformer.layers.attention.mha import MultiHeadAttention
from modformer.layers.block import build_component
from modformer.layers.context import Context
from modformer.layers.hooks import HookPoint
from modformer.layers.norm import build_norm
from modformer.layers.position import alibi_slopes
from modformer.registry import ConfigError, register

MERGES = ("softmax", "mean", "max")


class _ChannelCache:
    """A view of the model's cache that stores one channel's K/V under its own names."""

    def __init__(self, cache: object, channel: int) -> None:
        self.cache, self.channel = cache, channel

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        c = self.channel
        return self.cache.append(layer, f"ch{c}.k", k), self.cache.append(layer, f"ch{c}.v", v)


class _ChannelPosition:
    """The model's position module with ALiBi slopes for a channel's head count."""

    def __init__(self, position: nn.Module, slopes: Tensor) -> None:
        self.position, self.slopes = position, slopes

    def rotate(self, q: Tensor, k: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
        return self.position.rotate(q, k, pos)

    def qk_embed(self, pos: Tensor) -> Tensor | None:
        return self.position.qk_embed(pos)

    def alibi_slopes(self) -> Tensor:
        return self.slopes


class Channel(nn.Module):
    """One channel: ``a = attn(u); y = a + mlp(norm(u + a))`` (+ the shared MLP)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, width: int) -> None:
        super().__init__()
        self.attn = MultiHeadAttention(cfg, layer_idx)
        self.ln = build_norm(cfg)
        self.mlp = build_component("ffn", cfg.ffn, cfg.ffn_options, replace(cfg, d_ff=width))

    def forward(self, u: Tensor, ctx: Context, shared: nn.Module | None) -> Tensor:
        a = self.attn(u, ctx)
        n = self.ln(u + a)
        y = a + self.mlp(n)
        return y if shared is None else y + shared(n)


@register("attention", "multichannel")
class MultiChannelMixer(nn.Module):
    """``s`` parallel attention + MLP channels merged by a per-token convex combination."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, n_channels: int = 2, channel_heads: int | None = None,
                 channel_kv_heads: int | None = None, mult: float = 1.0, merge: str = "softmax",
                 shared_mlp: bool = False) -> None:
        super().__init__()
        s = n_channels
        if s < 1:
            raise ConfigError(f"model.attention_options.n_channels must be >= 1, got {s}")
        if merge not in MERGES:
            raise ConfigError(f"model.attention_options.merge: unknown {merge!r}; allowed: {', '.join(MERGES)}")
        h = channel_heads or max(1, cfg.n_head // s)
        hkv = channel_kv_heads or (h if cfg.n_kv_heads is None else max(1, h * cfg.n_kv_heads // cfg.n_head))
        if h % hkv:
            raise ConfigError(f"model.attention_options: channel_heads ({h}) must be divisible by "
                              f"channel_kv_heads ({hkv})")
        width = max(1, round(mult * (cfg.d_ff or 4 * cfg.d_model) / s))
        ch_cfg = replace(cfg, n_head=h, n_kv_heads=hkv, d_head=cfg.head_dim)
        self.n_channels, self.merge_kind, self.width = s, merge, width
        self.channels = nn.ModuleList(Channel(ch_cfg, layer_idx, width) for _ in range(s))
        self.merge = nn.Linear(cfg.d_model, s, bias=cfg.bias) if merge == "softmax" and s > 1 else None
        self.shared_mlp = build_component("ffn", cfg.ffn, cfg.ffn_options, replace(cfg, d_ff=width)) \
            if shared_mlp else None
        self.register_buffer("slopes", alibi_slopes(h), persistent=False)
        self.hook_merge = HookPoint()       # (B, T, s)
        self.hook_channels = HookPoint()    # (B, T, s, D)

    def forward(self, u: Tensor, ctx: Context) -> Tensor:
        position = ctx.position if ctx.position.alibi_slopes() is None else \
            _ChannelPosition(ctx.position, self.slopes)
        ys = []
        for c, channel in enumerate(self.channels):
            cache = None if ctx.cache is None else _ChannelCache(ctx.cache, c)
            ch_ctx = replace(ctx, cache=cache, position=position)
            ys.append(channel(u, ch_ctx, self.shared_mlp))
        if self.n_channels == 1:
            return self.hook_channels(ys[0].unsqueeze(2)).squeeze(2)
        y = self.hook_channels(torch.stack(ys, dim=2))                     # (B, T, s, D)
        if self.merge_kind == "max":
            return y.amax(dim=2)
        if self.merge_kind == "mean":
            w = torch.full(y.shape[:3], 1.0 / self.n_channels, device=y.device, dtype=y.dtype)
        else:
            w = self.merge(u).float().softmax(-1).to(y.dtype)
        w = self.hook_merge(w)
        return torch.einsum("bts,btsd->btd", w, y)
