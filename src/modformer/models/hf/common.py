"""Shared machinery of the HF families: weight pairs copied in either direction with a coverage check,
errors that name the blocking option, and hub access that fails in one line when offline."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import Tensor, nn


def unsupported(what: str, detail: str) -> ValueError:
    """The one-line error for an option the other side cannot compute identically."""
    return ValueError(f"{what}: {detail}")


def _same(x: Tensor) -> Tensor:
    return x


@dataclass
class Pair:
    """One weight in both models: ``to_ours`` maps HF's tensor to our layout, ``to_theirs`` back.

    ``ours`` may be a view into a larger parameter (e.g. the q rows of our fused QKV), so several pairs can
    fill one of our parameters; copies go through ``copy_`` into the view.
    """

    name: str
    ours: Tensor
    theirs: Tensor
    to_ours: Callable[[Tensor], Tensor] = _same
    to_theirs: Callable[[Tensor], Tensor] = _same


def _transpose(x: Tensor) -> Tensor:
    return x.t()


def conv1d_pair(name: str, ours: Tensor, theirs: Tensor) -> Pair:
    """A GPT-2 ``Conv1D`` weight (stored ``(in, out)``) against our ``nn.Linear`` ``(out, in)``."""
    return Pair(name, ours, theirs, _transpose, _transpose)


def linear_pairs(name: str, ours: nn.Module, theirs: nn.Module) -> list[Pair]:
    """Weight (and bias, when both have one) of two modules with the same parameter layout."""
    pairs = [Pair(f"{name}.weight", ours.weight, theirs.weight)]
    ours_bias, theirs_bias = getattr(ours, "bias", None), getattr(theirs, "bias", None)
    if (ours_bias is None) != (theirs_bias is None):
        side = "modformer" if ours_bias is not None else "HF"
        raise ValueError(f"{name}: only the {side} side has a bias")
    if ours_bias is not None:
        pairs.append(Pair(f"{name}.bias", ours_bias, theirs_bias))
    return pairs


def _numel_covered(tensors: list[Tensor]) -> int:
    seen: set[tuple[int, int]] = set()
    return sum(t.numel() for t in tensors if (k := (t.data_ptr(), t.numel())) not in seen and not seen.add(k))


def check_coverage(pairs: list[Pair], ours: nn.Module, theirs: nn.Module, family: str) -> None:
    """Every parameter of both models is covered by the pairs (an unmapped one would keep its random init)."""
    for side, module, tensors in (("modformer", ours, [p.ours for p in pairs]),
                                  ("HF", theirs, [p.theirs for p in pairs])):
        total = sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())
        covered = _numel_covered(tensors)
        if covered != total:
            raise ValueError(f"{side} model has {total - covered} parameter values with no {family} counterpart")


@torch.no_grad()
def copy_pairs(pairs: list[Pair], to_ours: bool) -> None:
    """Copy every pair HF -> ours (``to_ours``) or ours -> HF; shape mismatches name the weight."""
    for p in pairs:
        src = p.to_ours(p.theirs) if to_ours else p.to_theirs(p.ours)
        dst = p.ours if to_ours else p.theirs
        if tuple(src.shape) != tuple(dst.shape):
            raise ValueError(f"shape mismatch for {p.name}: modformer {tuple(p.ours.shape)}, "
                             f"HF {tuple(p.theirs.shape)}")
        dst.copy_(src)


def check_tied(hf: nn.Module, tied: bool) -> None:
    if tied and hf.get_output_embeddings().weight.data_ptr() != hf.get_input_embeddings().weight.data_ptr():
        raise ValueError("HF lm_head is not tied to the input embeddings although tie_word_embeddings=True")


def new_hf_model(config_cls: type, model_cls: type, kwargs: dict[str, Any]) -> nn.Module:
    """Build an HF model with the SDPA attention implementation, falling back to eager."""
    for impl in ("sdpa", "eager"):
        try:
            return model_cls(config_cls(**kwargs, attn_implementation=impl))
        except (TypeError, ValueError, ImportError):
            continue
    return model_cls(config_cls(**kwargs))


# ---- hub access ---------------------------------------------------------------------------------------
def offline_flag() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE as huggingface_hub reads them (read now, not at import)."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in ("1", "ON", "YES", "TRUE")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub endpoint answers a TCP connection within ``timeout`` seconds."""
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:      # not a valid repo id
        return False


def resolve(name_or_path: str | Path) -> tuple[str, dict[str, Any]]:
    """(path or repo id, extra ``from_pretrained`` kwargs) for a local folder or a hub name.

    A hub name that cannot be fetched (offline flag or no network) and is not cached raises one
    FileNotFoundError line at once instead of HF's retries; a cached one loads with ``local_files_only``.
    """
    path = Path(name_or_path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: not an HF model folder (no config.json)")
        return str(path), {}
    name = str(name_or_path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"{name}: no such folder")
    if not offline_flag() and hub_reachable():
        return name, {}
    if _cached(name):
        return name, {"local_files_only": True}
    why = "HF_HUB_OFFLINE is set" if offline_flag() else "the hub is unreachable (no network)"
    raise FileNotFoundError(f"{name}: not a local folder, not in the HF cache, and {why}")
