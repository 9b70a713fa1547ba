"""Reading finished (or interrupted) run folders: config, newest checkpoint, model, dataset."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from modformer.config import RunConfig, load_config
from modformer.data import Dataset, build_dataset
from modformer.saving import load


def run_config(run_dir: str | Path) -> RunConfig:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no config.yaml)")
    return load_config(path)


def run_model(run_dir: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The model of the newest checkpoint of a run."""
    from modformer.train.checkpoint import latest_checkpoint

    path = latest_checkpoint(Path(run_dir) / "checkpoints")
    if path is None:
        raise FileNotFoundError(f"no checkpoint in {Path(run_dir) / 'checkpoints'}")
    return load(path, device)


def run_dataset(run_dir: str | Path) -> Dataset:
    return build_dataset(run_config(run_dir).data)
