"""A short training loop for compressed models (fine-tune after pruning, IMP rounds, LoRA) and accuracy.

The Trainer builds its model from a config; these helpers train a model object as it is (with
pruning masks or LoRA adapters attached), using the run's optimizer settings.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modformer.config import TrainConfig
from modformer.data import Dataset
from modformer.train.optim import build_optimizer


def finetune(model: nn.Module, data: Dataset, train_cfg: TrainConfig, steps: int, lr: float | None = None,
             batch_size: int | None = None, seed: int = 0, progress: str | None = None) -> list[float]:
    """``steps`` AdamW (the run's optimizer) steps at constant ``lr`` on the train split; returns losses.

    Only parameters with ``requires_grad`` are trained (frozen bases stay frozen). ``progress``: a label
    (``"lora"``) shows the train loss as a bar on a terminal, plain lines elsewhere; None (studies) is silent.
    """
    from modformer.train.logging import ProgressDisplay

    cfg = dataclasses.replace(train_cfg, lr=lr if lr is not None else train_cfg.lr)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable or steps <= 0:
        return []
    opt = build_optimizer(model, cfg)
    g = torch.Generator().manual_seed(seed)
    device = trainable[0].device
    losses = []
    display = ProgressDisplay(steps, 0, progress is not None, label=progress or "")
    model.train()
    for step in range(1, steps + 1):
        x, y = data.get_batch("train", batch_size if batch_size is not None else cfg.batch_size, g)
        x, y = x.to(device), y.to(device)
        logits = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-100,
                               label_smoothing=cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        opt.step()
        losses.append(float(loss.detach()))
        display.advance(step)
        if step % 10 == 0 or step == steps:
            window = losses[-10:]
            display.update(step, f"loss {sum(window) / len(window):.4f}")
    display.close()
    model.eval()
    return losses


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, split: str = "val", batch_size: int = 4096,
             max_batches: int = 0) -> dict[str, float]:
    """Mean NLL and accuracy over the target tokens of ``split``."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    loss_sum, n, correct = 0.0, 0, 0
    for x, y in data.iter_eval(split, batch_size, max_batches):
        x, y = x.to(device), y.to(device)
        logits = model(x)
        loss_sum += float(F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-100,
                                          reduction="sum"))
        mask = y != -100
        n += int(mask.sum())
        correct += int(((logits.argmax(-1) == y) & mask).sum())
    model.train(was)
    return {"loss": loss_sum / max(n, 1), "acc": correct / max(n, 1)}


def batches(data: Dataset, split: str = "train", batch_size: int = 512,
            max_batches: int = 8) -> list[tuple[Tensor, Tensor]]:
    """A fixed list of evaluation batches (importance scoring)."""
    return list(data.iter_eval(split, batch_size, max_batches))
