"""Reading finished (or interrupted) run folders: config, newest checkpoint, model, dataset."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from modformer.config import RunConfig, load_config
from modformer.data import Dataset, build_dataset
from modformer.saving import load


def run_config(run_dir: str | Path) -> RunConfig:
    from modformer.models.hf.data import hf_run_config, is_hf_address

    if not (Path(run_dir) / "config.yaml").is_file() and is_hf_address(run_dir):
        return hf_run_config(run_dir)              # an HF model: its config, its tokenizer on WikiText-2
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no config.yaml)")
    return load_config(path)


def run_model(run_dir: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The model of the newest checkpoint of a run (or an HF folder / hub name)."""
    from modformer.models.hf.data import is_hf_address
    from modformer.train.checkpoint import latest_checkpoint

    if not (Path(run_dir) / "config.yaml").is_file() and is_hf_address(run_dir):
        return load_any(run_dir, device)
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
    from modformer.models.hf.data import is_hub_name

    if not cfg_file.is_file() and is_hub_name(path):   # an HF hub id (offline and uncached: one error line)
        from modformer.models.hf import load_pretrained

        return load_pretrained(str(path)).to(device)
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path}: not a run folder, saved model or HF model folder")
    if "model_type" in json.loads(cfg_file.read_text()):   # any HF family; hf names unsupported ones
        from modformer.models.hf import load_pretrained

        return load_pretrained(str(path)).to(device)
    return load(path, device)


def run_dataset(run_dir: str | Path) -> Dataset:
    return build_dataset(run_config(run_dir).data)
