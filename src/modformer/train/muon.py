"""Muon with its Newton–Schulz orthogonalisation batched over matrices of one shape.

``torch.optim.Muon`` orthogonalises one matrix at a time (momentum, normalisation, 5 Newton–Schulz iterations of 3
matmuls, the update): on the speedrun config's 24 hidden matrices one optimizer step dispatches 698 aten ops, each a
kernel launch on a GPU. ``GroupedMuon`` is
``torch.optim.Muon`` (same constructor, parameter groups, state and ``state_dict``) whose ``step`` stacks the
matrices that share a shape once oriented wide (rows <= columns: a (1536, 384) and a (384, 1536) weight share one
batch when their learning rates agree), runs the same iteration with batched matmuls and updates the parameters
with foreach ops: 218 aten ops on that config (2-core CPU count, ``optimizer_options.muon_grouped: true``). A tensor
learning rate is read on the device only, so the step can be captured in a CUDA graph (``train.cuda_graph``).

The iteration is Muon's (Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks"), with
torch's defaults: the quintic coefficients (3.4445, -4.775, 2.0315), 5 steps in bfloat16, Frobenius
normalisation first, the learning rate adjusted per shape by ``adjust_lr_fn`` as torch documents it.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import Tensor


def orthogonalize(g: Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                  dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Newton–Schulz approximation of the orthogonal factor of each matrix in ``g`` ``(n, A, B)``, A <= B
    (``n`` wide matrices; the caller transposes tall ones), computed in ``dtype``."""
    a, b, c = coefficients
    x = g.to(dtype)
    x = x / x.flatten(1).norm(dim=1).clamp(min=eps)[:, None, None]    # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: tuple[int, int]) -> float:
    """Muon's per-shape learning rate (``torch.optim.Muon``'s ``adjust_lr_fn``): "original" (or None) scales by
    sqrt(max(1, A / B)), "match_rms_adamw" by 0.2 sqrt(max(A, B)) (Moonshot's rule), anything else by 1."""
    rows, cols = shape
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1.0, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr


class GroupedMuon(torch.optim.Muon):
    """``torch.optim.Muon`` whose step batches the Newton–Schulz iteration over same-shape matrices (module doc).
    ``ns_dtype``: the iteration's dtype (bfloat16 as torch's; tests set float64 to compare with a reference)."""

    ns_dtype: torch.dtype = torch.bfloat16

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201 - torch.optim.Optimizer's signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, bufs = [], [], []
            self._init_group(group, params, grads, bufs)
            if not params:
                continue
            if any(g.ndim != 2 for g in grads):
                raise ValueError("Muon updates 2-D matrices only; got a gradient of another rank")
            momentum, lr = group["momentum"], group["lr"]
            on_device = isinstance(lr, Tensor)   # train.cuda_graph: read on the device, never by the host
            if not on_device:
                lr = float(lr)
            torch._foreach_lerp_(bufs, grads, 1 - momentum)
            updates = torch._foreach_lerp(grads, bufs, momentum) if group["nesterov"] else bufs
            batches: dict[tuple, list[int]] = defaultdict(list)     # one batch per wide shape and step size
            for i, p in enumerate(params):
                rows, cols = p.shape
                step = adjusted_lr(1.0 if on_device else lr, group["adjust_lr_fn"], (rows, cols))
                batches[(min(rows, cols), max(rows, cols), p.device, p.dtype, step)].append(i)
            if group["weight_decay"]:
                torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
            for (*_, dtype, step), idx in batches.items():
                tall = [params[i].shape[0] > params[i].shape[1] for i in idx]
                g = torch.stack([updates[i].mT if t else updates[i] for i, t in zip(idx, tall)])
                x = orthogonalize(g, group["ns_coefficients"], group["ns_steps"], group["eps"], self.ns_dtype)
                x = x.to(dtype)
                outs = [x[j].mT if t else x[j] for j, t in enumerate(tall)]
                targets = [params[i] for i in idx]
                if on_device:                 # step is the shape's factor; the learning rate multiplies in here
                    torch._foreach_add_(targets, torch._foreach_mul(outs, -step * lr))
                else:
                    torch._foreach_add_(targets, outs, alpha=-step)
        return loss
