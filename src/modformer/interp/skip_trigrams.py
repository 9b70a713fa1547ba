"""Skip-trigrams of a head: ``source ... destination -> output`` triples read off its QK and OV circuits.

A one-layer attention head implements "when the destination token is d, attend to earlier source token
s and raise the logit of output o" (Elhage et al. 2021). QK[d, s] says how much d attends to s, OV[s, o]
how attending to s changes o's logit. Both circuits are standardised (their exact mean and std come
from the factors) and a triple scores ``z_QK[d, s] + z_OV[s, o]``. Sources are processed in chunks, so
only ``chunk x V`` slices of each circuit are ever formed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from modformer.interp.circuits import ov_circuit, qk_circuit
from modformer.interp.weights import ModelWeights


@dataclass
class SkipTrigram:
    src: int
    dest: int
    out: int
    qk: float      # standardised QK score of (dest, src)
    ov: float      # standardised OV score of (src, out)

    @property
    def score(self) -> float:
        return self.qk + self.ov

    def text(self, decode: Callable[[list[int]], str] | None = None) -> str:
        name = (lambda i: decode([i])) if decode else str
        return f"{name(self.src)} ... {name(self.dest)} -> {name(self.out)}"


def skip_trigrams(w: ModelWeights, layer: int, head: int, k: int = 20, per_source: int = 3,
                  chunk: int = 1024, sources: list[int] | None = None) -> list[SkipTrigram]:
    """The ``k`` highest-scoring triples of head (layer, head); ``per_source`` dests x outs per source."""
    qk, ov = qk_circuit(w)[layer, head], ov_circuit(w)[layer, head]
    qk_mu, qk_sd = qk.mean(), qk.std().clamp_min(1e-12)
    ov_mu, ov_sd = ov.mean(), ov.std().clamp_min(1e-12)
    V = w.W_E.shape[0]
    src_all = torch.tensor(sources) if sources is not None else torch.arange(V)
    cands: list[SkipTrigram] = []
    for start in range(0, len(src_all), chunk):
        src = src_all[start:start + chunk]
        q = (qk.cols(src) - qk_mu) / qk_sd                         # (V_dest, c)
        o = (ov.rows(src) - ov_mu) / ov_sd                         # (c, V_out)
        n = min(per_source, V)
        qv, qi = q.topk(n, dim=0)                                  # (n, c)
        ovv, oi = o.topk(n, dim=1)                                 # (c, n)
        best = qv[0] + ovv[:, 0]                                   # (c,) best triple per source
        keep = best.topk(min(k, len(src))).indices
        for j in keep.tolist():
            for a in range(n):
                for b in range(n):
                    cands.append(SkipTrigram(int(src[j]), int(qi[a, j]), int(oi[j, b]),
                                             float(qv[a, j]), float(ovv[j, b])))
    cands.sort(key=lambda t: -t.score)
    return cands[:k]
