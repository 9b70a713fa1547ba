"""Chunked cross-entropy: the training loss without a float32 copy of the whole logits tensor.

``F.cross_entropy(logits.float(), y)`` on bf16 logits keeps three full (N, V) tensors alive: the bf16 logits,
their float32 copy and the float32 log-softmax saved for the backward pass (GPT-2's 50,304-entry vocabulary
at B=12, T=1024: 1.2 + 2.5 + 2.5 GB). :func:`chunked_cross_entropy` reads the logits in row chunks, upcasts one
chunk at a time, and keeps only the logits and one float32 log-sum-exp per row for the backward pass, which
writes the gradient ``softmax - onehot`` chunk by chunk straight into a tensor of the logits' dtype. The value is
the same sum of per-row ``logsumexp(z) - z[y]`` in the upcast dtype (float32, or float64 for float64 logits),
so it is exact up to the order of floating-point additions.

:func:`lm_loss` is the trainer's whole loss step (summed NLL, the objective with optional label smoothing, the
correct-prediction count) in one function. Eager, it takes the chunked path above. Under ``torch.compile``
(``train.compile``) the plain float32 cross-entropy is written instead: Inductor fuses the upcast into its
log-sum-exp and gradient kernels, so no float32 copy is materialised either, and the loss and the argmax read the
logits in a few fused passes instead of a Python loop of chunks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

CHUNK_ELEMENTS = 1 << 26      # automatic chunk: about 64M logits (256 MB as float32)
# train.compile_loss=auto compiles lm_loss from this vocabulary size up. Measured where it pays: GPT-2's 50,304
# (H100, trainer step 29.3 ms compiled vs 43.8 ms chunked, two runs). A 65-character vocabulary keeps the eager
# loss (a few small kernels a step), since the loss graph's cold compile took 6.5 s on the 2-core CPU (GPU not timed).
COMPILED_LOSS_MIN_VOCAB = 1024


def chunk_rows(n_rows: int, vocab: int, chunk_size: int = 0) -> int:
    """Rows per chunk: ``chunk_size`` if > 0, else as many as fit ``CHUNK_ELEMENTS`` logits (at least 1)."""
    rows = chunk_size if chunk_size > 0 else max(1, CHUNK_ELEMENTS // max(vocab, 1))
    return max(1, min(rows, n_rows))


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, rows: int, ignore_index: int) -> Tensor:  # noqa: ANN001
        compute = torch.promote_types(logits.dtype, torch.float32)
        lse = torch.empty(logits.shape[0], dtype=compute, device=logits.device)
        total = torch.zeros((), dtype=compute, device=logits.device)
        for i in range(0, logits.shape[0], rows):
            z, t = logits[i:i + rows].to(compute), target[i:i + rows]
            valid = t != ignore_index
            lse[i:i + rows] = torch.logsumexp(z, dim=-1)
            picked = z.gather(1, torch.where(valid, t, 0).unsqueeze(1)).squeeze(1)
            total += torch.where(valid, lse[i:i + rows] - picked, 0).sum()
        ctx.save_for_backward(logits, target, lse)
        ctx.rows, ctx.ignore_index = rows, ignore_index
        return total

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:  # noqa: ANN001
        logits, target, lse = ctx.saved_tensors
        rows = ctx.rows
        out = torch.empty_like(logits)
        for i in range(0, logits.shape[0], rows):
            z, t = logits[i:i + rows].to(lse.dtype), target[i:i + rows]
            valid = t != ctx.ignore_index
            p = torch.exp(z - lse[i:i + rows].unsqueeze(1))
            p.scatter_add_(1, torch.where(valid, t, 0).unsqueeze(1), -torch.ones_like(p[:, :1]))
            out[i:i + rows] = p * (valid.unsqueeze(1) * grad)
        return out, None, None, None


def chunked_cross_entropy(logits: Tensor, target: Tensor, chunk_size: int = 0, ignore_index: int = -100) -> Tensor:
    """Summed next-token NLL of ``logits`` (N, V) against ``target`` (N,), ``ignore_index`` skipped; equals
    ``F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="sum")`` in value and gradient.
    ``chunk_size``: rows per chunk (0 = automatic)."""
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(f"chunked_cross_entropy: logits (N, V) and target (N,), got {tuple(logits.shape)} and "
                         f"{tuple(target.shape)}")
    return _ChunkedCrossEntropy.apply(logits, target, chunk_rows(logits.shape[0], logits.shape[1], chunk_size),
                                      ignore_index)


def lm_loss(logits: Tensor, target: Tensor, label_smoothing: float = 0.0,
            chunk_size: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """``(nll, objective, correct)`` of ``logits`` (N, V) against ``target`` (N,) (-100 ignored): the summed NLL, the
    summed training objective (the NLL, or the label-smoothed cross-entropy) and the number of targets the argmax
    predicts. Eager: ``chunked_cross_entropy`` (``chunk_size`` rows per chunk); traced by ``torch.compile``: the same
    sums as one fused float32 cross-entropy."""
    if torch.compiler.is_compiling():
        nll = F.cross_entropy(logits.float(), target, ignore_index=-100, reduction="sum")
    else:
        nll = chunked_cross_entropy(logits, target, chunk_size)
    objective = nll if not label_smoothing else F.cross_entropy(
        logits.float(), target, ignore_index=-100, reduction="sum", label_smoothing=label_smoothing)
    correct = ((logits.argmax(-1) == target) & (target != -100)).sum()
    return nll, objective, correct
