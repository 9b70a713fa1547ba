"""Unstructured magnitude pruning with ``torch.nn.utils.prune`` masks.

* ``magnitude_prune(model, sparsity, scope="global" | "layer")``: zero the smallest-magnitude
  weights of every prunable matrix (Linear and Embedding weights) so that ``sparsity`` of them are
  zero, over all of them together (global) or in each matrix (layer). Masks are kept as
  ``torch.nn.utils.prune`` reparametrisations (``weight_orig`` * ``weight_mask``), so training
  keeps pruned weights at zero; pruning again only ever adds zeros (the ranking uses the masked
  weights). While masks are attached, ``state_dict()`` (hence ``mf.save`` and trainer checkpoints)
  stores the plain masked ``weight``, so every saved file loads as an ordinary model.
* ``make_permanent(model)``: drop the reparametrisations; weights stay **dense tensors with
  zeros** (no sparse storage: PyTorch's dense kernels are faster than its sparse ones at these
  sparsities, and every other part of modformer expects dense weights).
* ``polynomial_sparsity`` / ``GradualPruning``: Zhu & Gupta (2017) cubic schedule as a Trainer
  callback (from a run config or the CLI: ``train.prune``, ``modformer.train.pruning``).
  ``iterative_magnitude_pruning``: prune a fixed fraction per round, rewind survivors to saved weights
  (lottery ticket, Frankle & Carbin 2019; rewinding to an early step, Frankle et al. 2020), retrain.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

Target = tuple[nn.Module, str]   # (module, parameter name)


def prunable(model: nn.Module, embeddings: bool = True) -> list[tuple[str, nn.Module]]:
    """(name, module) of every Linear (and Embedding, if ``embeddings``) whose ``weight`` may be pruned.

    The position module's table is left out (it is not a learned feature map of the residual stream).
    """
    return [mods[0] for mods in _by_param(model, embeddings).values()]


def _by_param(model: nn.Module, embeddings: bool) -> dict[int, list[tuple[str, nn.Module]]]:
    """Prunable modules grouped by their weight Parameter (tied weights share one group and one mask)."""
    kinds = (nn.Linear, nn.Embedding) if embeddings else (nn.Linear,)
    groups: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, kinds) and not name.startswith("position"):
            w = mod.weight_orig if hasattr(mod, "weight_mask") else mod.weight
            if w.dim() >= 2:
                groups.setdefault(id(w), []).append((name, mod))
    return groups


def _effective(mod: nn.Module) -> Tensor:
    """The weight the forward uses (``orig * mask`` while a mask is attached)."""
    if hasattr(mod, "weight_mask"):
        return mod.weight_orig * mod.weight_mask
    return mod.weight


def _state_dict_hook(module: nn.Module, state: dict[str, Any], prefix: str, _meta: Any) -> None:
    """Store ``weight = orig * mask`` instead of ``weight_orig`` / ``weight_mask`` (loadable files);
    tied weights (one Parameter in several modules) become one shared tensor again."""
    done: dict[int, Tensor] = {}
    for key in [k for k in state if k.startswith(prefix) and k.endswith(".weight_orig")]:
        base = key[: -len("_orig")]
        orig, mask = state.pop(key), state.pop(base + "_mask")
        ptr = orig.data_ptr()
        if ptr not in done:
            done[ptr] = (orig * mask).detach()
        state[base] = done[ptr]


def set_mask(mod: nn.Module, mask: Tensor) -> None:
    """Attach (or replace) the pruning mask of ``mod.weight``."""
    if hasattr(mod, "weight_mask"):
        mod.weight_mask.copy_(mask)
        mod.weight = mod.weight_orig * mod.weight_mask        # refresh now, not only at the next forward
    else:
        prune.custom_from_mask(mod, "weight", mask)


def _hook_root(model: nn.Module, on: bool) -> None:
    handle = getattr(model, "_mf_prune_state_hook", None)
    if on and handle is None:
        model._mf_prune_state_hook = model._register_state_dict_hook(_state_dict_hook)
    elif not on and handle is not None:
        handle.remove()
        del model._mf_prune_state_hook


@torch.no_grad()
def magnitude_prune(model: nn.Module, sparsity: float, scope: str = "global",
                    embeddings: bool = True) -> float:
    """Mask the smallest-|w| weights so that ``sparsity`` of the prunable weights are zero; returns it."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if scope not in ("global", "layer"):
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    groups = list(_by_param(model, embeddings).values())
    mods = [g[0][1] for g in groups]
    weights = [_effective(m).abs() for m in mods]
    if scope == "global":
        flat = torch.cat([w.flatten() for w in weights])
        masks = _mask_smallest(flat, sparsity).split([w.numel() for w in weights])
        masks = [mk.view_as(w) for mk, w in zip(masks, weights)]
    else:
        masks = [_mask_smallest(w.flatten(), sparsity).view_as(w) for w in weights]
    for group, mk in zip(groups, masks):
        for _, m in group:
            set_mask(m, mk)
    _hook_root(model, True)
    return sparsity_of(model, embeddings)


def _mask_smallest(flat: Tensor, fraction: float) -> Tensor:
    k = int(round(fraction * flat.numel()))
    mask = torch.ones_like(flat)
    if k:
        mask[flat.argsort(stable=True)[:k]] = 0.0      # already-zero (pruned) entries sort first
    return mask


@torch.no_grad()
def sparsity_of(model: nn.Module, embeddings: bool = True) -> float:
    """Fraction of zeros among the prunable weights (masked or permanent)."""
    ws = [_effective(m) for _, m in prunable(model, embeddings)]
    total = sum(w.numel() for w in ws)
    return sum(int((w == 0).sum()) for w in ws) / max(total, 1)


def make_permanent(model: nn.Module) -> nn.Module:
    """Remove every mask reparametrisation: weights become plain dense tensors with zeros."""
    for mod in model.modules():
        if hasattr(mod, "weight_mask"):
            prune.remove(mod, "weight")
    _hook_root(model, False)
    return model


@torch.no_grad()
def rewind(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy ``state`` (a plain state_dict, e.g. saved before training) into the model, keeping masks:
    pruned weights stay zero, survivors get their saved values (lottery-ticket rewinding)."""
    for name, mod in model.named_modules():
        prefix = name + "." if name else ""
        for pname, p in list(mod.named_parameters(recurse=False)):
            key = prefix + (pname[: -len("_orig")] if pname.endswith("_orig") else pname)
            if key in state:
                p.copy_(state[key])
        if hasattr(mod, "weight_mask"):
            mod.weight = mod.weight_orig * mod.weight_mask


def polynomial_sparsity(step: int, start: int, end: int, final: float, initial: float = 0.0,
                        power: float = 3.0) -> float:
    """Zhu & Gupta (2017): s_t = s_f + (s_i - s_f) (1 - (t - t0) / (t1 - t0))^3, clamped to [t0, t1]."""
    if step < start:
        return 0.0
    frac = min(1.0, (step - start) / max(end - start, 1))
    return final + (initial - final) * (1.0 - frac) ** power


def round_sparsities(final: float, rounds: int) -> list[float]:
    """Total sparsity after each round of iterative pruning that removes the same fraction of the
    surviving weights each round: 1 - (1 - final)^(r / rounds)."""
    return [1.0 - (1.0 - final) ** ((r + 1) / rounds) for r in range(rounds)]


class GradualPruning:
    """Trainer callback: magnitude pruning on the cubic schedule every ``every`` steps between
    ``start`` and ``end``; masks are made permanent when training ends (last step or early stop).

        Trainer(cfg, callbacks=[GradualPruning(final=0.9, start=100, end=400)]).fit()
    """

    def __init__(self, final: float, start: int, end: int, every: int = 10, scope: str = "global",
                 initial: float = 0.0, embeddings: bool = True) -> None:
        self.final, self.start, self.end, self.every = final, start, end, every
        self.scope, self.initial, self.embeddings = scope, initial, embeddings
        self.history: list[tuple[int, float]] = []

    def __call__(self, trainer: Any, step: int) -> None:
        model = trainer.raw_model
        due = self.start <= step <= self.end and ((step - self.start) % self.every == 0 or step == self.end)
        if due:
            s = polynomial_sparsity(step, self.start, self.end, self.final, self.initial)
            self.history.append((step, magnitude_prune(model, s, self.scope, self.embeddings)))
        if step >= trainer.cfg.train.steps or trainer.stop_reason != "steps":
            make_permanent(model)


def iterative_magnitude_pruning(model: nn.Module, train_fn: Callable[[nn.Module], Any], final: float,
                                rounds: int, rewind_state: dict[str, Tensor] | None = None,
                                scope: str = "global", embeddings: bool = True,
                                eval_fn: Callable[[nn.Module], float] | None = None) -> list[dict[str, float]]:
    """Lottery-ticket IMP: ``rounds`` x (prune to the round's sparsity -> rewind -> ``train_fn``).

    ``rewind_state``: weights to reset survivors to after each pruning step (initial weights or
    those of an early step); None continues from the current weights (prune + fine-tune).
    The model should already be trained when called. Returns one row per round. Masks stay
    attached (call ``make_permanent`` when done).
    """
    rows = []
    for r, s in enumerate(round_sparsities(final, rounds)):
        magnitude_prune(model, s, scope, embeddings)
        if rewind_state is not None:
            rewind(model, rewind_state)
        train_fn(model)
        row = {"round": r + 1, "sparsity": sparsity_of(model, embeddings)}
        if eval_fn is not None:
            row["acc"] = eval_fn(model)
        rows.append(row)
    return rows
