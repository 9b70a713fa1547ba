"""Learning-rate schedules (registry kind ``schedule``): linear warmup then constant/cosine/linear decay, or
``wsd`` (warmup-stable-decay: constant, then a linear cool-down over the last ``train.cooldown`` of the steps;
Hägele et al. 2024, the modded-nanogpt speedrun's schedule)."""

from __future__ import annotations

import math
from collections.abc import Callable

from modformer.config import TrainConfig
from modformer.registry import register


def _warmup(step: int, cfg: TrainConfig) -> float | None:
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return None


def _progress(step: int, cfg: TrainConfig) -> float:
    span = max(cfg.steps - cfg.warmup_steps, 1)
    return min(max(step - cfg.warmup_steps, 0) / span, 1.0)


@register("schedule", "constant")
def constant(step: int, cfg: TrainConfig) -> float:
    return _warmup(step, cfg) or cfg.lr


@register("schedule", "cosine")
def cosine(step: int, cfg: TrainConfig) -> float:
    w = _warmup(step, cfg)
    if w is not None:
        return w
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * _progress(step, cfg)))


@register("schedule", "linear")
def linear(step: int, cfg: TrainConfig) -> float:
    w = _warmup(step, cfg)
    if w is not None:
        return w
    return cfg.lr + (cfg.min_lr - cfg.lr) * _progress(step, cfg)


@register("schedule", "wsd")
def wsd(step: int, cfg: TrainConfig) -> float:
    w = _warmup(step, cfg)
    if w is not None:
        return w
    decay = cfg.cooldown * cfg.steps
    start = max(cfg.steps - decay, cfg.warmup_steps)
    if step < start or decay <= 0:
        return cfg.lr
    return cfg.lr + (cfg.min_lr - cfg.lr) * min((step - start) / max(cfg.steps - start, 1e-9), 1.0)


def lr_schedule(cfg: TrainConfig) -> Callable[[int], float]:
    """``step -> learning rate`` for the configured schedule (a pure function: resume is exact)."""
    from modformer import registry

    fn = registry.get("schedule", cfg.schedule, field="train.schedule")
    return lambda step: fn(step, cfg)
