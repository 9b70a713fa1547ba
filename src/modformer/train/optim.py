"""Optimizers (registry kind ``optimizer``) with decay / no-decay parameter groups.

Weight decay applies to matrices (``dim >= 2``) except embeddings unless
``train.decay_embeddings``; biases, norm weights and residual gates are never decayed.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from modformer.config import TrainConfig
from modformer.registry import ConfigError, register


def param_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool) -> list[dict]:
    """Two groups: decayed matrices and everything else (tied weights appear once)."""
    embed_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        is_embedding = id(p) in embed_ids
        (decay if p.dim() >= 2 and (decay_embeddings or not is_embedding) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _fused_ok(model: nn.Module) -> bool:
    p = next(model.parameters(), None)
    return p is not None and p.device.type == "cuda"


@register("optimizer", "adamw")
def adamw(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay, cfg.decay_embeddings)
    extra = {"fused": True} if _fused_ok(model) and "fused" in inspect.signature(torch.optim.AdamW).parameters \
        else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, **extra)


@register("optimizer", "adam")
def adam(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam with L2-coupled decay (the original grokking paper compares it with AdamW)."""
    groups = param_groups(model, cfg.weight_decay, cfg.decay_embeddings)
    return torch.optim.Adam(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


@register("optimizer", "sgd")
def sgd(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay, cfg.decay_embeddings)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.betas[0], nesterov=cfg.betas[0] > 0)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    from modformer import registry

    try:
        return registry.get("optimizer", cfg.optimizer, field="train.optimizer")(model, cfg)
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"train: invalid optimizer settings: {e}") from e
