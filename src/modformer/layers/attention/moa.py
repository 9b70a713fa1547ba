"""Mixture of attention heads (registry attention ``moa``; Zhang et al. 2022, "Mixture of Attention
Heads: Selecting Attention Heads Per Token", EMNLP).

E attention experts, each with its own query and output projections ``W_q^e`` (D -> Dh) and
``W_o^e`` (Dh -> D); the key and value projections are shared by all experts (one K/V head, as in
the paper, so GQA does not apply and the cache is the size of MQA's). A router picks the top-k
experts per token with gates ``softmax(x W_r)`` renormalised over the chosen k::

    y_t = sum_{e in topk(t)} g_{t,e} W_o^e Attn(W_q^e x_t, K, V)

Attention runs only for the k chosen experts ("query slots" j = 0..k-1, ordered by gate); the
query and output projections are computed densely for all E experts (cheap for small E).
``model.attention_options``: ``n_experts`` E (default 2 * n_head), ``top_k`` k (default n_head, the
same attention cost as mha), ``aux_loss_weight`` (0.01), ``z_loss_weight`` (0), ``normalize`` (True).
Positions: RoPE rotates every slot's query and the shared key; ALiBi gives query slot j the j-th
slope of ``alibi_slopes(k)`` (slopes follow gate rank, since experts move between slots per token).
Auxiliary loss (``self.aux_loss``): Switch-style ``aux_loss_weight * E * sum_e f_e P_e`` over the k
assignments per token, plus the optional router z-loss, as in ``layers/moe.py``.

Parameters (b = 1 with bias, else 0): ``D E`` (router) ``+ E (D Dh + b Dh)`` (queries)
``+ 2 (D Dh + b Dh)`` (shared K, V) ``+ E Dh D + b D`` (outputs).
Hook points: ``hook_gates`` (B, T, E); ``hook_q`` (B, k, T, Dh) query slots; ``hook_k``, ``hook_v``
(B, 1, T, Dh); ``hook_pattern`` (B, k, Tq, Tk); ``hook_z`` (B, k, T, Dh); ``hook_result`` (B, T, k, D)
gated per-slot outputs (computed only when hooked).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modformer.config import ModelConfig
from modformer.layers.attention.kernels import AttnSpec, attend, eager_attention
from modformer.layers.context import Context
from modformer.layers.hooks import HookPoint
from modformer.layers.norm import build_norm
from modformer.layers.position import alibi_slopes
from modformer.registry import ConfigError, register


@register("attention", "moa")
class MixtureOfAttentionHeads(nn.Module):
    """Per-token top-k selection among E query/output head experts over shared keys/values."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, n_experts: int | None = None, top_k: int | None = None,
                 aux_loss_weight: float = 0.01, z_loss_weight: float = 0.0, normalize: bool = True) -> None:
        super().__init__()
        E, k = n_experts or 2 * cfg.n_head, top_k or cfg.n_head
        if not 1 <= k <= E:
            raise ConfigError(f"model.attention_options: need 1 <= top_k <= n_experts, got {k}, {E}")
        if cfg.n_kv_heads not in (None, 1):
            raise ConfigError("model.attention='moa' shares one key/value head among its experts; "
                              f"leave model.n_kv_heads unset (got {cfg.n_kv_heads})")
        D, Dh = cfg.d_model, cfg.head_dim
        self.layer_idx, self.causal, self.backend = layer_idx, cfg.causal, cfg.attn_backend
        self.attn_dropout = cfg.attn_dropout
        self.n_experts, self.top_k, self.head_dim, self.normalize = E, k, Dh, normalize
        self.aux_loss_weight, self.z_loss_weight = aux_loss_weight, z_loss_weight
        self.router = nn.Linear(D, E, bias=False)
        std = cfg.init_std
        self.w_q = nn.Parameter(torch.randn(E, D, Dh) * std)                                   # (E, D, Dh)
        self.b_q = nn.Parameter(torch.zeros(E * Dh)) if cfg.bias else None                      # flat: no decay
        self.kv = nn.Linear(D, 2 * Dh, bias=cfg.bias)
        self.w_o = nn.Parameter(torch.randn(E, Dh, D) * std / math.sqrt(2 * cfg.n_layer))      # (E, Dh, D)
        self.b_o = nn.Parameter(torch.zeros(D)) if cfg.bias else None
        if cfg.qk_norm:
            norm_cfg = cfg if cfg.norm != "none" else ModelConfig(norm="rmsnorm", norm_eps=cfg.norm_eps)
            self.q_norm, self.k_norm = build_norm(norm_cfg, Dh), build_norm(norm_cfg, Dh)
        else:
            self.q_norm = self.k_norm = nn.Identity()
        self.register_buffer("slot_slopes", alibi_slopes(k), persistent=False)
        for name in ("hook_gates", "hook_q", "hook_k", "hook_v", "hook_pattern", "hook_z", "hook_result"):
            setattr(self, name, HookPoint())
        self.aux_loss: Tensor | None = None

    def forward(self, x: Tensor, ctx: Context) -> Tensor:
        B, T, D = x.shape
        E, k, Dh = self.n_experts, self.top_k, self.head_dim
        logits = self.router(x).float()                                          # (B, T, E)
        probs = logits.softmax(-1)
        gate, idx = probs.topk(k, dim=-1)                                         # (B, T, k)
        if self.normalize:
            gate = gate / gate.sum(-1, keepdim=True)
        if self.hook_gates.active:
            gate = self.hook_gates(torch.zeros_like(probs).scatter(-1, idx, gate)).gather(-1, idx)
        q_all = torch.einsum("btd,edh->bteh", x, self.w_q)                        # (B, T, E, Dh)
        if self.b_q is not None:
            q_all = q_all + self.b_q.view(E, Dh)
        slot_idx = idx.unsqueeze(-1).expand(B, T, k, Dh)
        q = self.q_norm(q_all.gather(2, slot_idx)).transpose(1, 2)                # (B, k, T, Dh)
        key, v = self.kv(x).view(B, T, 1, 2 * Dh).transpose(1, 2).split(Dh, dim=-1)
        key = self.k_norm(key)                                                    # (B, 1, T, Dh)
        q, key = ctx.position.rotate(q, key, ctx.pos)
        q, key, v = self.hook_q(q), self.hook_k(key), self.hook_v(v)
        if ctx.cache is not None:
            key, v = ctx.cache.update(self.layer_idx, key, v)
        slopes = self.slot_slopes if ctx.position.alibi_slopes() is not None else None
        spec = AttnSpec(causal=self.causal, q_offset=ctx.q_offset, q_pos=ctx.q_slots, alibi_slopes=slopes,
                        dropout_p=self.attn_dropout if self.training else 0.0, block_mask=ctx.block_mask,
                        **ctx.mask_fields())
        if self.hook_pattern.active:
            _, probs_attn = eager_attention(q, key, v, spec, need_weights=True)
            z = torch.matmul(self.hook_pattern(probs_attn).to(v.dtype), v)       # v broadcasts over slots
        else:
            z, _ = attend(q, key, v, spec, self.backend)
        z = self.hook_z(z).transpose(1, 2)                                        # (B, T, k, Dh)
        weighted = z * gate.unsqueeze(-1).to(z.dtype)
        if self.hook_result.active:
            self.hook_result(torch.einsum("btjh,btjhd->btjd", weighted, self.w_o[idx]))
        dense = torch.zeros(B, T, E, Dh, device=z.device, dtype=z.dtype).scatter(2, slot_idx, weighted)
        out = torch.einsum("bteh,ehd->btd", dense, self.w_o)
        if self.b_o is not None:
            out = out + self.b_o
        frac = F.one_hot(idx, E).float().mean((0, 1, 2))                          # f_e over the k slots
        aux = self.aux_loss_weight * E * (frac * probs.mean((0, 1))).sum()
        if self.z_loss_weight:
            aux = aux + self.z_loss_weight * torch.logsumexp(logits, -1).square().mean()
        self.aux_loss = aux
        return out
