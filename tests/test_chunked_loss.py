"""Chunked cross-entropy (train/loss.py) equals F.cross_entropy in value and gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from modformer.train.loss import chunk_rows, chunked_cross_entropy, lm_loss


@pytest.mark.parametrize("chunk", [0, 1, 7, 64, 1000])
def test_chunked_cross_entropy_float64_value_and_gradient(chunk):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(50, 33, generator=g, dtype=torch.float64) * 4).requires_grad_(True)
    target = torch.randint(0, 33, (50,), generator=g)
    target[::7] = -100                                          # ignored rows
    ref_logits = logits.detach().clone().requires_grad_(True)
    w = torch.randn((), generator=g, dtype=torch.float64)       # an upstream gradient other than 1
    (chunked_cross_entropy(logits, target, chunk) * w).backward()
    value = chunked_cross_entropy(logits.detach(), target, chunk)
    ref = F.cross_entropy(ref_logits, target, ignore_index=-100, reduction="sum")
    (ref * w).backward()
    # float64, 50 rows of 33 terms: summation-order differences are ~1e-15 relative
    assert torch.allclose(value, ref.detach(), rtol=1e-12, atol=0)
    assert torch.allclose(logits.grad, ref_logits.grad, rtol=1e-12, atol=1e-14)
    assert torch.all(logits.grad[::7] == 0)


def test_chunked_cross_entropy_bf16_logits_keep_dtype_and_match_float32_path():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 50, generator=g).to(torch.bfloat16).requires_grad_(True)
    target = torch.randint(0, 50, (64,), generator=g)
    ref_logits = logits.detach().clone().requires_grad_(True)
    chunked_cross_entropy(logits, target, 16).backward()
    F.cross_entropy(ref_logits.float(), target, reduction="sum").backward()
    assert logits.grad.dtype == torch.bfloat16
    # both compute softmax - onehot in float32 from the same bf16 logits and round once to bf16: equal to the
    # last bf16 bit (2^-8 relative) where float32 summation order rounds differently
    assert torch.allclose(logits.grad.float(), ref_logits.grad.float(), rtol=2 ** -8, atol=1e-7)


def test_chunk_rows_and_bad_shapes():
    assert chunk_rows(12288, 50304) == (1 << 26) // 50304
    assert chunk_rows(10, 65) == 10 and chunk_rows(10, 65, 3) == 3
    with pytest.raises(ValueError, match=r"logits \(N, V\)"):
        chunked_cross_entropy(torch.zeros(2, 3, 4), torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_lm_loss_compiled_equals_eager_chunked_and_float64(smoothing):
    """The trainer's loss step: eager (chunked) and compiled (Inductor's fused cross-entropy) give the float64 sums,
    the same correct count and the same logits gradient, with ignored rows and bf16 logits."""
    g = torch.Generator().manual_seed(2)
    base = (torch.randn(96, 40, generator=g) * 3).to(torch.bfloat16)
    target = torch.randint(0, 40, (96,), generator=g)
    target[::5] = -100
    ref = base.double().requires_grad_(True)
    nll_ref = F.cross_entropy(ref, target, ignore_index=-100, reduction="sum")
    obj_ref = F.cross_entropy(ref, target, ignore_index=-100, reduction="sum", label_smoothing=smoothing)
    obj_ref.backward()
    correct_ref = ((base.argmax(-1) == target) & (target != -100)).sum()
    compiled = torch.compile(lm_loss, dynamic=False)
    for fn in (lm_loss, compiled):
        logits = base.clone().requires_grad_(True)
        nll, obj, correct = fn(logits, target, smoothing, 16)
        obj.backward()
        # float32 sums of 77 rows of 40 terms: relative error ~ 1e-6; the gradient rounds once to bf16 (2^-8)
        assert torch.allclose(nll.double(), nll_ref.detach(), rtol=1e-5, atol=0)
        assert torch.allclose(obj.double(), obj_ref.detach(), rtol=1e-5, atol=0)
        assert int(correct) == int(correct_ref)
        assert logits.grad.dtype == torch.bfloat16
        assert torch.allclose(logits.grad.double(), ref.grad, rtol=2 ** -8, atol=1e-6)
        assert torch.all(logits.grad[::5] == 0)
