"""Routing math shared by the composition methods: top-k renormalisation and distance-based mixture weights."""

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


def mixture_weights(emb: Tensor, centres: Tensor, temperature: float, top_k: int | None = None) -> Tensor:
    """c-BTM expert weights ``softmax(-||emb - centre_j||^2 / T)`` (N, K), optionally kept to the top k.

    ``emb`` (N, D) context embeddings, ``centres`` (K, D) cluster centres.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    d2 = torch.cdist(emb.double(), centres.double()).square()                   # (N, K)
    return topk_softmax(-d2 / temperature, top_k).to(emb.dtype)


def standardize(x: Tensor, eps: float = 1e-6) -> Tensor:
    """Zero mean, unit variance over the last axis (PHATGOOSE normalises activations and gates this way)."""
    x = x - x.mean(-1, keepdim=True)
    return x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()
