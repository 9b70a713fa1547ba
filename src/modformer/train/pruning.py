"""``train.prune``: gradual magnitude pruning inside the training loop, set from the config or the CLI.

    train:
      prune: {final: 0.9, start: 100, end: 400, every: 10}     # or: train.prune.final=0.9 on the command line

Zhu & Gupta (2017): every ``every`` steps from ``start`` to ``end`` the sparsity target follows the cubic
schedule ``compress.unstructured.polynomial_sparsity`` and the smallest-magnitude prunable weights (Linear and
Embedding matrices, as ``modformer prune``; over all of them together with ``scope: global``, per matrix
with ``layer``) are set to zero. The mask is the weights' zeros themselves: pruned entries get no gradient
and are zeroed again after every optimizer step, so checkpoints are ordinary dense models, the run folder is
a normal one, and a resumed run rebuilds the mask from the checkpoint's zeros (a trained weight that is exactly
0.0 by chance would be taken as pruned; with float weights that has probability ~0). The Python callback
``compress.GradualPruning`` does the same with ``torch.nn.utils.prune`` masks, for use outside a run config.

Not supported together: ``train.ema_decay`` (an average of the weights is not sparse) and FSDP (sharded
weights); both are refused with a ConfigError.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from modformer.compress.unstructured import polynomial_sparsity, prunable
from modformer.registry import ConfigError, suggest
from modformer.validation import check_value

# key -> (default, rule for validation.check_value); final has no default
KEYS: dict[str, tuple[Any, Any]] = {
    "final": (None, "[0, 1)"), "start": (0, ">= 0"), "end": (None, ">= 0"), "every": (10, ">= 1"),
    "scope": ("global", ("global", "layer")), "initial": (0.0, "[0, 1)"), "embeddings": (True, None),
}


@dataclass(frozen=True)
class PruneSpec:
    """A checked ``train.prune`` mapping (``end`` filled in: the run's last step when not given)."""

    final: float
    start: int
    end: int
    every: int
    scope: str
    initial: float
    embeddings: bool

    def due(self, step: int) -> bool:
        """Is the mask updated after optimizer step ``step``?"""
        return self.start <= step <= self.end and ((step - self.start) % self.every == 0 or step == self.end)

    def target(self, step: int) -> float:
        """Sparsity the schedule asks for after step ``step``."""
        return polynomial_sparsity(step, self.start, self.end, self.final, self.initial)


def parse_prune(opts: dict[str, Any], steps: int) -> PruneSpec | None:
    """``train.prune`` -> PruneSpec, or None when empty; a one-line ConfigError names the bad key."""
    if not opts:
        return None
    if not isinstance(opts, dict):
        raise ConfigError(f"train.prune must be a mapping such as {{final: 0.9, start: 100, end: 400}}, got {opts!r}")
    unknown = sorted(set(opts) - set(KEYS))
    if unknown:
        raise ConfigError(f"train.prune: unknown key {unknown[0]!r}{suggest(str(unknown[0]), list(KEYS))}; "
                          f"allowed: {', '.join(KEYS)}")
    if "final" not in opts:
        raise ConfigError("train.prune needs 'final' (the sparsity reached at 'end', e.g. 0.9)")
    values = {k: opts.get(k, default) for k, (default, _) in KEYS.items()}
    if values["end"] is None:
        values["end"] = steps
    for key, (_, rule) in KEYS.items():
        v = values[key]
        if key == "embeddings" and not isinstance(v, bool):
            raise ConfigError(f"train.prune.embeddings must be true or false, got {v!r}")
        if key in ("start", "end", "every") and (isinstance(v, bool) or not isinstance(v, int)):
            raise ConfigError(f"train.prune.{key} must be an integer, got {v!r}")
        if key != "embeddings":
            check_value(v, rule, f"train.prune.{key}")
    if values["end"] < values["start"]:
        raise ConfigError(f"train.prune.end ({values['end']}) must be >= train.prune.start ({values['start']})")
    if values["initial"] > values["final"]:
        raise ConfigError(f"train.prune.initial ({values['initial']}) must be <= train.prune.final "
                          f"({values['final']})")
    return PruneSpec(**values)


def _smallest_mask(flat: Tensor, fraction: float) -> Tensor:
    """Bool mask keeping all but the ``fraction`` smallest entries (zeros sort first: pruned stays pruned)."""
    k = int(round(fraction * flat.numel()))
    keep = torch.ones_like(flat, dtype=torch.bool)
    if k:
        keep[flat.argsort(stable=True)[:k]] = False
    return keep


class TrainingPruner:
    """The trainer's side of ``train.prune``: masks held as the weights' zeros (see the module doc)."""

    def __init__(self, model: nn.Module, spec: PruneSpec) -> None:
        self.spec = spec
        seen: set[int] = set()
        self.weights: list[nn.Parameter] = []
        for _, mod in prunable(model, spec.embeddings):           # tied weights: one entry
            if id(mod.weight) not in seen:
                seen.add(id(mod.weight))
                self.weights.append(mod.weight)
        self.masks: list[Tensor] | None = None

    @torch.no_grad()
    def restore(self, step: int) -> None:
        """After a resume at ``step``: the mask is the checkpoint's zeros once pruning has begun."""
        if step >= self.spec.start and step > 0:
            self.masks = [w != 0 for w in self.weights]

    @torch.no_grad()
    def mask_grads(self) -> None:
        """Pruned weights get no gradient (so no optimizer moment builds up on them)."""
        if self.masks is not None:
            for w, m in zip(self.weights, self.masks):
                if w.grad is not None:
                    w.grad.mul_(m)

    @torch.no_grad()
    def apply(self) -> None:
        """Zero the pruned weights again (weight decay and earlier moments may have moved them)."""
        if self.masks is not None:
            for w, m in zip(self.weights, self.masks):
                w.mul_(m)

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After optimizer step ``step``: at a due step, prune to the schedule's sparsity."""
        if not self.spec.due(step):
            return
        target = self.spec.target(step)
        mags = [w.detach().abs() for w in self.weights]
        if self.spec.scope == "global":
            flat = torch.cat([m.flatten() for m in mags])
            masks = [k.view_as(m) for k, m in zip(_smallest_mask(flat, target).split([m.numel() for m in mags]),
                                                    mags)]
        else:
            masks = [_smallest_mask(m.flatten(), target).view_as(m) for m in mags]
        self.masks = masks
        self.apply()

    @torch.no_grad()
    def sparsity(self) -> float:
        """Fraction of zeros among the prunable weights."""
        total = sum(w.numel() for w in self.weights)
        return sum(int((w == 0).sum()) for w in self.weights) / max(total, 1)


def check_prune_compatible(train: Any, sharded: bool) -> None:
    """ConfigError for settings ``train.prune`` cannot be combined with."""
    if train.ema_decay > 0:
        raise ConfigError("train.prune cannot be combined with train.ema_decay > 0 (the average of the weights "
                          "is not sparse); set one of them off")
    if sharded:
        raise ConfigError("train.prune needs whole weight matrices; use train.distributed=ddp, not fsdp")
