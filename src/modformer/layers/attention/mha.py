"""Multi-head attention with ``n_kv_heads`` key/value heads: MHA, GQA (1 < Hkv < H) and MQA (Hkv = 1).

Registered as ``mha`` (Hkv from the config), ``gqa`` (requires n_kv_heads) and ``mqa`` (Hkv = 1).
Hook points, shapes ``(B, H, T, Dh)`` unless noted: ``hook_q``, ``hook_k``, ``hook_v`` (after
RoPE), ``hook_pattern`` ``(B, H, Tq, Tk)`` (only computed when hooked; switches to the eager
kernel), ``hook_z`` (per-head mixed values), ``hook_result`` ``(B, T, H, D)`` (per-head output
in the residual basis; only computed when hooked). With ``model.value_embeds`` a layer that has a table mixes it
into its values before the cache (``hook_v`` shows the mix).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modformer.config import ModelConfig
from modformer.layers.attention.kernels import AttnSpec, attend, eager_attention
from modformer.layers.context import Context
from modformer.layers.hooks import HookPoint
from modformer.layers.norm import build_norm
from modformer.registry import ConfigError, register


@register("attention", "mha")
class MultiHeadAttention(nn.Module):
    """Fused QKV projection -> (QK-norm) -> RoPE -> cache -> kernel -> output projection."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, n_kv_heads: int | None = None) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = cfg.n_head
        self.n_kv_heads = n_kv_heads or cfg.kv_heads
        if self.n_head % self.n_kv_heads:
            raise ConfigError(f"model.n_head ({self.n_head}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        self.head_dim = cfg.head_dim
        self.causal = cfg.causal
        self.backend = cfg.attn_backend
        self.attn_dropout = cfg.attn_dropout
        qkv_out = (self.n_head + 2 * self.n_kv_heads) * self.head_dim
        self.qkv = nn.Linear(cfg.d_model, qkv_out, bias=cfg.bias if cfg.qkv_bias is None else cfg.qkv_bias)
        self.out = nn.Linear(self.n_head * self.head_dim, cfg.d_model, bias=cfg.bias)
        if cfg.qk_norm:
            norm_cfg = cfg if cfg.norm != "none" else ModelConfig(norm="rmsnorm", norm_eps=cfg.norm_eps)
            self.q_norm, self.k_norm = build_norm(norm_cfg, self.head_dim), build_norm(norm_cfg, self.head_dim)
        else:
            self.q_norm = self.k_norm = nn.Identity()
        # model.value_embeds: v <- a * v + b * value_embedding(token), (a, b) learned from (0.5, 0.5) (modded-nanogpt)
        self.value_mix = nn.Parameter(torch.tensor([0.5, 0.5])) if cfg.value_embed_table(layer_idx) is not None \
            else None
        for name in ("hook_q", "hook_k", "hook_v", "hook_pattern", "hook_z", "hook_result"):
            setattr(self, name, HookPoint())

    def project_qkv(self, x: Tensor, ctx: Context) -> tuple[Tensor, Tensor, Tensor]:
        """(B, T, D) -> q (B, H, T, Dh), k and v (B, Hkv, T, Dh), normed and rotated."""
        B, T, _ = x.shape
        H, Hkv, Dh = self.n_head, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv(x).split([H * Dh, Hkv * Dh, Hkv * Dh], dim=-1)
        pe = ctx.position.qk_embed(ctx.pos)                                   # Shortformer: queries and keys only
        if pe is not None:
            dq, dk = F.linear(pe.to(x.dtype), self.qkv.weight[: (H + Hkv) * Dh]).split([H * Dh, Hkv * Dh], dim=-1)
            q, k = q + dq, k + dk
        q = self.q_norm(q.view(B, T, H, Dh)).transpose(1, 2)
        k = self.k_norm(k.view(B, T, Hkv, Dh)).transpose(1, 2)
        if self.value_mix is not None:
            if ctx.value_embeds is None or self.layer_idx not in ctx.value_embeds:
                raise RuntimeError(f"layer {self.layer_idx} mixes a value embedding, but the model passed none "
                                   "(model.value_embeds is supported by model: gpt only)")
            a, b = self.value_mix.to(v.dtype)
            v = a * v + b * ctx.value_embeds[self.layer_idx].to(v.dtype)
        v = v.view(B, T, Hkv, Dh).transpose(1, 2)
        q, k = ctx.position.rotate(q, k, ctx.pos)
        return self.hook_q(q), self.hook_k(k), self.hook_v(v)

    def attn_spec(self, q: Tensor, k: Tensor, ctx: Context) -> AttnSpec:
        """Masking of this call; sparse variants (``sparse.py``) override it to add their pattern."""
        return AttnSpec(causal=self.causal, q_offset=ctx.q_offset, q_pos=ctx.q_slots,
                        alibi_slopes=ctx.position.alibi_slopes(),
                        dropout_p=self.attn_dropout if self.training else 0.0, block_mask=ctx.block_mask,
                        memo=ctx.memo, **ctx.mask_fields())

    def forward(self, x: Tensor, ctx: Context) -> Tensor:
        B, T, _ = x.shape
        q, k, v = self.project_qkv(x, ctx)
        if ctx.cache is not None:
            k, v = ctx.cache.update(self.layer_idx, k, v)
        spec = self.attn_spec(q, k, ctx)
        if self.hook_pattern.active:
            _, probs = eager_attention(q, k, v, spec, need_weights=True)
            probs = self.hook_pattern(probs)                                   # may be patched
            rep = self.n_head // self.n_kv_heads
            z = torch.matmul(probs.to(v.dtype), v.repeat_interleave(rep, dim=1))
        else:
            z, _ = attend(q, k, v, spec, self.backend)
        return self.merge_heads(z, B, T)

    def merge_heads(self, z: Tensor, B: int, T: int) -> Tensor:
        """Per-head values (B, H, T, Dh) -> hook_z, hook_result -> output projection (B, T, D)."""
        z = self.hook_z(z)                                                     # (B, H, T, Dh)
        if self.hook_result.active:
            w_o = self.out.weight.view(-1, self.n_head, self.head_dim)        # (D, H, Dh)
            self.hook_result(torch.einsum("bhtd,mhd->bthm", z, w_o))
        return self.out(z.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


@register("attention", "gqa")
def grouped_query_attention(cfg: ModelConfig, layer_idx: int, **options: object) -> MultiHeadAttention:
    """GQA: like ``mha`` but n_kv_heads must be set and smaller than n_head."""
    if cfg.n_kv_heads is None or cfg.n_kv_heads >= cfg.n_head:
        raise ConfigError("model.attention='gqa' needs model.n_kv_heads set below model.n_head "
                          f"(got n_kv_heads={cfg.n_kv_heads}, n_head={cfg.n_head})")
    return MultiHeadAttention(cfg, layer_idx, **options)


@register("attention", "mqa")
def multi_query_attention(cfg: ModelConfig, layer_idx: int, **options: object) -> MultiHeadAttention:
    """MQA: one key/value head shared by all query heads (Shazeer 2019)."""
    return MultiHeadAttention(cfg, layer_idx, n_kv_heads=1, **options)
