"""matvec_linears: small-batch linears as float32-accumulated reductions (compiled batch-1 decoding)."""

import torch
import torch.nn.functional as F

from modformer.layers.matvec import matvec, matvec_linears


def test_matvec_equals_a_float64_linear() -> None:
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(2, 1, 96, generator=g), torch.randn(40, 96, generator=g), torch.randn(40, generator=g)
    ref = F.linear(x.double(), w.double(), b.double())
    # float32 products summed in float32 over 96 terms of size ~1: error ~ sqrt(96) * 2^-24 * |terms|
    torch.testing.assert_close(matvec(x, w, b).double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(matvec(x, w).double(), ref - b.double(), rtol=1e-5, atol=1e-5)
    # bfloat16 inputs: accumulated in float32, rounded once at the end (one bf16 ulp of the result)
    y = matvec(x.bfloat16(), w.bfloat16(), b.bfloat16())
    ref16 = F.linear(x.bfloat16().double(), w.bfloat16().double(), b.bfloat16().double())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), ref16, rtol=2 ** -8, atol=2 ** -8 * ref16.abs().max().item())


def test_the_mode_rewrites_small_inputs_only() -> None:
    """Inside the mode an nn.Linear on <= max_rows rows takes the reduction (its result then equals ``matvec``
    bitwise); a larger input keeps F.linear (bitwise equal to outside the mode)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    small, big = torch.randn(1, 2, 64), torch.randn(3, 5, 64)
    with torch.no_grad(), matvec_linears(max_rows=2):
        out_small, out_big = lin(small), lin(big)
    with torch.no_grad():
        assert torch.equal(out_small, matvec(small, lin.weight, lin.bias))
        assert torch.equal(out_big, lin(big))
        torch.testing.assert_close(out_small, lin(small), rtol=1e-5, atol=1e-5)


def test_a_model_step_inside_the_mode_keeps_its_logits() -> None:
    """A cached one-token GPT step inside the mode gives the ordinary step's logits (summation order only)."""
    import modformer as mf

    torch.manual_seed(0)
    model = mf.build_model(mf.ModelConfig(vocab_size=50, d_model=32, n_layer=2, n_head=4, max_seq_len=16)).eval()
    x = torch.randint(0, 50, (1, 9))
    with torch.no_grad():
        ref = model(x)[:, -1]
        cache = model.new_cache(1)
        model(x[:, :8], cache=cache)
        with matvec_linears():
            step = model(x[:, 8:], cache=cache)[:, -1]
    torch.testing.assert_close(step, ref, rtol=1e-5, atol=1e-5)
