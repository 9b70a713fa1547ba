"""Training checkpoints: model (safetensors + signed config.json) plus trainer state, written atomically.

Layout: ``RUN/checkpoints/step_0000500/{model.safetensors, config.json, trainer_state.safetensors,
trainer_state.json}`` and ``RUN/checkpoints/latest`` naming the newest committed one. The trainer state
holds no pickle: tensors (optimizer moments, RNG byte states, ...) are in ``trainer_state.safetensors``,
everything else in ``trainer_state.json`` (``state_codec``). With ``train.ema_decay`` on,
``model.safetensors`` holds the averaged weights (what eval/generate load) and ``raw_model.safetensors``
the trained ones (for resume).

A checkpoint folder is built under ``.tmp_step_N``, fsynced, renamed into place, and ``latest`` is
replaced only afterwards (fsyncing the folder), so a crash or a full disk at any moment leaves the previous
checkpoint intact and pointed to; a failed save removes its partial folder. Reading falls back: a
corrupt ``latest`` or newest checkpoint is skipped (one line on stderr) for the newest one that loads.
Old pickled ``trainer_state.pt`` files are never unpickled.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file, save_model
from torch import nn

from modformer.registry import ConfigError
from modformer.saving import build_model, load_folder, load_weights, save, unwrap
from modformer.train.state_codec import decode, encode
from modformer.utils import WRITE_ERRORS, CheckpointError, atomic_write, atomic_write_text, fsync_dir, write_failure

STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
LEGACY_STATE = "trainer_state.pt"          # pickled state of older versions: refused, never unpickled
RAW_WEIGHTS_NAME = "raw_model.safetensors"
STATE_FORMAT = 1
_STEP_DIR = re.compile(r"step_(\d+)")

__all__ = ["CheckpointError", "Checkpoint", "checkpoint_candidates", "latest_checkpoint", "load_trainer_state",
           "newest_checkpoint", "read_checkpoint", "rng_state", "save_checkpoint", "set_rng_state"]


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


def _check_rng(state: Any) -> None:
    """Shape of an RNG state, checked before anything is restored (so a bad one changes nothing)."""
    ok = (isinstance(state, dict) and isinstance(state.get("torch"), torch.Tensor)
          and state["torch"].dtype == torch.uint8 and isinstance(state.get("numpy"), tuple)
          and len(state["numpy"]) == 5 and isinstance(state["numpy"][1], np.ndarray)
          and isinstance(state.get("python"), tuple) and len(state["python"]) == 3
          and isinstance(state["python"][1], tuple))
    if not ok:
        raise CheckpointError("malformed RNG state")


# ---- writing ------------------------------------------------------------------------------------------
def write_trainer_state(folder: Path, state: dict[str, Any]) -> None:
    """``folder/trainer_state.safetensors`` (tensors) then ``folder/trainer_state.json`` (the rest, written last)."""
    tree, tensors = encode(state)
    atomic_write(folder / STATE_TENSORS, lambda tmp: save_file(tensors, tmp, metadata={"format": "modformer"}))
    atomic_write_text(folder / STATE_JSON, json.dumps({"format": STATE_FORMAT, "state": tree}))


def save_checkpoint(ckpt_root: Path, step: int, model: nn.Module, state: dict[str, Any],
                    keep: int = 2, raw_model: nn.Module | None = None) -> Path:
    """Write checkpoint ``step`` and point ``latest`` at it; prune to the newest ``keep``.

    ``model`` is the model saved for use (config.json + model.safetensors); ``raw_model``, when
    given (an EMA run: ``model`` is the average), is the trained model, saved for resume only.
    A failure (disk full, I/O error) removes the partial folder and raises one CheckpointError line.
    """
    final = ckpt_root / f"step_{step:07d}"
    tmp = ckpt_root / f".tmp_step_{step:07d}"
    try:
        for stale in [*ckpt_root.glob(".tmp_step_*"), *ckpt_root.glob(".latest.*.tmp")]:   # left by a killed save
            if stale.is_dir():                            # (one writer per run: the run lock)
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
        save(model, tmp)
        if raw_model is not None:
            atomic_write(tmp / RAW_WEIGHTS_NAME, lambda f: save_model(unwrap(raw_model), f))
        write_trainer_state(tmp, state)
        fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        fsync_dir(ckpt_root)
        try:
            atomic_write_text(ckpt_root / "latest", final.name + "\n", sync_dir=True)
        except BaseException:
            shutil.rmtree(final, ignore_errors=True)     # not committed: the previous checkpoint stays newest
            raise
    except WRITE_ERRORS as e:
        shutil.rmtree(tmp, ignore_errors=True)
        err = write_failure(e, tmp)
        where = final / err.path.relative_to(tmp) if err.path.is_relative_to(tmp) else err.path
        prev = latest_checkpoint(ckpt_root)
        kept = f"last good checkpoint kept: {prev}" if prev else "no earlier checkpoint exists"
        raise CheckpointError(f"{err.reason} while writing {where}; checkpoint of step {step} not saved, "
                              f"{kept}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    steps = sorted((p for p in ckpt_root.glob("step_*") if _step_of(p) is not None), key=_step_of)
    for old in steps[:-keep] if keep > 0 else []:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


# ---- finding ------------------------------------------------------------------------------------------
def _step_of(path: Path) -> int | None:
    m = _STEP_DIR.fullmatch(path.name)
    return int(m.group(1)) if m and path.is_dir() else None


def _pointer_target(ckpt_root: Path) -> Path | None:
    try:
        name = (ckpt_root / "latest").read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    path = ckpt_root / name
    return path if _STEP_DIR.fullmatch(name) and path.is_dir() else None


def checkpoint_candidates(ckpt_root: Path) -> list[Path]:
    """Checkpoint folders newest first: the one ``latest`` names, then the other ``step_*`` by step."""
    first = _pointer_target(ckpt_root)
    steps = sorted((p for p in ckpt_root.glob("step_*") if _step_of(p) is not None), key=_step_of, reverse=True)
    return ([first] if first else []) + [p for p in steps if p != first]


def _complete(path: Path) -> bool:
    """All files present (an old pickled-state folder counts: reading it says why it cannot resume)."""
    state = all((path / f).is_file() for f in (STATE_JSON, STATE_TENSORS)) or (path / LEGACY_STATE).is_file()
    return state and all((path / f).is_file() for f in ("config.json", "model.safetensors"))


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The newest checkpoint folder with all its files (``latest``'s, else the newest ``step_*``), or None.

    Cheap (no file is parsed); :func:`newest_checkpoint` also verifies the contents."""
    return next((p for p in checkpoint_candidates(Path(ckpt_root)) if _complete(p)), None)


# ---- reading ------------------------------------------------------------------------------------------
def load_trainer_state(path: Path) -> dict[str, Any]:
    """The trainer state of checkpoint folder ``path`` (JSON + safetensors; never unpickles)."""
    json_file, tensor_file = path / STATE_JSON, path / STATE_TENSORS
    if not json_file.is_file():
        if (path / LEGACY_STATE).is_file():
            raise CheckpointError(f"{path / LEGACY_STATE} is a pickled trainer state from an older modformer; it is "
                                  "not loaded, since unpickling a file can run code. Resume needs a checkpoint "
                                  "written by this version (the weights still load with eval/generate)")
        raise CheckpointError(f"{path} has no {STATE_JSON}: not a complete checkpoint")
    try:
        doc = json.loads(json_file.read_text(encoding="utf-8"))
        tensors = load_file(str(tensor_file))
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no {STATE_TENSORS}: not a complete checkpoint") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError, SafetensorError) as e:
        text = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(f"cannot read the trainer state in {path} ({text})") from None
    if not (isinstance(doc, dict) and doc.get("format") == STATE_FORMAT and isinstance(doc.get("state"), dict)):
        raise CheckpointError(f"{json_file} is not a modformer trainer state (format {STATE_FORMAT})")
    state = decode(doc["state"], tensors)
    if not isinstance(state.get("step"), int) or isinstance(state["step"], bool) or state["step"] < 0:
        raise CheckpointError(f"{json_file}: 'step' is missing or not a step number")
    if "rng" in state:
        try:
            _check_rng(state["rng"])
        except CheckpointError:
            raise CheckpointError(f"{json_file}: malformed RNG state") from None
    return state


@dataclass
class Checkpoint:
    """A checkpoint read and verified in full: signed config, weights that fit and are finite, trainer state."""

    path: Path
    model: nn.Module                 # the saved model (the EMA average in an EMA run)
    raw_model: nn.Module | None      # the trained weights of an EMA run
    state: dict[str, Any]


def read_checkpoint(path: Path) -> Checkpoint:
    """Load and verify everything in checkpoint folder ``path`` (on CPU); CheckpointError/ConfigError if not usable."""
    model = load_folder(path, "cpu", finite=True)
    raw = None
    if (path / RAW_WEIGHTS_NAME).is_file():
        from modformer.saving import check_finite

        raw = load_weights(build_model(model.cfg), path / RAW_WEIGHTS_NAME)
        check_finite(raw, path / RAW_WEIGHTS_NAME)
    return Checkpoint(path, model, raw, load_trainer_state(path))


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def newest_checkpoint(ckpt_root: Path, read: Callable[[Path], Any] = read_checkpoint,
                      warn: Callable[[str], None] = _stderr) -> Any:
    """``read(path)`` of the newest checkpoint that reads; each one skipped is reported by one ``warn`` line.

    FileNotFoundError when there is none; CheckpointError naming every reason when none reads."""
    ckpt_root = Path(ckpt_root)
    candidates = checkpoint_candidates(ckpt_root)
    if not candidates:
        raise FileNotFoundError(f"no checkpoint in {ckpt_root}")
    notes = []
    if (ckpt_root / "latest").exists() and _pointer_target(ckpt_root) is None:
        notes.append(f"latest ({ckpt_root / 'latest'} is unreadable or names no checkpoint folder)")
    for path in candidates:
        try:
            result = read(path)
        except (CheckpointError, ConfigError, FileNotFoundError) as e:
            notes.append(f"{path.name} ({e})")
            continue
        for note in notes:
            warn(f"warning: skipped {note}; using {path}")
        return result
    raise CheckpointError(f"no usable checkpoint in {ckpt_root}: {' | '.join(notes)}")


def optimizer_layout_matches(saved: Any, mine: dict[str, Any]) -> bool:
    """Whether a saved optimizer state has this optimizer's layout (same parameter groups and sizes), so
    ``load_state_dict`` will take it; nested optimizers (MuonAdamW: ``{"muon": ..., "adamw": ...}``) too."""
    if not isinstance(saved, dict):
        return False
    if "param_groups" not in mine:
        return set(saved) == set(mine) and all(
            isinstance(v, dict) and optimizer_layout_matches(saved[k], v) for k, v in mine.items())
    groups = saved.get("param_groups")
    if not (isinstance(saved.get("state"), dict) and isinstance(groups, list)
            and len(groups) == len(mine["param_groups"])):
        return False
    return all(isinstance(g, dict) and isinstance(g.get("params"), list) and len(g["params"]) == len(m["params"])
               for g, m in zip(groups, mine["param_groups"], strict=True))
