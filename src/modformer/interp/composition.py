"""Q-, K- and V-composition scores between heads of different layers (Elhage et al. 2021).

For an earlier head A and a later head B, in our row convention (x @ W):

    score(W_A, W_B) = ||W_A W_B||_F / (||W_A||_F ||W_B||_F),    W_A = OV^A = W_V^A W_O^A (D, D)
    Q: W_B = QK^B = W_Q^B W_K^B^T      K: W_B = (QK^B)^T      V: W_B = OV^B

(A's output read by B's queries, keys or values; the same as TransformerLens's
``all_composition_scores``). Every matrix is rank Dh, so each norm is a trace of Dh x Dh
products; no D x D matrix is formed. Random matrices of the same shapes already score about
sqrt(Dh / D)-ish, so ``baseline=True`` subtracts the empirical mean score of random Gaussian
factors of those shapes (the paper's correction).

Scores are ``(L, H, L, H)``: ``[l1, h1, l2, h2]`` for head (l1, h1) writing and (l2, h2) reading,
zero unless l1 < l2.
"""

from __future__ import annotations

import torch
from torch import Tensor

from modformer.interp.weights import ModelWeights

MODES = ("q", "k", "v")


def comp_score(W_A: Tensor, W_B: Tensor) -> Tensor:
    """``||W_A W_B||_F / (||W_A||_F ||W_B||_F)`` for dense matrices (broadcast over batch dims)."""
    def fro(m: Tensor) -> Tensor:
        return m.pow(2).sum((-1, -2)).sqrt()

    return fro(W_A @ W_B) / (fro(W_A) * fro(W_B)).clamp_min(1e-30)


def _right_factors(w: ModelWeights, mode: str) -> tuple[Tensor, Tensor]:
    """W_B = X @ Y^T with X, Y ``(L, H, D, Dh)``."""
    if mode == "q":
        return w.W_Q, w.W_K
    if mode == "k":
        return w.W_K, w.W_Q
    if mode == "v":
        return w.W_V, w.W_O.transpose(-1, -2)
    raise ValueError(f"composition mode must be one of {MODES}, got {mode!r}")


def _low_rank_scores(P: Tensor, R: Tensor, X: Tensor, Y: Tensor) -> Tensor:
    """score(P R^T, X Y^T) for every pair: P, R ``(Na, D, r)``, X, Y ``(Nb, D, r)`` -> ``(Na, Nb)``.

    ||P R^T X Y^T||^2 = tr(Gp M Gy M^T) with Gp = P^T P, Gy = Y^T Y, M = R^T X (all r x r).
    """
    Gp, Gr = P.transpose(1, 2) @ P, R.transpose(1, 2) @ R
    Gx, Gy = X.transpose(1, 2) @ X, Y.transpose(1, 2) @ Y
    norm_a = (Gp * Gr).sum((1, 2)).clamp_min(0).sqrt()               # (Na,)
    norm_b = (Gx * Gy).sum((1, 2)).clamp_min(0).sqrt()               # (Nb,)
    out = torch.empty(P.shape[0], X.shape[0], dtype=P.dtype, device=P.device)
    for a in range(P.shape[0]):                                       # (Nb, r, r) per writer: no N^2 r^2 blow-up
        M = R[a].T @ X                                                # (Nb, r, r)
        num = torch.einsum("ij,bjk,bkl,bil->b", Gp[a], M, Gy, M)
        out[a] = num.clamp_min(0).sqrt()
    return out / (norm_a[:, None] * norm_b[None, :]).clamp_min(1e-30)


def composition_scores(w: ModelWeights, mode: str, baseline: bool = False, n_samples: int = 100,
                       seed: int = 0) -> Tensor:
    """``(L, H, L, H)`` composition scores; ``baseline`` subtracts the random-matrix expectation."""
    L, H, D, Dh = w.W_Q.shape
    P, R = w.W_V.double(), w.W_O.transpose(-1, -2).double()           # OV^A = P R^T
    X, Y = (t.double() for t in _right_factors(w, mode))
    s = _low_rank_scores(P.reshape(L * H, D, Dh), R.reshape(L * H, D, Dh),
                         X.reshape(L * H, D, Dh), Y.reshape(L * H, D, Dh)).view(L, H, L, H)
    if baseline:
        s = s - composition_baseline(D, Dh, n_samples, seed)
    layer = torch.arange(L, device=s.device)
    mask = (layer[:, None] < layer[None, :]).view(L, 1, L, 1)
    return (s * mask).float()


def composition_baseline(d_model: int, d_head: int, n_samples: int = 100, seed: int = 0) -> float:
    """Mean score of random matrices of the heads' shapes: W_A = P R^T, W_B = X Y^T, Gaussian (D, Dh) factors.

    The same for Q, K and V composition (all are products of two rank-Dh D x D matrices).
    """
    g = torch.Generator().manual_seed(seed)
    f = [torch.randn(n_samples, d_model, d_head, generator=g, dtype=torch.float64) for _ in range(4)]
    M = f[1].transpose(1, 2) @ f[2]
    Gp, Gr = f[0].transpose(1, 2) @ f[0], f[1].transpose(1, 2) @ f[1]
    Gx, Gy = f[2].transpose(1, 2) @ f[2], f[3].transpose(1, 2) @ f[3]
    num = torch.einsum("bij,bjk,bkl,bil->b", Gp, M, Gy, M).sqrt()
    den = ((Gp * Gr).sum((1, 2)) * (Gx * Gy).sum((1, 2))).sqrt()
    return float((num / den).mean())


def all_composition_scores(w: ModelWeights, baseline: bool = False, n_samples: int = 100,
                           seed: int = 0) -> dict[str, Tensor]:
    """``{"q": (L, H, L, H), "k": ..., "v": ...}``."""
    return {m: composition_scores(w, m, baseline, n_samples, seed) for m in MODES}


def top_compositions(scores: dict[str, Tensor], k: int = 10) -> list[dict]:
    """The ``k`` largest scores over all modes as rows ``{mode, from: [l, h], to: [l, h], score}``."""
    rows = []
    for mode, s in scores.items():
        L, H = s.shape[:2]
        for flat in s.flatten().topk(min(k, s.numel())).indices.tolist():
            l1, h1, l2, h2 = (flat // (H * L * H)) % L, (flat // (L * H)) % H, (flat // H) % L, flat % H
            if l1 < l2:
                rows.append({"mode": mode, "from": [l1, h1], "to": [l2, h2], "score": float(s.flatten()[flat])})
    rows.sort(key=lambda r: -r["score"])
    return rows[:k]
