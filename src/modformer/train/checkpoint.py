"""Training checkpoints: model (safetensors + config.json) plus trainer state, written atomically.

Layout: ``RUN/checkpoints/step_0000500/{model.safetensors, config.json, trainer_state.pt}`` and
``RUN/checkpoints/latest`` naming the newest complete one. With ``train.ema_decay`` on,
``model.safetensors`` holds the averaged weights (what eval/generate load) and
``raw_model.safetensors`` the trained ones (for resume). A checkpoint folder is built under
a temporary name and renamed into place, and ``latest`` is replaced only afterwards, so a crash
or a full disk at any moment leaves the previous checkpoint intact and pointed to.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_model

from modformer.saving import save, unwrap
from modformer.utils import atomic_write, atomic_write_text

STATE_NAME = "trainer_state.pt"
RAW_WEIGHTS_NAME = "raw_model.safetensors"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message says which and why."""


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(ckpt_root: Path, step: int, model: torch.nn.Module, state: dict[str, Any],
                    keep: int = 2, raw_model: torch.nn.Module | None = None) -> Path:
    """Write checkpoint ``step`` and point ``latest`` at it; prune to the newest ``keep``.

    ``model`` is the model saved for use (config.json + model.safetensors); ``raw_model``, when
    given (an EMA run: ``model`` is the average), is the trained model, saved for resume only.
    """
    final = ckpt_root / f"step_{step:07d}"
    tmp = ckpt_root / f".tmp_step_{step:07d}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        save(model, tmp)
        if raw_model is not None:
            atomic_write(tmp / RAW_WEIGHTS_NAME, lambda f: save_model(unwrap(raw_model), f))
        torch.save(state, tmp / STATE_NAME)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        atomic_write_text(ckpt_root / "latest", final.name + "\n")
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        prev = latest_checkpoint(ckpt_root)
        kept = f"previous checkpoint kept: {prev}" if prev else "no earlier checkpoint exists"
        raise CheckpointError(f"could not save checkpoint at step {step} ({e.strerror or e}); {kept}") from e
    for old in sorted(ckpt_root.glob("step_*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The newest complete checkpoint folder, or None."""
    pointer = ckpt_root / "latest"
    if not pointer.is_file():
        return None
    path = ckpt_root / pointer.read_text().strip()
    return path if (path / STATE_NAME).is_file() else None


def load_trainer_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path / STATE_NAME, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError) as e:
        raise CheckpointError(f"cannot read {path / STATE_NAME}: {e}") from e
