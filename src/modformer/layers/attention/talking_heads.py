"""Talking-heads attention (registry attention ``talking_heads``; Shazeer, Lan, Cheng, Ding, Hou 2020,
"Talking-Heads Attention").

Multi-head attention plus two learned H x H maps across heads: one mixes the attention logits
before the softmax, one mixes the attention weights after it::

    L   = q k^T / sqrt(Dh)                   (B, H, Tq, Tk)
    L'  = einsum(L, P_l)  + bias             bias: causal -inf mask and ALiBi, added after mixing
    W   = einsum(softmax(L'), P_w)
    out = W_o [W v]

Both maps start at the identity, so an untrained talking-heads layer equals mha with the same
projections. Mixing needs the explicit logits, so this always runs the eager path (mask/bias from
``kernels.attn_bias``; a flex ``block_mask`` is densified as the eager kernel does); the KV cache,
GQA (keys/values expanded to H heads before the logits), RoPE, ALiBi and QK-norm work as in mha,
whose projections this class reuses. Masked logits stay masked because the mask is added after the
pre-softmax mix, and masked weights stay 0 after the post-softmax mix (it mixes heads, not keys).

Parameters: those of mha, ``D (H + 2 Hkv) Dh + b (H + 2 Hkv) Dh + H Dh D + b D``, plus ``2 H^2``.
Hook points: as mha; ``hook_logits`` (B, H, Tq, Tk) mixed logits before the mask, ``hook_pattern``
the mixed weights that multiply v (always materialised here), ``hook_pattern_pre`` the softmax
before the post-softmax mix.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modformer.config import ModelConfig
from modformer.layers.attention.kernels import AttnSpec, alibi_bias, attn_bias, dense_from_block_mask, row_keep
from modformer.layers.attention.mha import MultiHeadAttention
from modformer.layers.context import Context
from modformer.layers.hooks import HookPoint
from modformer.registry import register


@register("attention", "talking_heads")
class TalkingHeadsAttention(MultiHeadAttention):
    """mha with learned head mixing of logits (pre-softmax) and weights (post-softmax)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, n_kv_heads: int | None = None) -> None:
        super().__init__(cfg, layer_idx, n_kv_heads)
        self.mix_logits = nn.Parameter(torch.eye(self.n_head))     # P_l (H_in, H_out)
        self.mix_weights = nn.Parameter(torch.eye(self.n_head))    # P_w (H_in, H_out)
        self.hook_logits = HookPoint()
        self.hook_pattern_pre = HookPoint()

    def forward(self, x: Tensor, ctx: Context) -> Tensor:
        B, T, _ = x.shape
        H, Dh = self.n_head, self.head_dim
        q, k, v = self.project_qkv(x, ctx)
        if ctx.cache is not None:
            k, v = ctx.cache.update(self.layer_idx, k, v)
        rep = H // self.n_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        acc = torch.promote_types(q.dtype, torch.float32)
        logits = torch.matmul(q, k.transpose(-2, -1)).to(acc) / math.sqrt(Dh)          # (B, H, Tq, Tk)
        logits = self.hook_logits(torch.einsum("bhqk,hg->bgqk", logits, self.mix_logits.to(acc)))
        spec = AttnSpec(causal=self.causal, q_offset=ctx.q_offset, q_pos=ctx.q_slots,
                        alibi_slopes=ctx.position.alibi_slopes(), memo=ctx.memo, **ctx.mask_fields())
        Tk = k.shape[2]
        if spec.key_valid is not None:
            if spec.alibi_slopes is not None:
                logits = logits + alibi_bias(spec, H, T, Tk, q.device, acc)
            logits = logits.masked_fill(~row_keep(spec, T, Tk, q.device), float("-inf"))
        elif ctx.block_mask is not None:
            keep = dense_from_block_mask(ctx.block_mask, T, Tk).to(q.device)
            logits = logits.masked_fill(~keep, float("-inf"))
        else:
            bias = attn_bias(spec, H, T, Tk, q.device, acc)
            if bias is not None:
                logits = logits + bias
        probs = self.hook_pattern_pre(torch.softmax(logits, dim=-1).nan_to_num(0.0))
        weights = self.hook_pattern(torch.einsum("bhqk,hg->bgqk", probs, self.mix_weights.to(acc)))
        if self.training and self.attn_dropout > 0:
            weights = F.dropout(weights, self.attn_dropout)
        z = self.hook_z(torch.matmul(weights.to(v.dtype), v))                          # (B, H, T, Dh)
        if self.hook_result.active:
            w_o = self.out.weight.view(-1, H, Dh)
            self.hook_result(torch.einsum("bhtd,mhd->bthm", z, w_o))
        return self.out(z.transpose(1, 2).reshape(B, T, H * Dh))
