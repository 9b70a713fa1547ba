"""Multi-head latent attention (registry attention ``mla``; DeepSeek-AI 2024, "DeepSeek-V2: A Strong,
Economical, and Efficient Mixture-of-Experts Language Model", section 2.1).

Keys and values are up-projected from one small latent per token, so the KV cache stores only
the latent and one small shared RoPE key::

    c_kv = norm(W_dkv x)                  (B, T, d_c)        cached
    k_r  = RoPE(W_kr x)                   (B, 1, T, d_r)     cached, shared by all heads
    k_h  = [W_uk,h c_kv ; k_r]            (B, Hkv, T, Dh)    q/k head dim Dh = d_nope + d_r
    v_h  = W_uv,h c_kv                    (B, Hkv, T, Dh)
    q_h  = [W_uq,h c_q ; RoPE(W_qr,h c_q)] with c_q = norm(W_dq x) (or x itself when q_lora_rank is None)

``model.attention_options``: ``kv_lora_rank`` d_c (default 4 * head_dim, DeepSeek-V2's ratio),
``q_lora_rank`` d_c' (default None = uncompressed queries), ``rope_dim`` d_r (even, < head_dim;
default head_dim // 2 with ``position: rope``, else 0). The decoupled part is rotated only with
``position: rope``; other encodings work unchanged (absolute ones are added to the embeddings,
ALiBi is applied by the kernel), with d_r > 0 then meaning an unrotated shared key part.
``n_kv_heads`` < n_head up-projects fewer key/value heads (GQA); ``qk_norm`` is not supported.

Cache per token and layer: ``d_c + d_r`` values, against ``2 * Hkv * Dh`` for mha. Stored through the
cache's generic store as ``(layer, "mla_latent")`` ``(B, T, d_c)`` and ``(layer, "mla_k_rope")``
``(B, 1, T, d_r)``; keys/values for all cached tokens are re-expanded each call (the weight-absorbed
decoding form of the paper is an optimisation this reference does not implement).

Parameters (b = 1 with bias, else 0; n(d) = parameters of a ``model.norm`` of width d):
``W_dkv+W_kr``: D (d_c + d_r) + b (d_c + d_r);  latent norm n(d_c);
``W_uk+W_uv``: d_c Hkv (d_nope + Dh) + b Hkv (d_nope + Dh);
queries: D H Dh + b H Dh, or with d_c': D d_c' + b d_c' + n(d_c') + d_c' H Dh + b H Dh;
``W_o``: H Dh D + b D.
Hook points: ``hook_latent`` (B, T, d_c) and ``hook_k_rope`` (B, 1, T, d_r) for this call's tokens;
``hook_q`` (B, H, T, Dh); ``hook_k``, ``hook_v`` (B, Hkv, Tk, Dh) over all keys, cached ones included;
``hook_pattern``, ``hook_z``, ``hook_result`` as in mha.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn

from modformer.config import ModelConfig
from modformer.layers.attention.kernels import AttnSpec, attend, eager_attention
from modformer.layers.context import Context
from modformer.layers.hooks import HookPoint
from modformer.layers.norm import build_norm
from modformer.layers.position import RotaryPosition
from modformer.registry import ConfigError, register


@register("attention", "mla")
class MultiHeadLatentAttention(nn.Module):
    """Low-rank joint KV compression with a decoupled RoPE key; the cache holds the latent only."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, kv_lora_rank: int | None = None,
                 q_lora_rank: int | None = None, rope_dim: int | None = None) -> None:
        super().__init__()
        if cfg.qk_norm:
            raise ConfigError("model.qk_norm is not supported by model.attention='mla'")
        self.layer_idx, self.causal, self.backend = layer_idx, cfg.causal, cfg.attn_backend
        self.attn_dropout = cfg.attn_dropout
        D, H, Hkv, Dh = cfg.d_model, cfg.n_head, cfg.kv_heads, cfg.head_dim
        rope = cfg.position == "rope"
        dr = (Dh // 2 if rope else 0) if rope_dim is None else rope_dim
        if dr % 2 or not 0 <= dr < Dh:
            raise ConfigError(f"model.attention_options.rope_dim must be even and in [0, head_dim={Dh}), got {dr}")
        if rope and dr == 0:
            raise ConfigError("model.attention='mla' with position='rope' needs attention_options.rope_dim > 0 "
                              "(the decoupled RoPE part carries all position information)")
        dc = kv_lora_rank or 4 * Dh
        self.n_head, self.n_kv_heads, self.head_dim = H, Hkv, Dh
        self.dc, self.dr, self.dn = dc, dr, Dh - dr
        self.rope = RotaryPosition(replace(cfg, d_head=dr, n_head=1)) if rope and dr else None
        self.kv_down = nn.Linear(D, dc + dr, bias=cfg.bias)                 # W_dkv and W_kr fused
        self.kv_norm = build_norm(cfg, dc)
        self.kv_up = nn.Linear(dc, Hkv * (self.dn + Dh), bias=cfg.bias)      # W_uk and W_uv fused
        if q_lora_rank:
            self.q_down = nn.Linear(D, q_lora_rank, bias=cfg.bias)
            self.q_norm = build_norm(cfg, q_lora_rank)
            self.q_up = nn.Linear(q_lora_rank, H * Dh, bias=cfg.bias)
        else:
            self.q_down = self.q_norm = None
            self.q_up = nn.Linear(D, H * Dh, bias=cfg.bias)
        self.out = nn.Linear(H * Dh, D, bias=cfg.bias)
        for name in ("hook_latent", "hook_k_rope", "hook_q", "hook_k", "hook_v", "hook_pattern", "hook_z",
                     "hook_result"):
            setattr(self, name, HookPoint())

    def forward(self, x: Tensor, ctx: Context) -> Tensor:
        B, T, _ = x.shape
        H, Hkv, Dh, dn, dr = self.n_head, self.n_kv_heads, self.head_dim, self.dn, self.dr
        c_kv, k_r = self.kv_down(x).split([self.dc, dr], dim=-1)
        c_kv = self.hook_latent(self.kv_norm(c_kv))                            # (B, T, d_c)
        k_r = k_r.unsqueeze(1)                                                 # (B, 1, T, d_r)
        c_q = x if self.q_down is None else self.q_norm(self.q_down(x))
        q = self.q_up(c_q).view(B, T, H, Dh).transpose(1, 2)                  # (B, H, T, Dh)
        if self.rope is not None:
            q_r, k_r = self.rope.rotate(q[..., dn:], k_r, ctx.pos)
            q = torch.cat([q[..., :dn], q_r], dim=-1)
        k_r = self.hook_k_rope(k_r)
        if ctx.cache is not None:
            c_kv = ctx.cache.append(self.layer_idx, "mla_latent", c_kv)       # (B, Tk, d_c)
            if dr:
                k_r = ctx.cache.append(self.layer_idx, "mla_k_rope", k_r)     # (B, 1, Tk, d_r)
        Tk = c_kv.shape[1]
        k_c, v = self.kv_up(c_kv).view(B, Tk, Hkv, dn + Dh).transpose(1, 2).split([dn, Dh], dim=-1)
        k = torch.cat([k_c, k_r.expand(B, Hkv, Tk, dr)], dim=-1) if dr else k_c
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        spec = AttnSpec(causal=self.causal, q_offset=ctx.q_offset, q_pos=ctx.q_slots,
                        alibi_slopes=ctx.position.alibi_slopes(),
                        dropout_p=self.attn_dropout if self.training else 0.0, block_mask=ctx.block_mask,
                        **ctx.mask_fields())
        if self.hook_pattern.active:
            _, probs = eager_attention(q, k, v, spec, need_weights=True)
            probs = self.hook_pattern(probs)
            z = torch.matmul(probs.to(v.dtype), v.repeat_interleave(H // Hkv, dim=1))
        else:
            z, _ = attend(q, k, v, spec, self.backend)
        z = self.hook_z(z)                                                     # (B, H, T, Dh)
        if self.hook_result.active:
            w_o = self.out.weight.view(-1, H, Dh)
            self.hook_result(torch.einsum("bhtd,mhd->bthm", z, w_o))
        return self.out(z.transpose(1, 2).reshape(B, T, H * Dh))
