"""Circuits of a LoRA adapter: split its weight delta into per-head QK / OV parts and per-module parts, rank them
by size (weights only), and test by ablation whether the top parts alone carry the adapter's new behaviour.

A merged adapter changes each targeted weight by ``dW = W_merged - W_base`` (rank <= r). The delta of the fused
``attn.qkv`` splits by rows into each head's query/key rows (the head's QK part) and value rows; with the head's
columns of ``attn.out`` the value rows form the head's OV part. Every other changed weight (``mlp.up`` + ``mlp.down``
of a layer, ``lm_head``, ...) is one component. ``with_components(base, deltas, keep)`` is the base plus the chosen
components' deltas, so the study can

- rank components by relative size ``||dW_c||_F / ||W_c||_F`` (the circuit "extracted from the adapter alone"),
- keep only the top k and measure the new behaviour (does the small circuit explain it?),
- remove each component, or the top k, from the full adapter (is the behaviour lost?), or keep each one alone.

``interp.deltas.head_deltas`` measures a head's change on its bilinear forms (``W_Q W_K^T``, ``W_V W_O``); the
components here are the exact weight slices behind them, which can be switched on and off (tested: keeping one
head's QK part moves only that head's ``W_Q W_K^T``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

Part = tuple[str, Tensor]            # (parameter name, boolean mask of the entries this component owns)


def weight_delta(base: nn.Module, tuned: nn.Module) -> dict[str, Tensor]:
    """``{parameter name: tuned - base}`` for every parameter that differs (same architecture)."""
    b, t = dict(base.named_parameters()), dict(tuned.named_parameters())
    if set(b) != set(t):
        raise ValueError(f"models differ in parameters: {sorted(set(b) ^ set(t))[:4]}")
    return {n: (t[n].detach() - b[n].detach()).float() for n in b if not torch.equal(t[n], b[n])}


def components(model: nn.Module, deltas: dict[str, Tensor]) -> dict[str, list[Part]]:
    """Split ``deltas`` into named components: ``L{i}H{h}.qk`` (query and key rows of ``qkv``), ``L{i}H{h}.ov``
    (value rows of ``qkv`` and the head's columns of ``out``), ``L{i}.mlp`` (every changed ``blocks.i.mlp``
    weight) and one component per other changed parameter (named after it)."""
    comps: dict[str, list[Part]] = {}
    owned: dict[str, Tensor] = {n: torch.zeros_like(d, dtype=torch.bool) for n, d in deltas.items()}

    def add(name: str, param: str, mask: Tensor) -> None:
        if param in deltas and bool((deltas[param] != 0)[mask].any()):
            comps.setdefault(name, []).append((param, mask))
            owned[param] |= mask

    for i, block in enumerate(getattr(model, "blocks", [])):
        attn = block.attn
        qkv, out = f"blocks.{i}.attn.qkv.weight", f"blocks.{i}.attn.out.weight"
        H, Dh = int(attn.n_head), int(attn.head_dim)
        Hkv = int(getattr(attn, "n_kv_heads", H))
        if Hkv != H or qkv not in dict(model.named_parameters()):
            continue
        shape_qkv, shape_out = attn.qkv.weight.shape, attn.out.weight.shape
        for h in range(H):
            rows = torch.zeros(shape_qkv, dtype=torch.bool)
            rows[h * Dh:(h + 1) * Dh] = True                           # query rows
            rows[(H + h) * Dh:(H + h + 1) * Dh] = True                 # key rows
            add(f"L{i}H{h}.qk", qkv, rows)
            vrows = torch.zeros(shape_qkv, dtype=torch.bool)
            vrows[(2 * H + h) * Dh:(2 * H + h + 1) * Dh] = True
            cols = torch.zeros(shape_out, dtype=torch.bool)
            cols[:, h * Dh:(h + 1) * Dh] = True
            add(f"L{i}H{h}.ov", qkv, vrows)
            add(f"L{i}H{h}.ov", out, cols)
    for param, d in deltas.items():
        rest = ~owned[param]
        if not bool((d != 0)[rest].any()):
            continue
        name = param.removesuffix(".weight")
        if name.startswith("blocks.") and ".mlp." in name:
            name = f"L{name.split('.')[1]}.mlp"
        comps.setdefault(name, []).append((param, rest))
    return comps


def component_sizes(model: nn.Module, deltas: dict[str, Tensor], comps: dict[str, list[Part]]) -> dict[str, dict]:
    """Per component: ``abs`` = ||dW_c||_F and ``rel`` = ||dW_c||_F / ||W_c||_F (W: the base weights)."""
    params = dict(model.named_parameters())
    out = {}
    for name, parts in comps.items():
        d2 = sum(float(deltas[p][m].pow(2).sum()) for p, m in parts)
        w2 = sum(float(params[p].detach().float()[m].pow(2).sum()) for p, m in parts)
        out[name] = {"abs": d2 ** 0.5, "rel": (d2 / w2) ** 0.5 if w2 > 0 else float("inf")}
    return out


@torch.no_grad()
def with_components(base: nn.Module, deltas: dict[str, Tensor], comps: dict[str, list[Part]],
                    keep: list[str]) -> nn.Module:
    """A copy of ``base`` plus the deltas of the components in ``keep`` (unknown names raise)."""
    unknown = [k for k in keep if k not in comps]
    if unknown:
        raise KeyError(f"no adapter component {unknown}; components: {sorted(comps)}")
    model = copy.deepcopy(base)
    params = dict(model.named_parameters())
    for k in keep:
        for p, m in comps[k]:
            params[p].add_(torch.where(m.to(deltas[p].device), deltas[p], 0).to(params[p].dtype))
    return model.eval()


def ablation_study(base: nn.Module, tuned: nn.Module, metric: Callable[[nn.Module], float],
                   ks: tuple[int, ...] = (1, 2, 3, 4, 6, 8), recover: float = 0.9) -> dict[str, Any]:
    """Rank the adapter's components by relative size and measure ``metric`` (the new behaviour, higher = better)
    with: the base, the full adapter, each component removed, each alone, only the top k kept, the top k removed.

    Returns ``{"components": [{name, rel, abs, without, alone}], "top_k": [{k, kept, only_top_k, without_top_k}],
    "base", "full", "minimal_k"}``; ``minimal_k``: the smallest k whose top components alone recover
    ``recover`` of the adapter's gain ``full - base`` (None when no k in ``ks`` does)."""
    deltas = weight_delta(base, tuned)
    comps = components(base, deltas)
    sizes = component_sizes(base, deltas, comps)
    order = sorted(comps, key=lambda c: -sizes[c]["rel"])
    m_base, m_full = metric(base), metric(tuned)
    rows = []
    for c in order:
        without = metric(with_components(base, deltas, comps, [o for o in order if o != c]))
        alone = metric(with_components(base, deltas, comps, [c]))
        rows.append({"name": c, "rel": round(sizes[c]["rel"], 5), "abs": round(sizes[c]["abs"], 5),
                     "without": round(without, 4), "alone": round(alone, 4)})
    top, minimal = [], None
    gain = m_full - m_base
    for k in ks:
        if k > len(order):
            break
        only = metric(with_components(base, deltas, comps, order[:k]))
        rest = metric(with_components(base, deltas, comps, order[k:]))
        frac = (only - m_base) / gain if gain else None
        top.append({"k": k, "kept": order[:k], "only_top_k": round(only, 4), "without_top_k": round(rest, 4),
                    "recovered": None if frac is None else round(frac, 4)})
        if minimal is None and frac is not None and frac >= recover:
            minimal = k
    return {"components": rows, "top_k": top, "base": round(m_base, 4), "full": round(m_full, 4),
            "minimal_k": minimal, "n_components": len(order)}
