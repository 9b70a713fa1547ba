"""Routing math shared by the composition methods: top-k / top-p / threshold renormalisation, distance-based
mixture weights, and the mean number of experts a routing uses (its compute).

Fixed top-k gives every token (row) the same number of experts. ``topp_softmax`` and ``threshold_softmax``
decide per row how many to include: top-p keeps the smallest set of most probable experts whose probability
reaches p (nucleus routing), threshold keeps every expert whose probability reaches tau. Both always keep the
most probable expert, and renormalise the kept ones (a softmax over their scores, like ``topk_softmax``).
"""

from __future__ import annotations

import torch
from torch import Tensor


def topk_softmax(scores: Tensor, k: int | None) -> Tensor:
    """softmax over the ``k`` largest scores of the last axis, 0 elsewhere (all of them when k is None).

    Ties are broken by ``torch.topk``; the result sums to 1 along the last axis.
    """
    n = scores.shape[-1]
    if k is None or k >= n:
        return torch.softmax(scores, -1)
    if k < 1:
        raise ValueError(f"top_k must be >= 1, got {k}")
    top = scores.topk(k, dim=-1)
    out = torch.zeros_like(scores)
    return out.scatter(-1, top.indices, torch.softmax(top.values, -1))


def _kept_softmax(scores: Tensor, keep: Tensor) -> Tensor:
    """softmax over the scores where ``keep`` is True, exactly 0 elsewhere (every row keeps at least one)."""
    return torch.softmax(scores.masked_fill(~keep, float("-inf")), -1)


def check_top_p(p: float, key: str = "top_p") -> float:
    """``p`` as a float in (0, 1]; ValueError naming ``key`` otherwise."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
        raise ValueError(f"{key} must be a number in (0, 1], got {p!r}")
    return float(p)


def check_threshold(tau: float, key: str = "threshold") -> float:
    """``tau`` as a float in [0, 1]; ValueError naming ``key`` otherwise."""
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0 <= tau <= 1:
        raise ValueError(f"{key} must be a number in [0, 1], got {tau!r}")
    return float(tau)


def check_top_k(k: int | None, key: str = "top_k") -> int | None:
    """``k`` (an int >= 1, or None for all experts); ValueError naming ``key`` otherwise."""
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"{key} must be an integer >= 1 or null (all experts), got {k!r}")
    return k


def topp_softmax(scores: Tensor, p: float, max_k: int | None = None) -> Tensor:
    """Top-p (nucleus) routing: the smallest set of most probable experts whose softmax probability sums to
    at least ``p`` (at least 1, at most ``max_k``), renormalised; 0 elsewhere.

    The number of experts varies per row. ``p = 1`` keeps every expert (``max_k`` permitting); ties between
    equal probabilities are broken by ``torch.sort``. The result sums to 1 along the last axis.
    """
    p = check_top_p(p, "top_p")
    check_top_k(max_k, "max_k")
    n = scores.shape[-1]
    probs = torch.softmax(scores, -1)
    if p >= 1:
        keep = torch.ones_like(scores, dtype=torch.bool)
    else:
        sorted_p, order = probs.sort(-1, descending=True)
        before = torch.cat([torch.zeros_like(sorted_p[..., :1]), sorted_p.cumsum(-1)[..., :-1]], -1)
        keep_sorted = before < p                          # the mass before this expert is still short of p
        keep_sorted[..., 0] = True
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    if max_k is not None and max_k < n:                   # the max_k most probable among the kept
        top = scores.masked_fill(~keep, float("-inf")).topk(max_k, -1).indices
        keep = keep & torch.zeros_like(keep).scatter(-1, top, True)
    return _kept_softmax(scores, keep)


def threshold_softmax(scores: Tensor, tau: float) -> Tensor:
    """Threshold routing: the experts whose softmax probability is >= ``tau`` (always the most probable one),
    renormalised; 0 elsewhere. ``tau = 0`` keeps every expert; the number kept varies per row."""
    tau = check_threshold(tau, "threshold")
    probs = torch.softmax(scores, -1)
    keep = (probs >= tau).scatter(-1, probs.argmax(-1, keepdim=True), True)
    return _kept_softmax(scores, keep)


ROUTINGS = ("top_k", "top_p", "threshold")


def route_softmax(scores: Tensor, routing: str = "top_k", top_k: int | None = None, top_p: float | None = None,
                  threshold: float | None = None) -> Tensor:
    """Expert weights by ``routing``: ``top_k`` (``topk_softmax(scores, top_k)``), ``top_p``
    (``topp_softmax(scores, top_p)``) or ``threshold`` (``threshold_softmax(scores, threshold)``)."""
    if routing == "top_k":
        return topk_softmax(scores, top_k)
    if routing == "top_p":
        if top_p is None:
            raise ValueError("routing 'top_p' needs top_p (a number in (0, 1])")
        return topp_softmax(scores, top_p)
    if routing == "threshold":
        if threshold is None:
            raise ValueError("routing 'threshold' needs threshold (a number in [0, 1])")
        return threshold_softmax(scores, threshold)
    raise ValueError(f"routing must be one of {', '.join(ROUTINGS)}, got {routing!r}")


def experts_used(weights: Tensor, mask: Tensor | None = None) -> float:
    """Mean number of experts with a nonzero weight per row of ``weights`` (..., E): the routing's average
    compute in experts. ``mask`` (...) weights the rows (e.g. by their token count); None: all rows alike."""
    used = (weights != 0).sum(-1).double()
    if mask is None:
        return float(used.mean())
    m = mask.to(used.dtype)
    return float((used * m).sum() / m.sum())


def mixture_weights(emb: Tensor, centres: Tensor, temperature: float, top_k: int | None = None,
                    top_p: float | None = None, threshold: float | None = None) -> Tensor:
    """c-BTM expert weights ``softmax(-||emb - centre_j||^2 / T)`` (N, K), optionally kept to the top k, to the
    top p of the probability (``top_k`` then caps the number kept) or to the experts of probability >= threshold.

    ``emb`` (N, D) context embeddings, ``centres`` (K, D) cluster centres.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_p is not None and threshold is not None:
        raise ValueError("give at most one of top_p and threshold")
    if threshold is not None and top_k is not None:
        raise ValueError("threshold routing takes no top_k")
    d2 = torch.cdist(emb.double(), centres.double()).square()                   # (N, K)
    if top_p is not None:
        return topp_softmax(-d2 / temperature, top_p, max_k=top_k).to(emb.dtype)
    if threshold is not None:
        return threshold_softmax(-d2 / temperature, threshold).to(emb.dtype)
    return topk_softmax(-d2 / temperature, top_k).to(emb.dtype)


def standardize(x: Tensor, eps: float = 1e-6) -> Tensor:
    """Zero mean, unit variance over the last axis (PHATGOOSE normalises activations and gates this way)."""
    x = x - x.mean(-1, keepdim=True)
    return x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()
