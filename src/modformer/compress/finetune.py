"""Fine-tuning a model object as it is (after pruning, IMP rounds, LoRA) through the Trainer, and accuracy.

The Trainer usually builds its model from a config; here it trains a given model (with pruning masks or LoRA
adapters attached: only parameters with ``requires_grad`` train) with the run's optimizer settings at a
constant learning rate. ``finetune_run`` (``prune --finetune-steps``, ``lora``) leaves a normal run folder:
config.yaml, metrics.jsonl, a safetensors checkpoint, plots and report.md. ``finetune`` (studies) is the same
loop, silent, in a temporary folder, returning the per-step training losses.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modformer.config import RunConfig, TrainConfig
from modformer.data import Dataset


def finetune_train_config(train_cfg: TrainConfig, steps: int, lr: float | None = None,
                          batch_size: int | None = None, device: str | None = None) -> TrainConfig:
    """The run's train settings for ``steps`` of fine-tuning: constant ``lr`` (default the run's), no warmup,
    EMA, early stop, compile, fp8, gradual pruning (``train.prune``) or initial weights; one checkpoint at the end."""
    return dataclasses.replace(
        train_cfg, steps=steps, lr=lr if lr is not None else train_cfg.lr, min_lr=0.0, schedule="constant",
        warmup_steps=0, ema_decay=0.0, ema_start=0, early_stop_metric=None, early_stop_target=None,
        checkpoint_every=0, compile=False, init_from=None, profile_steps=None, profile_memory=False, prune={},
        precision="auto",                       # (fp8 swaps layers of a model built from the config)
        batch_size=batch_size if batch_size is not None else train_cfg.batch_size,
        eval_every=min(train_cfg.eval_every, steps), log_every=min(train_cfg.log_every, steps),
        device=device or train_cfg.device)


def _device_of(model: nn.Module) -> str:
    return str(next(iter(model.parameters())).device)


def finetune_run(model: nn.Module, data: Dataset, run_cfg: RunConfig, steps: int, run_dir: str | Path,
                 lr: float | None = None, saved: Callable[[nn.Module], nn.Module] | None = None) -> dict[str, Any]:
    """Train ``model`` in place for ``steps`` through the Trainer into the run folder ``run_dir`` (replaced if it
    exists): banner, progress, metrics.jsonl, a checkpoint of ``saved(model)`` (default the model), plots,
    report.md. Returns the run's summary."""
    from modformer.train.trainer import Trainer

    run_dir = Path(run_dir)
    cfg = dataclasses.replace(run_cfg, name=run_dir.name, out_dir=str(run_dir.parent),
                              model=dataclasses.replace(run_cfg.model),
                              train=finetune_train_config(run_cfg.train, steps, lr, device=_device_of(model)))
    summary = Trainer(cfg, overwrite=True, model=model, data=data, saved=saved).fit()
    model.eval()
    return summary


def finetune(model: nn.Module, data: Dataset, train_cfg: TrainConfig, steps: int, lr: float | None = None,
             batch_size: int | None = None, seed: int = 0) -> list[float]:
    """``steps`` steps of the run's optimizer at constant ``lr`` on the train split, silently; returns the
    per-step training losses (mean NLL of each batch).

    The Trainer's loop in fp32 on the model's device, in a temporary run folder with nothing recorded but the
    metrics; batches are drawn from ``torch.Generator().manual_seed(seed)``, dropout from the caller's global RNG
    (the Trainer's seeding is undone), and the caller's threads and TF32 settings are restored afterwards."""
    from modformer.train.logging import read_metrics
    from modformer.train.trainer import Trainer

    if steps <= 0 or not any(p.requires_grad for p in model.parameters()):
        return []
    t = dataclasses.replace(finetune_train_config(train_cfg, steps, lr, batch_size, _device_of(model)),
                            eval_every=steps + 1, log_every=1, dtype="float32", precision="auto",
                            deterministic=False, threads=None, progress=False, tensorboard=False, seed=seed,
                            distributed="ddp")
    rng, tf32 = torch.get_rng_state(), (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="modformer_finetune_") as tmp:
        cfg = RunConfig(name="finetune", out_dir=tmp, train=t)
        try:
            trainer = Trainer(cfg, model=model, data=data, record=False)
            trainer.data_gen = torch.Generator().manual_seed(seed)
            torch.set_rng_state(rng)              # dropout draws from the caller's stream, as it would here
            trainer.fit()
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
            torch.set_num_threads(threads)
        losses = [r["loss"] for r in read_metrics(Path(tmp) / "finetune" / "metrics.jsonl") if r["split"] == "train"]
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
