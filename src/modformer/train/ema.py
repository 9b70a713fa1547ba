"""Exponential moving average of the model weights (``train.ema_decay``), used for evaluation.

torch's ``AveragedModel`` with ``get_ema_multi_avg_fn``: after every optimizer step
``ema <- decay * ema + (1 - decay) * weights``; the first update, and every update up to step
``train.ema_start``, copies the weights. Buffers follow the trained model. With EMA on, evaluation,
samples and the checkpoint's ``model.safetensors`` use the averaged weights; the trained weights
are kept for resume in ``raw_model.safetensors``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from modformer.config import TrainConfig
from modformer.registry import ConfigError


def build_ema(model: nn.Module, t: TrainConfig, sharded: bool = False) -> AveragedModel | None:
    """An EMA copy of ``model`` (the bare model, before DDP/compile wrapping), or None when off."""
    if not 0.0 <= t.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay must be in [0, 1) (0 disables, typical 0.999), got {t.ema_decay}")
    if t.ema_start < 0:
        raise ConfigError(f"train.ema_start must be >= 0, got {t.ema_start}")
    if not t.ema_decay:
        return None
    if sharded:
        raise ConfigError("train.ema_decay > 0 is not supported with train.distributed=fsdp (sharded "
                          "parameters); use train.distributed=ddp or train.ema_decay=0")
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(t.ema_decay))
    ema.module.requires_grad_(False).eval()
    ema.param_names = [n for n, _ in model.named_parameters()]
    return ema


@torch.no_grad()
def update_ema(ema: AveragedModel, model: nn.Module, step: int, start: int = 0) -> None:
    """Fold ``model``'s weights after optimizer step ``step`` into ``ema`` (a copy while step <= start)."""
    if [n for n, _ in model.named_parameters()] != ema.param_names:
        raise ConfigError("train.ema_decay: the model's parameters changed during training (e.g. pruning "
                          "masks), so the EMA cannot follow them; set train.ema_decay=0")
    if step <= start:
        ema.n_averaged.zero_()
    ema.update_parameters(model)
