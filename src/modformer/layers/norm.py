"""Normalisation layers (registry kind ``norm``): ``layernorm``, ``rmsnorm``, ``none``."""

from __future__ import annotations

from torch import nn

from modformer.config import ModelConfig
from modformer.registry import register


@register("norm", "layernorm")
def layer_norm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    return nn.LayerNorm(dim or cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


@register("norm", "rmsnorm")
def rms_norm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    return nn.RMSNorm(dim or cfg.d_model, eps=cfg.norm_eps)


@register("norm", "none")
def no_norm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    """Identity (e.g. for ReZero models, which train without normalisation)."""
    return nn.Identity()


def build_norm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    from modformer import registry

    return registry.get("norm", cfg.norm, field="model.norm")(cfg, dim)
