"""Model save/load: ``config.json`` + ``model.safetensors`` in a folder, each written atomically.

``config.json`` carries a signature (``_signature``): a SHA-256 of the model config and the weights'
names, shapes and dtypes. ``load`` refuses a config.json edited after saving (even an edit that keeps the
shapes, such as gelu -> relu or dropout), so a folder always rebuilds the model that was saved. Folders
written before signatures existed still load. Every load failure (missing, truncated or foreign files,
shapes that do not fit) is one ConfigError / CheckpointError line, never a library traceback.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from modformer.config import ModelConfig, from_dict
from modformer.registry import ConfigError
from modformer.utils import CheckpointError, atomic_write, atomic_write_text

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
SIGNATURE_KEY = "_signature"

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "CheckpointError", "build_model", "load", "load_folder",
           "load_model_config", "nonfinite_tensors", "save", "unwrap"]


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


def weights_header(file: Path) -> dict[str, tuple[str, list[int]]]:
    """``{name: (dtype, shape)}`` of a safetensors file, read from its header; a bad file is CheckpointError."""
    if not file.is_file():
        raise FileNotFoundError(f"no {file.name} in {file.parent}")
    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: (f.get_slice(k).get_dtype(), list(f.get_slice(k).get_shape())) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file} is truncated or not a safetensors file ({_first_line(e)})") from None


def signature(config: dict[str, Any], header: dict[str, tuple[str, list[int]]]) -> str:
    """SHA-256 over the model config (as stored in JSON) and the weights' names, dtypes and shapes."""
    payload = json.dumps({"config": config, "tensors": sorted([k, *v] for k, v in header.items())},
                         sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(payload.encode()).hexdigest()


def save(model: nn.Module, path: str | Path) -> Path:
    """Write ``path/model.safetensors`` (tied weights stored once), then the signed ``path/config.json``."""
    model = unwrap(model)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write(path / WEIGHTS_NAME, lambda tmp: save_model(model, tmp))
    config = json.loads(json.dumps(asdict(model.cfg)))          # exactly what a reader will parse
    config[SIGNATURE_KEY] = signature(config, weights_header(path / WEIGHTS_NAME))
    atomic_write_text(path / CONFIG_NAME, json.dumps(config, indent=2))
    return path


def _read_config(path: Path) -> tuple[ModelConfig, dict[str, Any], str | None]:
    file = path / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {path}: not a saved modformer model")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ConfigError(f"{file} is not valid JSON: {_first_line(e)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{file} holds a JSON {type(raw).__name__}, not a model config object")
    sig = raw.pop(SIGNATURE_KEY, None)
    try:
        cfg = from_dict(ModelConfig, raw)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{file}: {_first_line(e)}") from None
    return cfg, raw, sig


def load_model_config(path: str | Path) -> ModelConfig:
    """Read the ModelConfig stored in a saved-model folder (not checked against the weights)."""
    return _read_config(Path(path))[0]


def load_weights(model: nn.Module, file: Path, device: str | torch.device = "cpu") -> nn.Module:
    """Load a safetensors file into ``model`` (strict); a file that does not fit is one CheckpointError line."""
    weights_header(file)
    try:
        load_model(model, str(file), device=str(device))
    except (RuntimeError, SafetensorError, KeyError, ValueError) as e:
        raise CheckpointError(f"{file} does not fit the model of its config.json ({_first_line(e)})") from None
    return model


def nonfinite_names(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding NaN or inf (one min/max pass each: NaN propagates)."""
    names = [k for k, v in tensors.items() if v.is_floating_point() and v.numel()]
    if not names:
        return []
    peaks = torch.stack([torch.stack(torch.aminmax(tensors[k].detach())).float() for k in names])
    return [k for k, ok in zip(names, torch.isfinite(peaks).all(1).tolist(), strict=True) if not ok]


def nonfinite_tensors(model: nn.Module) -> list[str]:
    """Names of the model's floating-point parameters/buffers holding NaN or inf."""
    return nonfinite_names(model.state_dict())


def check_finite(model: nn.Module, where: str | Path) -> None:
    """CheckpointError when the weights hold NaN/inf: a diverged model, nothing useful to evaluate."""
    bad = nonfinite_tensors(model)
    if bad:
        raise CheckpointError(f"{where} holds non-finite weights (NaN/inf in {len(bad)} of "
                              f"{len(model.state_dict())} tensors, first {bad[0]}): the run had diverged "
                              "when it was saved; use an earlier checkpoint")


def load_folder(path: str | Path, device: str | torch.device = "cpu", finite: bool = False) -> nn.Module:
    """Rebuild the model of one saved-model folder, checking its signature (and, with ``finite``, its values)."""
    path = Path(path)
    cfg, raw, sig = _read_config(path)
    header = weights_header(path / WEIGHTS_NAME)
    if sig is not None and sig != signature(raw, header):
        raise ConfigError(f"{path / CONFIG_NAME} does not match its signature: it was edited after saving (or the "
                          "weights were replaced); refusing to load it. Restore the saved file or re-save the model")
    model = load_weights(build_model(cfg), path / WEIGHTS_NAME, device)
    if finite:
        check_finite(model, path)
    return model.to(device)


def load(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """A model from a saved-model folder, a checkpoint, ``checkpoints/latest`` or a run folder.

    A run folder (or its ``latest``) gives its newest checkpoint that loads and is finite; a corrupt one is
    skipped with one line on stderr. HF GPT-2 folders: ``modformer.runs.load_any``."""
    from modformer.runs import resolve_model

    return resolve_model(path, device)[0]


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines() or [type(e).__name__])[0][:300]
