"""Model save/load: ``config.json`` + ``model.safetensors`` in a folder, each written atomically."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from modformer.config import ModelConfig, from_dict
from modformer.registry import ConfigError
from modformer.utils import atomic_write, atomic_write_text

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def build_model(cfg: ModelConfig) -> nn.Module:
    """Validate ``cfg`` and construct the registered model it names."""
    from modformer import registry

    cfg.validate()
    return registry.get("model", cfg.model, field="model.model")(cfg)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DDP/FSDP/torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def save(model: nn.Module, path: str | Path) -> Path:
    """Write ``path/config.json`` and ``path/model.safetensors`` (tied weights stored once)."""
    model = unwrap(model)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write(path / WEIGHTS_NAME, lambda tmp: save_model(model, tmp))
    atomic_write_text(path / CONFIG_NAME, json.dumps(asdict(model.cfg), indent=2))
    return path


def load_model_config(path: str | Path) -> ModelConfig:
    """Read the ModelConfig stored in a saved-model folder."""
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {path}: not a saved modformer model")
    try:
        return from_dict(ModelConfig, json.loads(file.read_text()))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file} is not valid JSON: {e}") from e


def load(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model from ``config.json`` and load its weights."""
    path = Path(path)
    model = build_model(load_model_config(path))
    if not (path / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {path}")
    load_model(model, str(path / WEIGHTS_NAME), device=str(device))
    return model.to(device)
