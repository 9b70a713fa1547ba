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


def load_any(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """A model from a run folder (newest checkpoint), a saved model folder or an HF GPT-2 folder."""
    import json

    path = Path(path)
    if (path / "config.yaml").is_file():
        return run_model(path, device)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path}: not a run folder, saved model or HF model folder")
    if json.loads(cfg_file.read_text()).get("model_type") == "gpt2":
        from modformer.models.hf import load_pretrained

        return load_pretrained(str(path)).to(device)
    return load(path, device)


def run_dataset(run_dir: str | Path) -> Dataset:
    return build_dataset(run_config(run_dir).data)
