"""Addressing models and runs: one resolver for every form a model comes in.

A model is named by a run folder (its newest checkpoint that loads and is finite), ``RUN/checkpoints``,
``RUN/checkpoints/latest``, a checkpoint folder, a saved-model folder (``mf.save``, prune, distill, a merged
LoRA model), a LoRA adapter folder (``modformer lora``: its base with the adapter merged in) or an HF folder.
``resolve_model`` is what ``mf.load`` and every command use; commands that need the data (eval, generate,
circuits) find the run's ``config.yaml`` next to the model (run folder, the run around a checkpoint or a saved
model kept inside its run folder; an adapter's base run with its ``--task``), and an address that names no model
is one shared error line.
"""

from __future__ import annotations

import json
import sys
from argparse import Namespace
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from modformer.config import RunConfig, load_config
from modformer.data import Dataset, build_dataset
from modformer.registry import ConfigError
from modformer.saving import CONFIG_NAME, load_folder
from modformer.utils import CheckpointError


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _checkpoint_root(path: Path) -> Path | None:
    """``RUN/checkpoints`` when ``path`` names a run, its checkpoints folder or its ``latest`` pointer."""
    if path.name == "latest" and path.parent.name == "checkpoints" and not path.is_dir():
        return path.parent
    if path.name == "checkpoints" and path.is_dir():
        return path
    if (path / "config.yaml").is_file() and not (path / CONFIG_NAME).is_file():
        return path / "checkpoints"
    return None


def _is_hf(path: Path) -> bool:
    try:
        raw = json.loads((path / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return False
    return isinstance(raw, dict) and "model_type" in raw       # any HF family; hf names unsupported ones


def _adapter_meta(path: Path) -> dict | None:
    """``modformer.json`` of a LoRA adapter folder written by ``modformer lora`` (None for other folders)."""
    if not ((path / "adapter_config.json").is_file() and (path / "modformer.json").is_file()):
        return None
    try:
        meta = json.loads((path / "modformer.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ConfigError(f"{path / 'modformer.json'} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("base_run"), str):
        raise ConfigError(f"{path / 'modformer.json'} names no base_run: not an adapter written by modformer lora")
    return meta


def _adapter_base(path: Path, meta: dict) -> Path:
    """The base run of an adapter: as recorded, else the run folder around ``RUN/adapters/NAME`` (moved runs)."""
    recorded = Path(meta["base_run"])
    if (recorded / "config.yaml").is_file() or (recorded / CONFIG_NAME).is_file():
        return recorded
    around = path.resolve().parent.parent
    if path.resolve().parent.name == "adapters" and (around / "config.yaml").is_file():
        return around
    raise FileNotFoundError(f"{path}: the adapter's base run {recorded} does not exist")


def resolve_model(path: str | Path, device: str | torch.device = "cpu", finite: bool = False,
                  warn: Callable[[str], None] = _stderr) -> tuple[nn.Module, Path]:
    """(model, the folder it came from) for any form of model address (see the module docstring).

    Run forms pick the newest checkpoint that verifies (signature, shapes, finite weights), reporting each
    skipped one on ``warn``; a directly named folder is loaded as it is (``finite``: refuse NaN/inf weights).
    """
    path = Path(path)
    meta = _adapter_meta(path)
    if meta is not None:                           # a LoRA adapter: its base model with the adapter merged in
        from modformer.compress.lora import load_adapters, merged_model

        base, _ = resolve_model(_adapter_base(path, meta), device, finite, warn)
        return merged_model(load_adapters(base, {str(meta.get("adapter", "default")): path})).eval(), path
    root = _checkpoint_root(path)
    if root is not None:
        from modformer.train.checkpoint import newest_checkpoint

        found = newest_checkpoint(root, lambda p: (load_folder(p, "cpu", finite=True), p), warn)
        return found[0].to(device), found[1]
    if (path / CONFIG_NAME).is_file():
        if _is_hf(path):
            from modformer.models.hf import load_pretrained

            return load_pretrained(str(path)).to(device), path
        return load_folder(path, device, finite=finite), path
    from modformer.models.hf.data import is_hub_name

    if is_hub_name(path):                          # an HF hub id (offline and uncached: one error line)
        import importlib.util

        if importlib.util.find_spec("transformers") is None:      # most likely a mistyped relative path
            raise FileNotFoundError(f"{path} does not exist (as an HF hub name it would need transformers: "
                                    "pip install 'modformer[hf]')")
        from modformer.models.hf import load_pretrained

        return load_pretrained(str(path)).to(device), path
    raise not_a_model(path)


def not_a_model(path: Path) -> FileNotFoundError:
    """The one error for an address that names no model, whichever command (or mf.load) was given it."""
    if not path.exists():
        return FileNotFoundError(f"{path} does not exist")
    return FileNotFoundError(f"{path}: not a run folder, checkpoint, saved model, LoRA adapter or HF model folder")


def run_dir_of(path: str | Path) -> Path | None:
    """The run folder (holding config.yaml) a model address belongs to, or None."""
    path = Path(path)
    if path.name == "latest" and not path.is_dir():
        path = path.parent
    around = [path, path.parent] + ([path.parent.parent] if path.parent.name == "checkpoints" else [])
    return next((p for p in around if (p / "config.yaml").is_file()), None)


def run_config(run_dir: str | Path) -> RunConfig:
    """The RunConfig of the run a model address belongs to (see :func:`run_dir_of`); for a LoRA adapter, its base
    run's with the adapter's ``--task`` overrides."""
    for adapter in (Path(run_dir), Path(run_dir).parent):     # an adapter folder or its merged/ model
        meta = _adapter_meta(adapter)
        if meta is not None:
            from modformer.config import apply_overrides

            return apply_overrides(run_config(_adapter_base(adapter, meta)), list(meta.get("task") or []))
    found = run_dir_of(run_dir)
    if found is None and (_is_hf(Path(run_dir)) or not Path(run_dir).exists()):
        from modformer.models.hf.data import hf_run_config, is_hub_name

        if _is_hf(Path(run_dir)) or is_hub_name(run_dir):   # an HF model: its config, its tokenizer on WikiText-2
            return hf_run_config(run_dir)
    if found is None:
        if (Path(run_dir) / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{run_dir} is a saved model outside any run folder: this needs the run's "
                                    "config.yaml (data and tokenizer); give the run folder, or keep the saved "
                                    "model inside its run folder")
        raise not_a_model(Path(run_dir))
    return load_config(found / "config.yaml")


def run_model(run_dir: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The model a run/checkpoint/saved-model address names, refusing non-finite weights (eval, generate...)."""
    return resolve_model(run_dir, device, finite=True)[0]


def load_any(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """A model from a run folder (newest good checkpoint), a checkpoint, a saved model or an HF GPT-2 folder."""
    return resolve_model(path, device)[0]


def run_dataset(run_dir: str | Path) -> Dataset:
    return build_dataset(run_config(run_dir).data)


def interrupted_message(args: Namespace) -> str:
    """The Ctrl-C line: for ``train``, the newest checkpoint that verifies (what --resume will use), or that
    there is none; other commands promise nothing."""
    if getattr(args, "command", None) != "train":
        return "interrupted"
    from modformer.train.checkpoint import newest_checkpoint, read_checkpoint

    try:
        run_dir = load_config(args.config, args.overrides).run_dir
        path = newest_checkpoint(run_dir / "checkpoints", read_checkpoint, warn=lambda _: None).path
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError, OSError):
        return "interrupted; no verified checkpoint exists, so there is nothing to resume"
    return f"interrupted; newest verified checkpoint: {path} (continue with --resume)"
