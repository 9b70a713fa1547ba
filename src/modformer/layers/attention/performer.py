"""Performer FAVOR+ attention (registry attention ``performer``; Choromanski et al. 2021), causal.

Same parameters as ``mha``. Softmax attention ``exp(q.k / sqrt(Dh))`` is approximated by positive random
features: with ``x' = x / Dh^(1/4)`` and ``m`` orthogonal Gaussian directions ``w_r`` (rows of orthogonal
blocks, rescaled to chi-distributed norms),

    phi(x) = exp(w_r . x' - |x'|^2 / 2) / sqrt(m),      E[phi(q) . phi(k)] = exp(q.k / sqrt(Dh)),

so ``out_i = sum_{j<=i} phi(q_i).phi(k_j) v_j / sum_{j<=i} phi(q_i).phi(k_j)``: linear in T. The causal
prefix sums run chunk by chunk (``chunk`` tokens): inside a chunk a masked (chunk x chunk) product,
across chunks a running state ``S = sum phi(k) v^T`` (m x Dh) and ``z = sum phi(k)``, so memory is
O(T m + m Dh) rather than the O(T m Dh) of a naive cumulative sum. Each query's features are
stabilised by subtracting its own maximum exponent (cancels exactly in the ratio). The features are a
fixed, non-persistent buffer drawn from ``seed + layer_idx`` (same model, same features).

``model.attention_options``: ``n_features`` m (default 256), ``chunk`` (128), ``seed`` (0), ``n_kv_heads``.
Computed in float32. ``hook_pattern`` is not available (there is no attention matrix).
"""

from __future__ import annotations

import torch
from torch import Tensor

from modformer.config import ModelConfig
from modformer.layers.attention.masks import segments
from modformer.layers.attention.mha import MultiHeadAttention
from modformer.layers.context import Context
from modformer.registry import ConfigError, register


def orthogonal_features(m: int, d: int, generator: torch.Generator) -> Tensor:
    """``(m, d)`` random directions: stacked orthogonal blocks with chi(d)-distributed row norms."""
    blocks = []
    for _ in range(-(-m // d)):
        qmat, _ = torch.linalg.qr(torch.randn(d, d, generator=generator))
        blocks.append(qmat.T)
    w = torch.cat(blocks)[:m]
    norms = torch.randn(m, d, generator=generator).norm(dim=1, keepdim=True)
    return w * norms


def positive_features(x: Tensor, w: Tensor, is_query: bool) -> Tensor:
    """FAVOR+ features ``(..., T, m)`` of ``x (..., T, Dh)`` (already scaled by Dh^-1/4)."""
    proj = x @ w.T                                                    # (..., T, m)
    expo = proj - (x * x).sum(-1, keepdim=True) / 2
    if is_query:
        expo = expo - expo.amax(-1, keepdim=True).detach()           # per-query constant: cancels in the ratio
    return torch.exp(expo.clamp_max(60.0)) / w.shape[0] ** 0.5


def causal_linear_attention(qf: Tensor, kf: Tensor, v: Tensor, offset: int = 0, chunk: int = 128,
                            eps: float = 1e-30) -> Tensor:
    """``out_i = sum_{j <= offset+i} qf_i.kf_j v_j / sum_{j <= offset+i} qf_i.kf_j``.

    qf ``(B, H, Tq, m)`` are the features of queries at positions ``offset..``; kf ``(B, H, Tk, m)``,
    v ``(B, H, Tk, Dh)`` cover positions ``0..Tk-1`` with ``Tk >= offset + Tq``.
    """
    B, H, Tq, m = qf.shape
    state = kf[:, :, :offset].transpose(-2, -1) @ v[:, :, :offset]    # (B, H, m, Dh) keys before the queries
    norm = kf[:, :, :offset].sum(2)                                   # (B, H, m)
    outs = []
    for s in range(0, Tq, chunk):
        e = min(s + chunk, Tq)
        qc, kc, vc = qf[:, :, s:e], kf[:, :, offset + s:offset + e], v[:, :, offset + s:offset + e]
        a = (qc @ kc.transpose(-2, -1)).tril()                        # (B, H, c, c) within the chunk
        num = a @ vc + qc @ state
        den = a.sum(-1) + (qc * norm[:, :, None]).sum(-1)
        outs.append(num / den.clamp_min(eps)[..., None])
        state = state + kc.transpose(-2, -1) @ vc
        norm = norm + kc.sum(2)
    return torch.cat(outs, 2)


@register("attention", "performer")
class PerformerAttention(MultiHeadAttention):
    """``mha`` projections with causal FAVOR+ linear attention in place of softmax attention."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, n_features: int = 256, chunk: int = 128, seed: int = 0,
                 n_kv_heads: int | None = None) -> None:
        super().__init__(cfg, layer_idx, n_kv_heads)
        if not cfg.causal or cfg.position == "alibi" or n_features < 1 or chunk < 1:
            raise ConfigError("performer needs causal attention, no ALiBi, n_features >= 1 and chunk >= 1")
        self.chunk = chunk
        g = torch.Generator().manual_seed(seed + 1000 * layer_idx)
        self.register_buffer("features", orthogonal_features(n_features, self.head_dim, g), persistent=False)

    def forward(self, x: Tensor, ctx: Context) -> Tensor:
        B, T, _ = x.shape
        if ctx.q_offset is None:
            raise ValueError("performer does not support tensor positions (compiled decoding)")
        q, k, v = self.project_qkv(x, ctx)
        if ctx.cache is not None:
            k, v = ctx.cache.update(self.layer_idx, k, v)
        rep = self.n_head // self.n_kv_heads
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scale = self.head_dim ** -0.25
        w = self.features.float()
        with torch.autocast(q.device.type, enabled=False):
            qf = positive_features(q.float() * scale, w, True)
            kf = positive_features(k.float() * scale, w, False)
            if ctx.key_valid is None:
                z = causal_linear_attention(qf, kf, v.float(), ctx.q_offset, self.chunk)
            else:      # padded / packed: each row's document alone (padding queries get 0)
                z = torch.zeros(B, self.n_head, T, self.head_dim, device=q.device)
                for b, rows, cols in segments(ctx.key_valid, ctx.key_doc, ctx.q_slots):
                    z[b][:, rows] = causal_linear_attention(qf[b:b + 1, :, rows], kf[b:b + 1, :, cols],
                                                            v[b:b + 1, :, cols].float(), len(cols) - len(rows),
                                                            self.chunk)[0]
        return self.merge_heads(z.to(v.dtype), B, T)
