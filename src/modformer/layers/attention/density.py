"""How many causal pairs a sparse attention keeps, and each family's option that keeps a given share.

``density`` is kept (query, key) pairs / causal pairs ``T (T + 1) / 2`` of one prefill of length ``T``.
Fixed patterns are counted exactly from their ``keep`` function (``sparse.PATTERNS``, evaluated in row
chunks); the learned gate's top-k count does not depend on the input (every query block keeps its diagonal
block, causal inside, and ``min(top_k - 1, past blocks)`` full past blocks), so it is a closed form.

Families (the names of ``modformer bench sparse-fidelity --methods``) and the option tuned to a density (the
others fixed): ``window`` (sliding_window.window), ``sink`` (sink_window.window, 4 sinks), ``block_local``
(block), ``strided`` (window; stride defaults to round(sqrt(T)), Child et al.'s choice) and ``dilated`` (window,
dilation 2). Density is non-decreasing in each tuned option (block_local: up to its last, partial block), so a
bisection finds the value whose density is closest to the target (ties: the sparser one).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from modformer.layers.attention.sparse import PATTERNS
from modformer.registry import ConfigError

# family -> (attention kind, the option tuned to a density, default values of the other options at length T)
FAMILIES: dict[str, tuple[str, str, Any]] = {
    "window": ("sliding_window", "window", lambda t: {}),
    "sink": ("sink_window", "window", lambda t: {"sinks": 4}),
    "block_local": ("block_local", "block", lambda t: {}),
    "strided": ("strided", "window", lambda t: {"stride": max(1, round(math.sqrt(t)))}),
    "dilated": ("dilated", "window", lambda t: {"dilation": 2}),
}
OPTION_ORDER = {"sliding_window": ("window",), "block_local": ("block",), "sink_window": ("sinks", "window"),
                "strided": ("window", "stride"), "dilated": ("window", "dilation")}


def causal_pairs(t: int) -> int:
    """Number of (query, key) pairs with key <= query in a sequence of ``t`` tokens."""
    return t * (t + 1) // 2


DISTANCE_ONLY = ("sliding_window", "strided", "dilated")   # keep(q, k) depends on q - k alone


def pattern_pairs(kind: str, options: dict[str, int], t: int, chunk: int = 1024) -> int:
    """Exact number of pairs a fixed pattern ``kind`` (sparse.PATTERNS) with ``options`` keeps at length ``t``:
    O(t) for the distance-only patterns (distance d occurs t - d times) and sink_window (per query row), a closed
    form for block_local, the (t, t) grid in row chunks otherwise."""
    params = tuple(int(options[o]) for o in OPTION_ORDER[kind])
    keep = PATTERNS[kind][0]
    if kind in DISTANCE_ONLY:
        d = torch.arange(t)
        return int(((t - d) * keep(d, torch.zeros_like(d), *params)).sum())
    if kind == "sink_window":
        sinks, window = params
        q = torch.arange(t)
        in_window = torch.minimum(q + 1, torch.full_like(q, window))
        return int((in_window + (q + 1 - window).clamp(0, sinks)).sum())
    if kind == "block_local":
        (block,) = params
        full, rest = divmod(t, block)
        return full * block * (block + 1) // 2 + rest * (rest + 1) // 2
    k = torch.arange(t)
    total = 0
    for start in range(0, t, chunk):
        q = torch.arange(start, min(t, start + chunk))
        total += int(keep(q[:, None], k[None, :], *params).sum())
    return total


def pattern_density(kind: str, options: dict[str, int], t: int) -> float:
    """Kept share of the causal pairs of a fixed pattern at length ``t``."""
    return pattern_pairs(kind, options, t) / causal_pairs(t)


def gate_pairs(t: int, block_size: int, top_k: int) -> int:
    """Pairs kept by ``learned_gate`` with ``select: topk`` in a prefill of ``t`` tokens (input-independent)."""
    total = 0
    for j in range(-(-t // block_size)):
        rows = min(block_size, t - j * block_size)
        total += rows * (rows + 1) // 2 + rows * block_size * min(top_k - 1, j)
    return total


def gate_density(t: int, block_size: int, top_k: int) -> float:
    """Kept share of the causal pairs of the top-k learned gate at length ``t``."""
    return gate_pairs(t, block_size, top_k) / causal_pairs(t)


def gate_top_k(t: int, block_size: int, density: float) -> int:
    """The largest ``top_k`` whose gate density at length ``t`` does not exceed ``density`` (at least 1: the
    diagonal blocks alone), so a gate tuned to "at most 25% of the pairs" keeps at most 25%."""
    n_blocks = -(-t // block_size)
    return max([k for k in range(1, n_blocks + 1) if gate_density(t, block_size, k) <= density] or [1])


def tune(family: str, t: int, density: float, **fixed: int) -> dict[str, int]:
    """Options of ``family`` at length ``t`` whose density is closest to ``density``: the tuned option found by
    bisection, the others from ``fixed`` or the family's defaults. Raises ConfigError for a bad family/density."""
    if family not in FAMILIES:
        raise ConfigError(f"unknown sparse family {family!r}; allowed: {', '.join(FAMILIES)}")
    if not 0 < density <= 1:
        raise ConfigError(f"density must be in (0, 1], got {density}")
    kind, free, defaults = FAMILIES[family]
    base = {**defaults(t), **{k: int(v) for k, v in fixed.items() if k != free}}

    def dens(v: int) -> float:
        return pattern_density(kind, {**base, free: v}, t)

    lo, hi = 1, t                                    # smallest value whose density reaches the target
    while lo < hi:
        mid = (lo + hi) // 2
        if dens(mid) >= density:
            hi = mid
        else:
            lo = mid + 1
    candidates = [v for v in (lo - 1, lo) if v >= 1]
    best = min(candidates, key=lambda v: (abs(dens(v) - density), v))
    return {**base, free: best}
