"""Mixture-of-experts FFN (registry ffn ``moe``): top-k token-choice routing (Shazeer et al. 2017; GShard,
Lepikhin et al. 2021; Switch Transformer, Fedus et al. 2022) with optional always-on shared experts
(DeepSeekMoE, Dai et al. 2024).

``model.ffn: moe`` with ``model.ffn_options``: ``n_experts`` E (8), ``top_k`` k (2), ``n_shared`` (0),
``d_expert`` F (``d_ff`` or 4*d_model), ``activation`` (gelu | relu | silu | gelu_tanh),
``capacity_factor`` (1.25; None = unlimited), ``eval_capacity_factor`` (None), ``aux_loss_weight``
(0.01), ``z_loss_weight`` (0), ``normalize`` (renormalise the k gates to sum to 1; default k > 1).

Routing: ``p = softmax(x W_r)`` over E experts; each token goes to its k most probable experts with
gates ``p_e`` (renormalised). Expert e computes ``down_e(act(up_e(x)))``; the output is the
gate-weighted sum plus the shared experts (one MLP of width ``n_shared * F``, always applied).

Capacity: each expert takes at most ``C = ceil(capacity_factor * N * k / E)`` of the N*k assignments of
a forward (training only by default; evaluation and cached decoding route every token, so they
agree). Assignments are served in position-major order (all sequences' position 0 first, each
token's slots in rank order), so a token's fate never depends on later positions (causality holds).
Nothing is dropped silently: an overflowed assignment contributes nothing from that expert (the
token keeps its residual stream and the shared experts' output), and ``aux_stats['moe_overflow']``
counts them out of ``aux_stats['moe_assignments']`` (summed over layers into ``model.aux_stats``
and logged by the trainer).

Auxiliary loss (``self.aux_loss``, summed into ``model.aux_loss``): Switch load balancing
``aux_loss_weight * E * sum_e f_e P_e`` (f_e: fraction of assignments routed to e before capacity,
P_e: mean router probability of e; equals ``aux_loss_weight`` when perfectly balanced) plus the ST-MoE
router z-loss ``z_loss_weight * mean(logsumexp(x W_r)^2)``.

Parameters (b = 1 with bias, else 0): ``D E`` (router, no bias) ``+ E (2 D F + b (F + D))`` (experts)
``+ [n_shared > 0] (2 D S + b (S + D))`` with ``S = n_shared * F`` (shared MLP).
Hook points: ``hook_router`` (B, T, E) probabilities, ``hook_gates`` (B, T, E) gates actually applied
(zero where unrouted or overflowed); the shared MLP has its own ``hook_pre``/``hook_post``.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modformer.config import ModelConfig
from modformer.layers.ffn import MLP
from modformer.layers.hooks import HookPoint
from modformer.registry import ConfigError, register

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu,
               "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


@register("ffn", "moe")
class MoE(nn.Module):
    """Top-k routed experts (batched weights ``(E, D, F)``), optional shared experts, capacity, aux loss."""

    def __init__(self, cfg: ModelConfig, n_experts: int = 8, top_k: int = 2, n_shared: int = 0,
                 d_expert: int | None = None, activation: str = "gelu", capacity_factor: float | None = 1.25,
                 eval_capacity_factor: float | None = None, aux_loss_weight: float = 0.01,
                 z_loss_weight: float = 0.0, normalize: bool | None = None) -> None:
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ConfigError(f"model.ffn_options: need 1 <= top_k <= n_experts, got top_k={top_k}, "
                              f"n_experts={n_experts}")
        if activation not in ACTIVATIONS:
            raise ConfigError(f"model.ffn_options.activation: unknown {activation!r}; "
                              f"allowed: {', '.join(ACTIVATIONS)}")
        D, Fe, E = cfg.d_model, d_expert or cfg.d_ff or 4 * cfg.d_model, n_experts
        self.n_experts, self.top_k, self.act = E, top_k, ACTIVATIONS[activation]
        self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor
        self.aux_loss_weight, self.z_loss_weight = aux_loss_weight, z_loss_weight
        self.normalize = top_k > 1 if normalize is None else normalize
        self.router = nn.Linear(D, E, bias=False)
        std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.n_layer)
        self.w_up = nn.Parameter(torch.randn(E, D, Fe) * std)          # (E, D, F)
        self.w_down = nn.Parameter(torch.randn(E, Fe, D) * out_std)    # (E, F, D)
        # biases stored flat (1-D) so the optimizer treats them as biases (no weight decay)
        self.b_up = nn.Parameter(torch.zeros(E * Fe)) if cfg.bias else None
        self.b_down = nn.Parameter(torch.zeros(E * D)) if cfg.bias else None
        self.shared_mlp = MLP(replace(cfg, d_ff=n_shared * Fe), self.act) if n_shared > 0 else None
        self.hook_router = HookPoint()
        self.hook_gates = HookPoint()
        self.aux_loss: Tensor | None = None
        self.aux_stats: dict[str, Tensor] = {}

    def capacity(self, n_tokens: int) -> int | None:
        cf = self.capacity_factor if self.training else self.eval_capacity_factor
        return None if cf is None else max(1, math.ceil(cf * n_tokens * self.top_k / self.n_experts))

    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """x (B, T, D) -> router logits (N, E), probs (N, E), expert ids (N, k), gates (N, k) with overflow zeroed."""
        B, T, _ = x.shape
        N, E, k = B * T, self.n_experts, self.top_k
        logits = self.router(x).float().view(N, E)
        probs = self.hook_router(logits.softmax(-1).view(B, T, E)).view(N, E)
        gate, idx = probs.topk(k, dim=-1)                                        # (N, k)
        if self.normalize:
            gate = gate / gate.sum(-1, keepdim=True)
        cap = self.capacity(N)
        if cap is not None:
            order = torch.arange(N, device=x.device).view(B, T).t().reshape(-1)  # position-major
            onehot = F.one_hot(idx[order], E)                                    # (N, k, E)
            rank = (onehot.view(N * k, E).cumsum(0).view(N, k, E) * onehot).sum(-1) - 1
            keep = torch.empty_like(rank, dtype=torch.bool)
            keep[order] = rank < cap
            gate = gate * keep
            overflow = (~keep).sum()
        else:
            overflow = torch.zeros((), dtype=torch.long, device=x.device)
        self.aux_stats = {"moe_overflow": overflow, "moe_assignments": torch.tensor(N * k, device=x.device)}
        return logits, probs, idx, gate

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        logits, probs, idx, gate = self.route(x)
        if self.hook_gates.active:
            dense = torch.zeros_like(probs).scatter(-1, idx, gate)
            gate = self.hook_gates(dense.view(B, T, -1)).view(B * T, -1).gather(-1, idx)
        flat = x.reshape(B * T, D)
        out = torch.zeros_like(flat)
        b_up = None if self.b_up is None else self.b_up.view(self.n_experts, -1)
        b_down = None if self.b_down is None else self.b_down.view(self.n_experts, -1)
        for e in range(self.n_experts):   # every expert runs (maybe on 0 tokens) so all params get grads
            tok, slot = ((idx == e) & (gate != 0)).nonzero(as_tuple=True)
            h = flat[tok] @ self.w_up[e]
            if b_up is not None:
                h = h + b_up[e]
            h = self.act(h) @ self.w_down[e]
            if b_down is not None:
                h = h + b_down[e]
            out = out.index_add(0, tok, (h * gate[tok, slot, None]).to(out.dtype))
        out = out.view(B, T, D)
        if self.shared_mlp is not None:
            out = out + self.shared_mlp(x)
        # Switch load balancing: E * sum_e f_e P_e (f from the router's choices, before capacity).
        frac = F.one_hot(idx, self.n_experts).float().mean((0, 1))                # (E,) f_e
        aux = self.aux_loss_weight * self.n_experts * (frac * probs.mean(0)).sum()
        if self.z_loss_weight:
            aux = aux + self.z_loss_weight * torch.logsumexp(logits, -1).square().mean()
        self.aux_loss = aux
        return out
