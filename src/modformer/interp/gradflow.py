"""Gradient flow (per-layer gradient norms, vanishing/exploding flags) and attention-pattern statistics.

Library functions plus two Trainer callbacks that work during training without touching the loop:

    mon = GradFlowMonitor(model, every=50)          # records grad norms as gradients accumulate
    stats = AttentionStatsMonitor(idx, every=50)    # entropy / distance of every head on a fixed batch
    Trainer(cfg, callbacks=[mon, stats]).fit()      # -> run_dir/gradflow.jsonl, attention_stats.jsonl

``GradFlowMonitor`` uses post-accumulate-grad hooks, so it sees the full (accumulated, pre-clipping)
gradient of a step even though the Trainer zeroes gradients before callbacks run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn


def layer_key(name: str) -> str:
    """Layer group of a parameter: ``blocks.3.attn.qkv.weight`` -> ``blocks.3``, ``tok_emb.weight`` -> ``tok_emb``."""
    parts = name.split(".")
    if parts[0] == "blocks" and len(parts) > 1:
        return ".".join(parts[:2])
    return parts[0]


def grad_norms(model: nn.Module) -> dict[str, float]:
    """L2 norm of the current ``.grad`` of each layer group (parameters without a grad are skipped)."""
    sq: dict[str, float] = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            sq[layer_key(name)] = sq.get(layer_key(name), 0.0) + float(p.grad.detach().float().pow(2).sum())
    return {k: math.sqrt(v) for k, v in sq.items()}


def flag_grad_flow(norms: dict[str, float], vanish: float = 1e-8, explode: float = 1e3,
                   rel_vanish: float = 1e-4) -> dict[str, str]:
    """Per layer: ``ok`` | ``vanishing`` (below ``vanish``, or ``rel_vanish`` x the largest norm) |
    ``exploding`` (above ``explode``) | ``nonfinite``."""
    finite = [v for v in norms.values() if math.isfinite(v)]
    top = max(finite, default=0.0)
    flags = {}
    for k, v in norms.items():
        if not math.isfinite(v):
            flags[k] = "nonfinite"
        elif v > explode:
            flags[k] = "exploding"
        elif v < vanish or v < rel_vanish * top:
            flags[k] = "vanishing"
        else:
            flags[k] = "ok"
    return flags


def grad_flow(model: nn.Module, **thresholds: float) -> dict[str, Any]:
    """``{"norms": {layer: norm}, "flags": {layer: flag}, "bad": [layers not ok]}`` from current grads."""
    norms = grad_norms(model)
    flags = flag_grad_flow(norms, **thresholds)
    return {"norms": norms, "flags": flags, "bad": [k for k, f in flags.items() if f != "ok"]}


class GradFlowMonitor:
    """Trainer callback: every ``every`` steps append ``{"step", "norms", "flags", "bad"}`` to gradflow.jsonl."""

    def __init__(self, model: nn.Module, every: int = 50, path: str | Path | None = None, **thresholds: float):
        self.every, self.path, self.thresholds = every, path, thresholds
        self.history: list[dict[str, Any]] = []
        self._latest: dict[str, tuple[str, float]] = {}     # param name -> (layer, squared grad norm)
        self.handles = [p.register_post_accumulate_grad_hook(self._hook(layer_key(name), name))
                        for name, p in model.named_parameters() if p.requires_grad]

    def _hook(self, key: str, name: str):  # noqa: ANN202
        def fn(p: Tensor) -> None:
            self._latest[name] = (key, float(p.grad.detach().float().pow(2).sum()))  # last micro-step wins
        return fn

    def norms(self) -> dict[str, float]:
        sq: dict[str, float] = {}
        for key, v in self._latest.values():
            sq[key] = sq.get(key, 0.0) + v
        return {k: math.sqrt(v) for k, v in sq.items()}

    def __call__(self, trainer: Any, step: int) -> None:
        if step % self.every:
            self._latest.clear()
            return
        norms = self.norms()
        flags = flag_grad_flow(norms, **self.thresholds)
        row = {"step": step, "norms": norms, "flags": flags, "bad": [k for k, f in flags.items() if f != "ok"]}
        self.history.append(row)
        path = self.path or Path(trainer.run_dir) / "gradflow.jsonl"
        if getattr(getattr(trainer, "world", None), "is_main", True):
            with open(path, "a") as f:
                f.write(json.dumps(row) + "\n")
        self._latest.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


# ---- attention-pattern statistics ----------------------------------------------------------------

def attention_entropy(patterns: Tensor) -> Tensor:
    """Mean entropy (nats) of the attention rows: ``(..., B, H, Tq, Tk)`` -> ``(..., H)``."""
    p = patterns.float()
    ent = -(p * p.clamp_min(1e-30).log()).sum(-1)                 # (..., B, H, Tq)
    return ent.mean(-1).mean(-2)


def attention_distance(patterns: Tensor, q_offset: int = 0) -> Tensor:
    """Mean attended distance sum_j p_ij |i - j|: ``(..., B, H, Tq, Tk)`` -> ``(..., H)``."""
    Tq, Tk = patterns.shape[-2:]
    i = torch.arange(q_offset, q_offset + Tq, device=patterns.device)[:, None]
    j = torch.arange(Tk, device=patterns.device)[None, :]
    d = (patterns.float() * (i - j).abs()).sum(-1)
    return d.mean(-1).mean(-2)


@torch.no_grad()
def attention_stats(model: nn.Module, idx: Tensor) -> dict[str, Tensor]:
    """``{"entropy": (L, H), "distance": (L, H)}`` of every head on ``idx`` (eval mode, then restored)."""
    was_training = model.training
    model.eval()
    _, cache = model.run_with_cache(idx, names_filter=lambda n: n.endswith("attn.hook_pattern"))
    model.train(was_training)
    pats = torch.stack([cache[f"blocks.{i}.attn.hook_pattern"] for i in range(len(model.blocks))])
    return {"entropy": attention_entropy(pats), "distance": attention_distance(pats)}


class AttentionStatsMonitor:
    """Trainer callback: every ``every`` steps append per-head entropy/distance on ``idx`` to attention_stats.jsonl."""

    def __init__(self, idx: Tensor, every: int = 50, path: str | Path | None = None) -> None:
        self.idx, self.every, self.path = idx, every, path
        self.history: list[dict[str, Any]] = []

    def __call__(self, trainer: Any, step: int) -> None:
        if step % self.every:
            return
        stats = attention_stats(trainer.raw_model, self.idx.to(trainer.device))
        row = {"step": step, **{k: v.tolist() for k, v in stats.items()}}
        self.history.append(row)
        path = self.path or Path(trainer.run_dir) / "attention_stats.jsonl"
        if getattr(getattr(trainer, "world", None), "is_main", True):
            with open(path, "a") as f:
                f.write(json.dumps(row) + "\n")
