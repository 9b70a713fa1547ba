"""Depth-weighted averaging (DenseFormer, Pagliardini et al. 2024, "DenseFormer: Enhancing Information
Flow in Transformers via Depth Weighted Averaging").

After block ``i`` (0-based) the stream handed to the next block is a learned combination of the
embedding output ``X_0`` and every block output so far ``X_1 .. X_{i+1}``::

    y_i = sum_j alpha_{i,j} X_j        (X_j: outputs of the blocks themselves, not earlier averages)

The weights start at the identity (``alpha_{i,i+1} = 1``, the rest 0), so an untrained DenseFormer
computes exactly the plain model. ``dilation`` k keeps only ``X_j`` with ``(i + 1 - j) % k == 0`` and
``period`` p places a DWA module only after every p-th block (the paper's k x p variants; the last
block always gets one so every model ends with an average).

GPT option: ``model.model_options: {denseformer: true, dwa_dilation: 1, dwa_period: 1}``.
Parameters (k = p = 1): ``sum_{i=0}^{L-1} (i + 2) = L (L + 3) / 2`` scalars; in general the number of
kept ``X_j`` summed over the blocks that have a DWA module.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class DepthWeightedAverage(nn.Module):
    """One weight vector per DWA site; ``forward(i, history)`` averages the kept outputs."""

    def __init__(self, n_layer: int, dilation: int = 1, period: int = 1) -> None:
        super().__init__()
        if dilation < 1 or period < 1:
            raise ValueError(f"DenseFormer dilation and period must be >= 1, got {dilation}, {period}")
        self.sources: dict[int, list[int]] = {}
        weights = {}
        for i in range(n_layer):
            if (i + 1) % period and i != n_layer - 1:
                continue
            src = [j for j in range(i + 2) if (i + 1 - j) % dilation == 0]
            self.sources[i] = src
            w = torch.zeros(len(src))
            w[-1] = 1.0                                   # identity: the newest output only
            weights[str(i)] = nn.Parameter(w)
        self.alphas = nn.ParameterDict(weights)

    def forward(self, i: int, history: list[Tensor]) -> Tensor:
        """``history`` = [X_0, ..., X_{i+1}] (each (B, T, D)); returns the stream for block i + 1."""
        src = self.sources.get(i)
        if src is None:
            return history[-1]
        w = self.alphas[str(i)].to(history[-1].dtype)
        out = w[0] * history[src[0]]
        for a, j in zip(w[1:], src[1:]):
            out = out + a * history[j]
        return out
