"""Where a fine-tune changed the heads: per-head QK / OV deltas between two models of the same shape.

For a LoRA adapter (``compress/lora.py``) the question is which heads' circuits the low-rank update moves and by
how much. ``head_deltas(base, tuned)`` compares the bilinear forms head by head (row convention, ``weights.py``):

    dQK = W_Q' W_K'^T - W_Q W_K^T,    dOV = W_V' W_O' - W_V W_O      (D x D, rank <= 2 Dh)

kept factored (``[W_Q', -W_Q] @ [W_K'; W_K]^T``), so norms cost Dh x Dh products. Returned per head ``(L, H)``:
``qk`` / ``ov`` = ||dM||_F / ||M||_F (relative to the base) and ``qk_abs`` / ``ov_abs`` = ||dM||_F. Weights are
compared unfolded (the norms' own weights are not part of a head; a tuned norm shows in every head's input).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from modformer.interp.circuits import FactoredMatrix
from modformer.interp.weights import ModelWeights, extract_weights
from modformer.utils import atomic_write_text


def _delta_norm(A1: Tensor, B1: Tensor, A0: Tensor, B0: Tensor) -> Tensor:
    """||A1 B1 - A0 B0||_F over batch dims, via the factored difference."""
    return FactoredMatrix(torch.cat([A1, -A0], -1), torch.cat([B1, B0], -2)).norm()


def weight_deltas(w0: ModelWeights, w1: ModelWeights) -> dict[str, Tensor]:
    """Per-head relative and absolute QK / OV changes from ``w0`` to ``w1`` (same shapes)."""
    if w0.W_Q.shape != w1.W_Q.shape:
        raise ValueError(f"models differ in head shapes: {tuple(w0.W_Q.shape)} vs {tuple(w1.W_Q.shape)}")
    d = {
        "qk_abs": _delta_norm(w1.W_Q.double(), w1.W_K.transpose(-1, -2).double(),
                              w0.W_Q.double(), w0.W_K.transpose(-1, -2).double()),
        "ov_abs": _delta_norm(w1.W_V.double(), w1.W_O.double(), w0.W_V.double(), w0.W_O.double()),
    }
    qk0 = FactoredMatrix(w0.W_Q.double(), w0.W_K.transpose(-1, -2).double()).norm()
    ov0 = FactoredMatrix(w0.W_V.double(), w0.W_O.double()).norm()
    d["qk"] = d["qk_abs"] / qk0.clamp_min(1e-30)
    d["ov"] = d["ov_abs"] / ov0.clamp_min(1e-30)
    absent = ~w0.present()
    return {k: v.float().cpu().masked_fill(absent, float("nan")) for k, v in d.items()}


def head_deltas(base: nn.Module, tuned: nn.Module) -> dict[str, Tensor]:
    """``weight_deltas`` of two models (e.g. a base and the same base with a LoRA adapter merged)."""
    return weight_deltas(extract_weights(base, fold_ln=False), extract_weights(tuned, fold_ln=False))


def adapter_head_deltas(peft_model: Any) -> dict[str, Tensor]:
    """Per-head deltas of a PEFT model's active adapter, without touching it (a merged copy is compared)."""
    base = peft_model.get_base_model()           # LoRA layers expose the frozen base weight as .weight
    merged = copy.deepcopy(peft_model).merge_and_unload()
    return head_deltas(base, merged)


def merge_adapter_for_analysis(model: nn.Module, adapter_dir: str | Path,
                               out_dir: str | Path) -> tuple[nn.Module, Path]:
    """Load a saved LoRA adapter (``modformer lora`` output) onto ``model``, write its per-head deltas to
    ``out_dir/adapter_deltas.json`` and return the merged model (for ``analyze``) and that file."""
    from modformer.compress.lora import load_adapters, merged_model

    folder = Path(adapter_dir)
    if not (folder / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{folder} is not an adapter folder (no adapter_config.json)")
    pm = load_adapters(model, {"adapter": folder})
    d = adapter_head_deltas(pm)
    merged = merged_model(pm).eval()
    rows = [{"layer": i, "head": h, "name": f"L{i}H{h}", **{k: round(float(v[i, h]), 6) for k, v in d.items()}}
            for i in range(d["qk"].shape[0]) for h in range(d["qk"].shape[1]) if not bool(d["qk"][i, h].isnan())]
    path = Path(out_dir) / "adapter_deltas.json"
    atomic_write_text(path, json.dumps({"adapter": str(folder), "heads": rows,
                                        "definition": "qk/ov: ||delta||_F / ||base||_F per head; *_abs: ||delta||_F"},
                                       indent=1))
    return merged, path
