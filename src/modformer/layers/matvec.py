"""Linear layers as matrix-vector reductions for small-batch compiled decoding.

At batch 1 a decode step's linears are matrix-vector products: memory-bound, a few microseconds each, and cuBLAS
runs them with GEMM tiles that leave most of the memory bandwidth unused. Inside ``matvec_linears()``, every
``F.linear`` (so every ``nn.Linear``) whose input has at most ``max_rows`` rows is written as a broadcast product
summed in float32; under ``torch.compile`` Inductor turns it into one reduction kernel per linear, with the bias
and the following pointwise ops (activation, residual add, dtype cast) fused into it. Eager callers gain nothing
(the broadcast product is materialised); ``GraphDecoder`` compiles its step inside it (``decode_linear="matvec"``).

The sum runs in float32 as cuBLAS's does, so the result differs from ``F.linear`` only in summation order.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode


def matvec(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` as ``(x[..., None, :] * weight).sum(-1)`` in float32 (products of bfloat16
    inputs are exact in float32; Inductor fuses the casts, so nothing float32 is materialised when compiled)."""
    y = (x.unsqueeze(-2).float() * weight.float()).sum(-1)
    if bias is not None:
        y = y + bias
    return y.to(x.dtype)


class matvec_linears(TorchFunctionMode):  # noqa: N801  (used as a context manager, like torch.no_grad)
    """Inside, ``F.linear`` on inputs of at most ``max_rows`` rows runs as ``matvec``; larger inputs (a prefill)
    keep ``F.linear``."""

    def __init__(self, max_rows: int = 4) -> None:
        super().__init__()
        self.max_rows = max_rows

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 (torch's protocol)
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if x.numel() // max(x.shape[-1], 1) <= self.max_rows:
                return matvec(x, weight, bias)
        return func(*args, **kwargs)
