"""Transformer block: attention + FFN sublayers with norms and residuals (registry kind ``block``).

Norm placement: ``pre`` x + f(norm(x)) (GPT-2), ``post`` norm(x + f(x)) (Vaswani 2017),
``sandwich`` x + norm'(f(norm(x))) (CogView). ``rezero`` scales each sublayer output by a
learned scalar initialised to 0 (Bachlechner et al. 2020). ``attn_only`` drops the FFN.
``parallel_residual`` (pre-norm): x + attn(ln1(x)) + ffn(ln2(x)), both sublayers read the same input
(GPT-J, GPT-NeoX); ``hook_resid_mid`` is then never called (there is no mid-block stream).
Hook points: ``hook_resid_pre``, ``hook_attn_out``, ``hook_resid_mid``, ``hook_mlp_out``,
``hook_resid_post``, all ``(B, T, D)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from modformer import registry
from modformer.config import ModelConfig
from modformer.layers.attention.mha import MultiHeadAttention
from modformer.layers.context import Context
from modformer.layers.hooks import HookPoint
from modformer.layers.norm import build_norm
from modformer.registry import ConfigError, register


def build_component(kind: str, name: str, options: dict, *args: object) -> nn.Module:
    """Look ``name`` up in ``kind``'s registry and construct it; bad options -> ConfigError."""
    ctor = registry.get(kind, name, field=f"model.{kind}")
    try:
        return ctor(*args, **options)
    except TypeError as e:
        raise ConfigError(f"model.{kind}_options {sorted(options)} not accepted by {kind} {name!r}: {e}") from e


@register("block", "standard")
class Block(nn.Module):
    """One residual block; the sublayers are registry lookups."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        cfg = cfg.for_layer(layer_idx)          # per-layer head counts / FFN widths (model.layer_overrides)
        self.placement = cfg.norm_placement
        self.parallel = cfg.parallel_residual
        self.attn = build_component("attention", cfg.attention, cfg.attention_options, cfg, layer_idx)
        if cfg.position == "shortformer" and not isinstance(self.attn, MultiHeadAttention):
            raise ConfigError(f"model.position='shortformer' needs an attention with a fused QKV projection "
                              f"(mha and its variants), not {cfg.attention!r}")
        self.ln1 = build_norm(cfg)
        self.ln1_post = build_norm(cfg) if self.placement == "sandwich" else None
        self.mlp = None if cfg.attn_only else build_component("ffn", cfg.ffn, cfg.ffn_options, cfg)
        self.ln2 = None if cfg.attn_only else build_norm(cfg)
        self.ln2_post = build_norm(cfg) if self.placement == "sandwich" and self.mlp is not None else None
        self.drop = nn.Dropout(cfg.dropout)
        if cfg.rezero:
            self.gate_attn = nn.Parameter(torch.zeros(1))
            self.gate_mlp = nn.Parameter(torch.zeros(1)) if self.mlp is not None else None
        else:
            self.gate_attn = self.gate_mlp = None
        for name in ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post"):
            setattr(self, name, HookPoint())

    def _sublayer(self, x: Tensor, f: nn.Module, norm: nn.Module, norm_post: nn.Module | None,
                  gate: Tensor | None, hook: HookPoint, *args: object) -> Tensor:
        out = f(x if self.placement == "post" else norm(x), *args)
        if norm_post is not None:
            out = norm_post(out)
        out = self.drop(out)
        if gate is not None:
            out = out * gate
        x = x + hook(out)
        return norm(x) if self.placement == "post" else x

    def forward(self, x: Tensor, ctx: Context) -> Tensor:
        x = self.hook_resid_pre(x)
        if self.parallel and self.mlp is not None:
            return self.hook_resid_post(self._parallel(x, ctx))
        x = self._sublayer(x, self.attn, self.ln1, self.ln1_post, self.gate_attn, self.hook_attn_out, ctx)
        if self.mlp is not None:
            x = self.hook_resid_mid(x)
            x = self._sublayer(x, self.mlp, self.ln2, self.ln2_post, self.gate_mlp, self.hook_mlp_out)
        return self.hook_resid_post(x)

    def _parallel(self, x: Tensor, ctx: Context) -> Tensor:
        """Pre-norm parallel block; summed as mlp + attn + x, the order GPT-NeoX adds them in."""
        attn = self.drop(self.attn(self.ln1(x), ctx))
        mlp = self.drop(self.mlp(self.ln2(x)))
        if self.gate_attn is not None:
            attn, mlp = attn * self.gate_attn, mlp * self.gate_mlp
        return self.hook_mlp_out(mlp) + self.hook_attn_out(attn) + x
