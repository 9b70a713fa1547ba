"""Helpers of the composition pipelines: train a component model as an ordinary run, evaluate, write JSON."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modformer.utils import atomic_write_text


def train_run(run: dict[str, Any], name: str, out: Path, data_name: str, data_options: dict[str, Any],
              device: str, retrain: bool = False) -> nn.Module:
    """Train (or reuse, when finished and not ``retrain``) the run ``out/runs/name`` from a RunConfig mapping
    whose data section is replaced by ``data_name`` / ``data_options``; returns its model on ``device``."""
    from modformer.config import RunConfig, from_dict
    from modformer.runs import run_model
    from modformer.train.trainer import Trainer

    raw = copy.deepcopy(run)
    raw["name"], raw["out_dir"] = name, str(out / "runs")
    raw["data"] = {**raw.get("data", {}), "name": data_name, "options": data_options}
    raw.setdefault("train", {})["device"] = device
    cfg = from_dict(RunConfig, raw)
    if retrain or not _finished_same(cfg):
        Trainer(cfg, overwrite=True).fit()
    return run_model(cfg.run_dir, device).eval()


def _finished_same(cfg: Any) -> bool:
    """True when ``cfg``'s run folder holds a finished run of the same model, data and training settings."""
    from modformer.runs import run_config

    if not (cfg.run_dir / "summary.json").is_file():
        return False
    old = run_config(cfg.run_dir)
    old.model.vocab_size = cfg.model.vocab_size           # the trainer fills it in
    return (old.model, old.data, dataclasses.replace(old.train, device=cfg.train.device)) == (
        cfg.model, cfg.data, cfg.train)


def accuracy(model: nn.Module, data: Any, split: str = "val", batch_size: int = 1024) -> float:
    from modformer.compress.finetune import evaluate

    return evaluate(model, data, split, batch_size)["acc"]


def write_json(path: Path, obj: Any) -> Path:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str))
    return path


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if p.requires_grad)


def fingerprint(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every frozen parameter (to check bit-identity after training)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
