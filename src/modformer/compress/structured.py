"""Structured pruning that physically shrinks the model: attention heads, FFN neurons, whole layers.

Each function returns a NEW ordinary modformer model built from a config whose
``model.layer_overrides`` records the per-layer shapes (``{"n_head": 3, "d_head": 32}``,
``{"d_ff": 96}``; removed layers lower ``n_layer``), loaded with the sliced weights; ``mf.save`` /
``mf.load`` round-trip it like any model. Removing a unit gives exactly the outputs of the original
with that unit masked to zero (``importance.masked``): heads through ``hook_z``, neurons through
``hook_post``. Every layer keeps at least one head and one neuron (a zeroed FFN still adds its
output bias, so dropping it entirely would change outputs); use ``remove_layers`` for whole blocks.

Heads: ``mha`` (any heads), ``mqa`` (query heads; the shared K/V head stays), ``gqa`` (whole
groups: a K/V head with all its query heads). FFNs: the MLP and GLU families.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from modformer.layers.attention.mha import MultiHeadAttention
from modformer.layers.ffn import GLU, MLP
from modformer.saving import build_model


def _rebuild(model: nn.Module, state: dict[str, Tensor], **changes: object) -> nn.Module:
    cfg = dataclasses.replace(model.cfg, **changes)
    if cfg.layer_overrides and not any(cfg.layer_overrides):
        cfg.layer_overrides = []
    p = next(model.parameters())
    new = build_model(cfg).to(device=p.device, dtype=p.dtype)
    new.load_state_dict(state, strict=True)
    return new.train(model.training)


def _overrides(model: nn.Module) -> list[dict]:
    cfg = model.cfg
    return [dict(o) for o in cfg.layer_overrides] if cfg.layer_overrides else [{} for _ in range(cfg.n_layer)]


def _rows(heads: Iterable[int], dh: int, offset: int = 0) -> Tensor:
    return torch.cat([torch.arange(offset + h * dh, offset + (h + 1) * dh) for h in heads])


def head_groups(attn: nn.Module) -> int:
    """Query heads that must be removed together: the GQA group size, else 1."""
    if not isinstance(attn, MultiHeadAttention):
        raise ValueError(f"head pruning supports mha / gqa / mqa attention, not {type(attn).__name__}")
    h, kv = attn.n_head, attn.n_kv_heads
    return h // kv if 1 < kv < h else 1


@torch.no_grad()
def remove_heads(model: nn.Module, remove: dict[int, Iterable[int]]) -> nn.Module:
    """A copy of ``model`` without the given query heads ``{layer: [head, ...]}``."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    over = _overrides(model)
    for i, heads in remove.items():
        heads = sorted(set(int(h) for h in heads))
        if not heads:
            continue
        attn = model.blocks[i].attn
        g, H, Hkv, Dh = head_groups(attn), attn.n_head, attn.n_kv_heads, attn.head_dim
        keep = [h for h in range(H) if h not in heads]
        if not keep:
            raise ValueError(f"layer {i}: cannot remove all {H} heads (remove the layer instead)")
        if Hkv == H:
            keep_kv = keep
        elif Hkv == 1:
            keep_kv = [0]
        else:
            groups = sorted({h // g for h in keep})
            if len(keep) != len(groups) * g:
                raise ValueError(f"layer {i}: GQA heads must be removed in whole groups of {g}")
            keep_kv = groups
        rows = torch.cat([_rows(keep, Dh), _rows(keep_kv, Dh, H * Dh), _rows(keep_kv, Dh, (H + Hkv) * Dh)])
        pre = f"blocks.{i}.attn."
        state[pre + "qkv.weight"] = state[pre + "qkv.weight"][rows]
        if pre + "qkv.bias" in state:
            state[pre + "qkv.bias"] = state[pre + "qkv.bias"][rows]
        state[pre + "out.weight"] = state[pre + "out.weight"][:, _rows(keep, Dh)]
        over[i].update(n_head=len(keep), d_head=Dh)
        if 1 < Hkv < H:
            over[i]["n_kv_heads"] = len(keep_kv)
    return _rebuild(model, state, layer_overrides=over)


@torch.no_grad()
def remove_neurons(model: nn.Module, remove: dict[int, Iterable[int]]) -> nn.Module:
    """A copy of ``model`` without the given FFN hidden units ``{layer: [unit, ...]}``."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    over = _overrides(model)
    for i, units in remove.items():
        units = set(int(u) for u in units)
        if not units:
            continue
        mlp = model.blocks[i].mlp
        if not isinstance(mlp, (MLP, GLU)):
            raise ValueError(f"layer {i}: neuron pruning supports MLP / GLU FFNs, not {type(mlp).__name__}")
        width = mlp.down.in_features
        keep = torch.tensor([u for u in range(width) if u not in units])
        if not len(keep):
            raise ValueError(f"layer {i}: cannot remove all {width} neurons (remove the layer instead)")
        pre = f"blocks.{i}.mlp."
        for name in ("up", "gate"):
            for p in ("weight", "bias"):
                if f"{pre}{name}.{p}" in state:
                    state[f"{pre}{name}.{p}"] = state[f"{pre}{name}.{p}"][keep]
        state[pre + "down.weight"] = state[pre + "down.weight"][:, keep]
        over[i]["d_ff"] = len(keep)
    return _rebuild(model, state, layer_overrides=over)


@torch.no_grad()
def remove_layers(model: nn.Module, layers: Iterable[int]) -> nn.Module:
    """A copy of ``model`` without the given blocks (later blocks renumbered)."""
    drop = set(int(i) for i in layers)
    n = model.cfg.n_layer
    keep = [i for i in range(n) if i not in drop]
    if not keep:
        raise ValueError("cannot remove every layer")
    if model.cfg.model_options.get("denseformer"):
        raise ValueError("layer pruning does not support denseformer models (their averaging weights are per depth)")
    new_index = {old: new for new, old in enumerate(keep)}
    state = {}
    for key, v in model.state_dict().items():
        if key.startswith("blocks."):
            _, idx, rest = key.split(".", 2)
            if int(idx) not in new_index:
                continue
            key = f"blocks.{new_index[int(idx)]}.{rest}"
        state[key] = v.clone()
    over = _overrides(model)
    return _rebuild(model, state, n_layer=len(keep), layer_overrides=[over[i] for i in keep])


def lowest(scores: list[Tensor], amount: float, min_keep: int = 1,
           group: list[int] | None = None) -> dict[int, list[int]]:
    """The globally lowest-scoring ``amount`` fraction of units as ``{layer: [unit, ...]}``, keeping
    at least ``min_keep`` units per layer; ``group[i]`` > 1 ranks layer i's units in blocks of that
    size (GQA head groups, scored by their sum)."""
    group = group or [1] * len(scores)
    cands = []
    for i, s in enumerate(scores):
        g = group[i]
        for j in range(len(s) // g):
            cands.append((float(s[j * g:(j + 1) * g].sum()), i, j))
    total = sum(len(s) for s in scores)
    target = int(round(amount * total))
    left = [len(s) for s in scores]
    out: dict[int, list[int]] = {i: [] for i in range(len(scores))}
    removed = 0
    for _, i, j in sorted(cands):
        g = group[i]
        if removed + g > target:
            break
        if left[i] - g < min_keep:
            continue
        out[i].extend(range(j * g, (j + 1) * g))
        left[i] -= g
        removed += g
    return out


def prune_structured(model: nn.Module, method: str, amount: float, batches: list[tuple[Tensor, Tensor]],
                     importance: str = "gradient", importance_options: dict | None = None) -> tuple[nn.Module, dict]:
    """Score units on ``batches`` and remove the lowest ``amount`` fraction: method heads | neurons | layers.

    ``importance_options`` go to the head scorer (``l0``: gate training settings).

    Returns the new model and ``{"removed": {...}, "scores": [...]}``.
    """
    from modformer.compress import importance as imp

    if method == "heads":
        scores = imp.head_importance(model, batches, importance, **(importance_options or {}))
        removed = lowest(scores, amount, group=[head_groups(b.attn) for b in model.blocks])
        new = remove_heads(model, removed)
    elif method == "neurons":
        scores = imp.neuron_importance(model, batches, importance if importance != "ablation" else "gradient")
        removed = lowest(scores, amount)
        new = remove_neurons(model, removed)
    elif method == "layers":
        layer_scores = imp.layer_importance(model, batches)
        k = min(int(round(amount * len(layer_scores))), len(layer_scores) - 1)
        drop = sorted(layer_scores.argsort()[:k].tolist())
        scores, removed = [layer_scores], {"layers": drop}
        new = remove_layers(model, drop)
    else:
        raise ValueError(f"unknown structured method {method!r}; allowed: heads, neurons, layers")
    info = {"removed": {str(k): v for k, v in removed.items() if v},
            "scores": [s.tolist() for s in scores]}
    return new, info


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
