"""FP8 training of linear layers (``train.precision: fp8``) with ``torch._scaled_mm``.

Each of the three matmuls of a linear layer (forward ``x W^T``, input gradient ``g W``, weight gradient
``g^T x``) quantises both operands to FP8 along the contracted dimension with a dynamic scale (the current
absolute maximum maps to the format's largest finite value), multiplies them with ``torch._scaled_mm``
(FP8 inputs, FP32 accumulation, bf16 output) and unscales in the same call. Forward operands are e4m3
(3 mantissa bits); gradients are e5m2 (2 mantissa bits, wider range) or e4m3, chosen by the recipe.
The high-precision input is kept for the backward pass (as bf16 autocast would keep it), so each matmul
quantises along its own contraction dimension: with ``rowwise`` scaling every row of each operand has its
own scale, with ``tensorwise`` one scale per operand.

``convert_to_float8(model)`` swaps, at model build time, every ``nn.Linear`` whose two sizes are multiples of
16 (``_scaled_mm``'s requirement; a character vocabulary of 65 stays bf16) to :class:`Float8Linear`: the same
module, parameters, tying and state-dict keys, another ``forward``. Everything else (embeddings, norms,
attention, softmax, optimizer) is untouched and runs in bf16 autocast as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
SCALINGS = ("tensorwise", "rowwise")


@dataclass(frozen=True)
class Float8Recipe:
    """How a :class:`Float8Linear` quantises: ``scaling`` tensorwise | rowwise; ``grad_dtype`` of gradients."""

    scaling: str = "tensorwise"
    grad_dtype: torch.dtype = E5M2

    def __post_init__(self) -> None:
        if self.scaling not in SCALINGS:
            raise ValueError(f"Float8Recipe.scaling must be one of {', '.join(SCALINGS)}, got {self.scaling!r}")
        if self.grad_dtype not in (E4M3, E5M2):
            raise ValueError(f"Float8Recipe.grad_dtype must be float8_e4m3fn or float8_e5m2, got {self.grad_dtype}")


RECIPES = {"tensorwise": Float8Recipe("tensorwise", E5M2), "rowwise": Float8Recipe("rowwise", E4M3)}


def quantize(x: Tensor, dtype: torch.dtype, rowwise: bool) -> tuple[Tensor, Tensor]:
    """``(q, inv_scale)`` with ``x ~= q.float() * inv_scale``: ``q`` in FP8 ``dtype``, the absolute maximum (of each
    row if ``rowwise``, shape (rows, 1); else of the whole tensor, a scalar) scaled to the format's largest value."""
    top = torch.finfo(dtype).max
    a = x.detach().abs()
    amax = (a.amax(dim=-1, keepdim=True) if rowwise else a.amax()).float().clamp(min=1e-12)
    scale = top / amax
    q = (x.float() * scale).clamp(-top, top).to(dtype)
    return q, scale.reciprocal()


def fp8_mm(a: Tensor, b: Tensor, a_dtype: torch.dtype, b_dtype: torch.dtype, rowwise: bool,
           out_dtype: torch.dtype) -> Tensor:
    """``a @ b.T`` for ``a`` (M, K) and ``b`` (N, K), both quantised along K, through ``torch._scaled_mm``."""
    qa, sa = quantize(a.contiguous(), a_dtype, rowwise)
    qb, sb = quantize(b.contiguous(), b_dtype, rowwise)
    return torch._scaled_mm(qa, qb.t(), scale_a=sa, scale_b=sb.t() if rowwise else sb, out_dtype=out_dtype)


class _Float8Matmul(torch.autograd.Function):
    """``x @ w.T`` with all three matmuls in FP8; ``x`` (M, K) in the compute dtype, ``w`` (N, K) the master weight.

    Tensorwise, one scale serves every contraction dimension, so ``x``, ``w`` and the gradient are each quantised
    once and the backward reads the saved FP8 copies (transposed in FP8, one byte per element); rowwise, each
    matmul quantises its operands along its own contraction dimension from the saved high-precision ``x``."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, recipe: Float8Recipe) -> Tensor:  # noqa: ANN001
        ctx.recipe, ctx.dtypes = recipe, (x.dtype, w.dtype)
        if recipe.scaling == "rowwise":
            ctx.save_for_backward(x, w)
            return fp8_mm(x, w, E4M3, E4M3, True, x.dtype)
        qx, sx = quantize(x, E4M3, False)
        qw, sw = quantize(w, E4M3, False)
        ctx.save_for_backward(qx, sx, qw, sw)
        return torch._scaled_mm(qx, qw.t(), scale_a=sx, scale_b=sw, out_dtype=x.dtype)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, Tensor, None]:  # noqa: ANN001
        r, (x_dtype, w_dtype) = ctx.recipe, ctx.dtypes
        g = g.contiguous()
        if r.scaling == "rowwise":
            x, w = ctx.saved_tensors
            gx = fp8_mm(g, w.t(), r.grad_dtype, E4M3, True, x_dtype)            # (M, N) @ (N, K)
            gw = fp8_mm(g.t(), x.t(), r.grad_dtype, E4M3, True, x_dtype)        # (N, M) @ (M, K)
            return gx, gw.to(w_dtype), None
        qx, sx, qw, sw = ctx.saved_tensors
        qg, sg = quantize(g, r.grad_dtype, False)
        # _scaled_mm takes a row-major first and a column-major second operand
        gx = torch._scaled_mm(qg, qw.t().contiguous().t(), scale_a=sg, scale_b=sw, out_dtype=x_dtype)
        gw = torch._scaled_mm(qg.t().contiguous(), qx.t().contiguous().t(), scale_a=sg, scale_b=sx, out_dtype=x_dtype)
        return gx, gw.to(w_dtype), None


def float8_linear(x: Tensor, weight: Tensor, bias: Tensor | None, recipe: Float8Recipe) -> Tensor:
    """``F.linear`` with FP8 matmuls; the compute dtype is autocast's when it is on, else ``x``'s. Shapes that
    ``_scaled_mm`` cannot take (a row count not a multiple of 16, e.g. a ragged evaluation batch) use ``F.linear``."""
    dev = x.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] % 16 or x2.shape[0] == 0:
        return F.linear(x, weight, bias)
    with torch.autocast(dev, enabled=False):
        y = _Float8Matmul.apply(x2.to(dtype), weight, recipe)
        if bias is not None:
            y = y + bias.to(dtype)
    return y.reshape(*x.shape[:-1], weight.shape[0])


class Float8Linear(nn.Linear):
    """An ``nn.Linear`` whose matmuls run in FP8 (made by :func:`convert_to_float8`; same parameters and keys)."""

    fp8_recipe: Float8Recipe = RECIPES["tensorwise"]

    def forward(self, x: Tensor) -> Tensor:
        return float8_linear(x, self.weight, self.bias, self.fp8_recipe)


def fp8_eligible(m: nn.Module) -> bool:
    return type(m) is nn.Linear and m.in_features % 16 == 0 and m.out_features % 16 == 0


def convert_to_float8(model: nn.Module, recipe: Float8Recipe | str = "tensorwise") -> list[str]:
    """Swap every eligible ``nn.Linear`` of ``model`` to :class:`Float8Linear` in place; returns their names."""
    recipe = RECIPES[recipe] if isinstance(recipe, str) else recipe
    names = []
    for name, m in model.named_modules():
        if fp8_eligible(m):
            m.__class__ = Float8Linear
            m.fp8_recipe = recipe
            names.append(name)
    return names


def fp8_supported(device: torch.device) -> tuple[bool, str]:
    """Whether ``device`` runs FP8 matmuls (CUDA compute capability >= 8.9) and what it is, for error messages.

    ``MODFORMER_FP8_CPU=1`` admits the CPU (``_scaled_mm``'s reference CPU kernel: tests and toy runs only)."""
    import os

    if device.type == "cuda":
        cc = torch.cuda.get_device_capability(device)
        return cc >= (8, 9), f"{torch.cuda.get_device_name(device)} (compute capability {cc[0]}.{cc[1]})"
    if device.type == "cpu" and os.environ.get("MODFORMER_FP8_CPU") == "1":
        return True, "cpu (MODFORMER_FP8_CPU=1)"
    return False, device.type


def check_fp8(device: torch.device, precision: str = "fp8") -> None:
    """ConfigError naming ``train.precision`` unless ``device`` runs FP8 matmuls."""
    from modformer.config import ConfigError

    ok, what = fp8_supported(device)
    if not ok:
        raise ConfigError(f"train.precision={precision} needs a CUDA GPU of compute capability >= 8.9 (Ada, Hopper or "
                          f"newer); this run's device is {what}; use train.precision=bf16")
