"""The grokking mechanism of modular addition: Fourier analysis, key frequencies, restricted/excluded loss.

Nanda et al. (2023), "Progress measures for grokking via mechanistic interpretability": a network that
has grokked ``a + b mod p`` embeds tokens on a few circles (key frequencies w_k = 2 pi k / p) and
computes logits ~ sum_k alpha_k cos(w_k (a + b - c)). Hence

- the token embedding W_E (rows 0..p-1) is sparse in the Fourier basis over tokens;
- for each output c, the logits as a function of (a, b) live in span{cos(w_k (a+b)), sin(w_k (a+b))};
- restricted loss: the loss when the logits keep only those key-frequency directions (plus each
  output's constant); it falls when the mechanism forms (before test accuracy jumps);
- excluded loss: the training loss when exactly those directions are removed; it rises as the
  model comes to rely on them.

Inputs follow the ``modular`` task: ``[a, b, =]`` with '=' the token p, answer predicted at the last
position. ``sign=-1`` analyses ``a - b`` instead.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def fourier_basis(p: int) -> tuple[Tensor, list[str], Tensor]:
    """Orthonormal basis ``(p, p)`` over 0..p-1 (rows: constant, cos 1, sin 1, cos 2, ...), names, frequencies."""
    x = torch.arange(p, dtype=torch.float64)
    rows, names, freqs = [torch.ones(p, dtype=torch.float64)], ["const"], [0]
    for k in range(1, p // 2 + 1):
        for kind, fn in (("cos", torch.cos), ("sin", torch.sin)):
            v = fn(2 * math.pi * k * x / p)
            if v.norm() < 1e-6:                     # sin(pi x) for even p
                continue
            rows.append(v)
            names.append(f"{kind} {k}")
            freqs.append(k)
    basis = torch.stack(rows)
    return basis / basis.norm(dim=1, keepdim=True), names, torch.tensor(freqs)


def frequency_norms(W: Tensor) -> Tensor:
    """Norm per frequency ``(p // 2 + 1,)`` (index 0 = constant) of a ``(p, D)`` table over tokens 0..p-1."""
    p = W.shape[0]
    basis, _, freqs = fourier_basis(p)
    coef = basis @ W.double()                                        # (p, D)
    energy = torch.zeros(p // 2 + 1, dtype=torch.float64).index_add_(0, freqs, coef.pow(2).sum(-1))
    return energy.sqrt().float()


def key_frequencies(norms: Tensor, k: int | None = None, factor: float = 10.0) -> list[int]:
    """Dominant frequencies (>= 1): the top ``k``, or those whose energy exceeds ``factor`` x the median
    energy (most frequencies carry only noise, so the median is the noise floor)."""
    energy = norms[1:].double().pow(2)
    order = energy.argsort(descending=True)
    if k is not None:
        chosen = order[:k].tolist()
    else:
        floor = energy.median().clamp_min(1e-30)
        chosen = [int(i) for i in order if energy[i] > factor * floor]
    return sorted(int(i) + 1 for i in chosen)


def embedding_key_frequencies(model: nn.Module, p: int, k: int | None = None) -> list[int]:
    """Key frequencies of the token embedding rows 0..p-1."""
    return key_frequencies(frequency_norms(model.tok_emb.weight.detach()[:p]), k)


def modular_inputs(p: int, device: torch.device | str = "cpu") -> Tensor:
    """All ``(p * p, 3)`` inputs ``[a, b, =]``, a-major (row a * p + b)."""
    a, b = torch.cartesian_prod(torch.arange(p), torch.arange(p)).unbind(1)
    return torch.stack([a, b, torch.full_like(a, p)], 1).to(device)


@torch.no_grad()
def modular_logits(model: nn.Module, p: int, batch: int = 4096) -> Tensor:
    """Logits ``(p, p, p)`` over the p answers for every (a, b)."""
    was_training = model.training
    model.eval()
    idx = modular_inputs(p, model.tok_emb.weight.device)
    out = torch.cat([model(idx[i:i + batch])[:, -1, :p].float() for i in range(0, len(idx), batch)])
    model.train(was_training)
    return out.view(p, p, p).cpu()


def _sum_directions(p: int, freqs: list[int], sign: int = 1) -> Tensor:
    """Orthonormal ``(p * p, 2 * len(freqs))`` columns cos/sin(w_k (a + sign * b)), a-major."""
    a, b = torch.cartesian_prod(torch.arange(p), torch.arange(p)).double().unbind(1)
    cols = []
    for k in freqs:
        theta = 2 * math.pi * k * (a + sign * b) / p
        for v in (torch.cos(theta), torch.sin(theta)):
            if v.norm() > 1e-6:
                cols.append(v / v.norm())
    return torch.stack(cols, 1) if cols else torch.zeros(p * p, 0, dtype=torch.float64)


def logit_frequency_norms(logits: Tensor, sign: int = 1) -> Tensor:
    """Norm ``(p // 2 + 1,)`` of the logits along cos/sin(w (a + b)) for each frequency (index 0 = constant)."""
    p = logits.shape[0]
    L = logits.reshape(p * p, -1).double()
    out = [L.mean(0).norm() * p]
    for k in range(1, p // 2 + 1):
        U = _sum_directions(p, [k], sign)
        out.append((U.T @ L).norm())
    return torch.stack(out).float()


def _labels(p: int, sign: int) -> Tensor:
    a, b = torch.cartesian_prod(torch.arange(p), torch.arange(p)).unbind(1)
    return (a + sign * b) % p


def _loss(logits: Tensor, labels: Tensor, mask: Tensor | None) -> float:
    ce = F.cross_entropy(logits.float(), labels, reduction="none")
    return float(ce[mask.flatten()].mean() if mask is not None else ce.mean())


def restricted_loss(logits: Tensor, freqs: list[int], mask: Tensor | None = None, sign: int = 1) -> float:
    """Loss with the logits projected onto the key-frequency directions (+ each output's mean)."""
    p = logits.shape[0]
    L = logits.reshape(p * p, -1).double()
    U = _sum_directions(p, freqs, sign)
    kept = L.mean(0, keepdim=True) + U @ (U.T @ L)
    return _loss(kept, _labels(p, sign), mask)


def excluded_loss(logits: Tensor, freqs: list[int], mask: Tensor | None = None, sign: int = 1) -> float:
    """Loss with the key-frequency directions removed from the logits (use the training ``mask``)."""
    p = logits.shape[0]
    L = logits.reshape(p * p, -1).double()
    U = _sum_directions(p, freqs, sign)
    return _loss(L - U @ (U.T @ L), _labels(p, sign), mask)


def train_mask(train_x: Tensor, p: int) -> Tensor:
    """Boolean ``(p, p)`` marking the (a, b) pairs of a modular task's training inputs ``(N, 3)``."""
    mask = torch.zeros(p, p, dtype=torch.bool)
    mask[train_x[:, 0].cpu(), train_x[:, 1].cpu()] = True
    return mask


def fourier_report(model: nn.Module, p: int, mask: Tensor | None = None, k: int | None = None,
                   sign: int = 1) -> dict:
    """Key frequencies (embedding and logits), full/restricted/excluded loss; ``mask`` = training pairs."""
    logits = modular_logits(model, p)
    emb = frequency_norms(model.tok_emb.weight.detach()[:p])
    lnorm = logit_frequency_norms(logits, sign)
    keys = key_frequencies(lnorm, k)
    labels = _labels(p, sign)
    out = {"p": p, "key_frequencies": keys, "embedding_key_frequencies": key_frequencies(emb, k),
           "embedding_norms": emb.tolist(), "logit_norms": lnorm.tolist(),
           "loss": _loss(logits.reshape(p * p, -1), labels, None),
           "restricted_loss": restricted_loss(logits, keys, None, sign),
           "excluded_loss": excluded_loss(logits, keys, mask, sign)}
    if mask is not None:
        out["train_loss"] = _loss(logits.reshape(p * p, -1), labels, mask)
        out["test_loss"] = _loss(logits.reshape(p * p, -1), labels, ~mask)
    return out
