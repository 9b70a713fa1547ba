"""Importance scores of attention heads, FFN neurons and whole layers.

Masks act through the hook points, so the model is never edited: a head mask multiplies
``blocks.i.attn.hook_z`` ``(B, H, T, Dh)`` per head, a neuron mask multiplies
``blocks.i.mlp.hook_post`` ``(B, T, F)``, a layer mask scales both sublayer outputs.

* gradient (Michel et al. 2019): I_h = E_batch |dL/dxi_h| at xi = 1 (a first-order estimate of the
  loss change when unit h is removed); head scores are L2-normalised per layer, as in the paper.
* ablation: loss with the unit zeroed minus the unmasked loss (exact, one forward per unit).
* l0 (heads; Voita et al. 2019): the trained location ``log_alpha`` of a hard-concrete gate per head
  (``compress/l0.py``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Batches = Iterable[tuple[Tensor, Tensor]]


def head_counts(model: nn.Module) -> list[int]:
    return [b.attn.n_head for b in model.blocks]


def ffn_widths(model: nn.Module) -> list[int]:
    """Hidden width of each block's FFN (0 for attention-only blocks)."""
    return [b.mlp.down.in_features if b.mlp is not None else 0 for b in model.blocks]


@contextmanager
def masked(model: nn.Module, heads: list[Tensor] | None = None, neurons: list[Tensor] | None = None,
           layers: Tensor | None = None) -> Iterator[None]:
    """Multiply per-head outputs / FFN hidden units / whole sublayer outputs by the given masks."""
    handles = []

    def scale(mask: Tensor, shape: tuple[int, ...]):
        return lambda x, _hook: x * mask.view(shape).to(x.dtype)

    try:
        for i, block in enumerate(model.blocks):
            if heads is not None:
                handles.append(block.attn.hook_z.add_hook(scale(heads[i], (1, -1, 1, 1))))
            if neurons is not None and block.mlp is not None:
                handles.append(block.mlp.hook_post.add_hook(scale(neurons[i], (1, 1, -1))))
            if layers is not None:
                handles.append(block.hook_attn_out.add_hook(scale(layers[i], (1, 1, 1))))
                if block.mlp is not None:
                    handles.append(block.hook_mlp_out.add_hook(scale(layers[i], (1, 1, 1))))
        yield
    finally:
        for h in handles:
            h.remove()


def batch_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    logits = model(x)
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-100)


@torch.no_grad()
def mean_loss(model: nn.Module, batches: Batches) -> float:
    total, n = 0.0, 0
    for x, y in batches:
        logits = model(x)
        total += float(F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-100,
                                       reduction="sum"))
        n += int((y != -100).sum())
    return total / max(n, 1)


def _gradient_scores(model: nn.Module, batches: Batches, kind: str) -> list[Tensor]:
    sizes = head_counts(model) if kind == "heads" else ffn_widths(model)
    masks = [torch.ones(n, requires_grad=True) for n in sizes]
    scores = [torch.zeros(n) for n in sizes]
    was_training = model.training
    model.eval()
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        with masked(model, **{kind: masks}):
            for x, y in batches:
                loss = batch_loss(model, x, y)
                grads = torch.autograd.grad(loss, [m for m in masks if m.numel()], allow_unused=True)
                it = iter(grads)
                for i, m in enumerate(masks):
                    if m.numel():
                        g = next(it)
                        if g is not None:
                            scores[i] += g.abs()
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    return scores


def head_importance(model: nn.Module, batches: Batches, method: str = "gradient",
                    normalize: bool = True, **options: object) -> list[Tensor]:
    """One score per head and layer (higher = more important): ``gradient``, ``ablation`` or ``l0``
    (``options`` go to ``l0.train_head_gates``: steps, lam, lr, joint, ...)."""
    batches = list(batches)
    if method == "l0":
        from modformer.compress.l0 import gate_scores

        return gate_scores(model, batches, **options)
    if method == "gradient":
        scores = _gradient_scores(model, batches, "heads")
        if normalize:
            scores = [s / s.norm().clamp_min(1e-12) for s in scores]
        return scores
    if method == "ablation":
        base = mean_loss(model, batches)
        counts = head_counts(model)
        scores = [torch.zeros(n) for n in counts]
        for i, n in enumerate(counts):
            for h in range(n):
                masks = [torch.ones(c) for c in counts]
                masks[i][h] = 0.0
                with masked(model, heads=masks):
                    scores[i][h] = mean_loss(model, batches) - base
        return scores
    raise ValueError(f"unknown head importance method {method!r}; allowed: gradient, ablation, l0")


def neuron_importance(model: nn.Module, batches: Batches, method: str = "gradient") -> list[Tensor]:
    """One score per FFN hidden unit and layer: ``gradient`` (|dL/dm|) or ``magnitude``
    (||up row|| * ||down column||)."""
    if method == "gradient":
        return _gradient_scores(model, list(batches), "neurons")
    if method == "magnitude":
        out = []
        for b in model.blocks:
            if b.mlp is None:
                out.append(torch.zeros(0))
                continue
            out.append((b.mlp.up.weight.norm(dim=1) * b.mlp.down.weight.norm(dim=0)).detach())
        return out
    raise ValueError(f"unknown neuron importance method {method!r}; allowed: gradient, magnitude")


def layer_importance(model: nn.Module, batches: Batches) -> Tensor:
    """Loss increase when a whole block is skipped (both sublayer outputs zeroed)."""
    batches = list(batches)
    base = mean_loss(model, batches)
    n = len(model.blocks)
    scores = torch.zeros(n)
    for i in range(n):
        mask = torch.ones(n)
        mask[i] = 0.0
        with masked(model, layers=mask):
            scores[i] = mean_loss(model, batches) - base
    return scores
