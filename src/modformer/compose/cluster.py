"""Unsupervised domain discovery (c-BTM, Gururangan et al. 2023): tf-idf -> truncated SVD -> balanced k-means.

Documents are token-id arrays, so tf-idf counts token ids (no text tokenizer involved). Everything is
torch: tf-idf as scikit-learn's defaults (raw counts, smooth idf ``ln((1+n)/(1+df)) + 1``, rows
L2-normalised) over the ``max_features`` most frequent ids, a randomized truncated SVD
(``torch.svd_lowrank``, no centring, as ``TruncatedSVD``), embeddings L2-normalised. Balanced k-means
assigns points greedily by distance under capacities so every cluster gets floor(n/k) or ceil(n/k).

    cl = Clusterer.fit(docs, vocab_size, k=4, dim=64)
    labels = cl.assign(cl.embed(docs))       # balanced only at fit time; .assign is nearest centre
    cl.save("clusters/") ; cl = Clusterer.load("clusters/")
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from modformer.utils import atomic_write, atomic_write_text


def token_counts(docs: Sequence[np.ndarray], vocab_size: int) -> Tensor:
    """(N, V) float counts of token ids per document."""
    out = torch.zeros(len(docs), vocab_size)
    for i, d in enumerate(docs):
        out[i] = torch.bincount(torch.as_tensor(np.asarray(d, dtype=np.int64)), minlength=vocab_size)[:vocab_size]
    return out


def balanced_assign(dist: Tensor) -> Tensor:
    """Assign each of N points to one of K clusters, nearest first, with sizes floor(N/K) or ceil(N/K).

    Greedy over all (point, cluster) pairs in increasing distance: a pair is taken when the point is free
    and the cluster has room; ``N mod K`` clusters may take one point more than floor(N/K).
    """
    n, k = dist.shape
    base, extra = divmod(n, k)
    sizes = [0] * k
    out = np.full(n, -1, dtype=np.int64)
    left = n
    for flat in torch.argsort(dist.flatten()).tolist():
        i, c = divmod(flat, k)
        if out[i] >= 0:
            continue
        if sizes[c] < base or (sizes[c] == base and extra > 0):
            if sizes[c] == base:
                extra -= 1
            out[i], sizes[c] = c, sizes[c] + 1
            left -= 1
            if left == 0:
                break
    return torch.from_numpy(out)


def balanced_kmeans(x: Tensor, k: int, iters: int = 50, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Balanced k-means on rows of ``x`` (N, D): k-means++ seeding, then balanced assignment / mean
    updates until the assignment stops changing. Returns (centres (K, D), labels (N,))."""
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] (the number of documents), got {k}")
    g = torch.Generator().manual_seed(seed)
    centres = [x[int(torch.randint(n, (), generator=g))]]
    for _ in range(1, k):                                   # k-means++: sample far points
        d2 = torch.cdist(x, torch.stack(centres)).square().min(1).values
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full((n,), 1.0 / n)
        centres.append(x[int(torch.multinomial(probs, 1, generator=g))])
    c = torch.stack(centres)
    labels = torch.full((n,), -1, dtype=torch.long)
    for _ in range(iters):
        new = balanced_assign(torch.cdist(x, c))
        if torch.equal(new, labels):
            break
        labels = new
        c = torch.stack([x[labels == j].mean(0) for j in range(k)])
    return c, labels


@dataclass
class Clusterer:
    """A fitted tf-idf + SVD embedder and the cluster centres in its space."""

    features: Tensor      # (F,) token ids kept as tf-idf features
    idf: Tensor           # (F,)
    components: Tensor    # (F, D) right singular vectors
    centres: Tensor       # (K, D)
    vocab_size: int

    @classmethod
    def fit(cls, docs: Sequence[np.ndarray], vocab_size: int, k: int, dim: int = 64, max_features: int = 8192,
            iters: int = 50, seed: int = 0) -> tuple[Clusterer, Tensor]:
        """Fit on ``docs``; returns the clusterer and the balanced labels of ``docs`` (N,)."""
        counts = token_counts(docs, vocab_size)
        df = (counts > 0).sum(0).float()
        features = torch.argsort(counts.sum(0), descending=True)[:max_features]
        features = features[df[features] > 0].sort().values
        n = len(docs)
        idf = torch.log((1 + n) / (1 + df[features])) + 1
        tfidf = _rows_normalised(counts[:, features] * idf)
        dim = max(1, min(dim, len(features), n))
        torch.manual_seed(seed)                                  # svd_lowrank draws a random projection
        _, _, v = torch.svd_lowrank(tfidf, q=dim, niter=6)
        cl = cls(features, idf, v, torch.zeros(0, dim), vocab_size)
        centres, labels = balanced_kmeans(cl.embed_counts(counts), k, iters, seed)
        cl.centres = centres
        return cl, labels

    def embed_counts(self, counts: Tensor) -> Tensor:
        """(N, V) token counts -> (N, D) L2-normalised embeddings."""
        return _rows_normalised(_rows_normalised(counts[:, self.features] * self.idf) @ self.components)

    def embed(self, docs: Sequence[np.ndarray]) -> Tensor:
        """(N, D) embeddings of token-id documents (an empty document embeds to zeros)."""
        return self.embed_counts(token_counts(docs, self.vocab_size))

    def distances(self, emb: Tensor) -> Tensor:
        """(N, K) Euclidean distances to the centres."""
        return torch.cdist(emb, self.centres)

    def assign(self, emb: Tensor) -> Tensor:
        """Nearest centre of each embedding (N,)."""
        return self.distances(emb).argmin(1)

    @property
    def k(self) -> int:
        return self.centres.shape[0]

    def save(self, path: str | Path) -> Path:
        """``path/clusters.safetensors`` + ``path/clusters.json``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {"features": self.features, "idf": self.idf, "components": self.components.contiguous(),
                   "centres": self.centres.contiguous()}
        atomic_write(path / "clusters.safetensors", lambda tmp: save_file(tensors, tmp))
        atomic_write_text(path / "clusters.json", json.dumps({"vocab_size": self.vocab_size, "k": self.k,
                                                               "dim": self.components.shape[1]}))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Clusterer:
        path = Path(path)
        if not (path / "clusters.json").is_file():
            raise FileNotFoundError(f"no clusters.json in {path}")
        meta = json.loads((path / "clusters.json").read_text())
        t = load_file(str(path / "clusters.safetensors"))
        return cls(t["features"], t["idf"], t["components"], t["centres"], int(meta["vocab_size"]))


def _rows_normalised(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
