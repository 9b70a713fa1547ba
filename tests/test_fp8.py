"""FP8 linear layers (train/fp8.py) against float64 references, with bounds derived from the formats.

Round to nearest in a format with m mantissa bits errs by at most 2^-(m+1) of the value for normal numbers
(e4m3: m=3 -> 2^-4; e5m2: m=2 -> 2^-3) and by half the subnormal spacing below the smallest normal (e4m3:
spacing 2^-9 -> 2^-10; e5m2: 2^-16 -> 2^-17), in scaled units. Scaling and unscaling in float32 add 2^-23 or so
(covered by 2^-22). A product sum_k a_k b_k of quantised operands with |da| <= Ea, |db| <= Eb then errs by at most
sum_k Ea|b| + |a|Eb + Ea Eb, plus float32 accumulation (K * 2^-24 of sum |a||b|).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import modformer as mf
from modformer.config import RunConfig, TrainConfig
from modformer.registry import ConfigError
from modformer.train.fp8 import (
    E4M3,
    E5M2,
    RECIPES,
    Float8Linear,
    Float8Recipe,
    convert_to_float8,
    float8_linear,
    fp8_mm,
    quantize,
)

FORMAT = {E4M3: (2.0 ** -4, 2.0 ** -10), E5M2: (2.0 ** -3, 2.0 ** -17)}   # (relative, subnormal absolute) error


def error_bound(x: torch.Tensor, dtype: torch.dtype, rowwise: bool) -> torch.Tensor:
    """Elementwise bound on |dequantised - x| (float64), per the module docstring."""
    rel, sub = FORMAT[dtype]
    a = x.double().abs()
    amax = a.amax(dim=-1, keepdim=True) if rowwise else a.amax()
    inv_scale = amax / torch.finfo(dtype).max
    return (rel + 2.0 ** -22) * a + sub * inv_scale


def product_bound(a: torch.Tensor, b: torch.Tensor, ea: torch.Tensor, eb: torch.Tensor) -> torch.Tensor:
    """Bound on |fp8(a) @ fp8(b).T - a @ b.T| for (M, K) and (N, K) operands with elementwise errors ea, eb."""
    aa, bb = a.double().abs(), b.double().abs()
    k = a.shape[1]
    return ea @ bb.T + aa @ eb.T + ea @ eb.T + k * 2.0 ** -24 * (aa + ea) @ (bb + eb).T


def operands(m: int, k: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, k, generator=g) * torch.logspace(-3, 1, k)          # wide dynamic range across columns
    b = torch.randn(n, k, generator=g) * 0.02
    return a, b


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
@pytest.mark.parametrize("rowwise", [False, True])
def test_quantize_within_format_error_and_uses_the_full_range(dtype, rowwise):
    a, _ = operands(32, 64, 16)
    q, inv = quantize(a, dtype, rowwise)
    assert q.dtype == dtype and inv.shape == ((32, 1) if rowwise else ())
    err = (q.double() * inv.double() - a.double()).abs()
    assert (err <= error_bound(a, dtype, rowwise)).all()
    top = torch.finfo(dtype).max
    peaks = q.float().abs().amax(dim=-1) if rowwise else q.float().abs().amax()
    assert torch.all(peaks == top)                          # the absolute maximum maps to the largest finite value


@pytest.mark.parametrize("rowwise", [False, True])
def test_scaled_mm_product_within_bound_of_float64(rowwise):
    a, b = operands(48, 64, 32)
    out = fp8_mm(a, b, E4M3, E4M3, rowwise, torch.float32)
    ref = a.double() @ b.double().T
    bound = product_bound(a, b, error_bound(a, E4M3, rowwise), error_bound(b, E4M3, rowwise))
    assert ((out.double() - ref).abs() <= bound).all()
    # and it is the product of the dequantised operands (the scales are applied exactly once)
    qa, sa = quantize(a, E4M3, rowwise)
    qb, sb = quantize(b, E4M3, rowwise)
    deq = (qa.double() * sa.double()) @ (qb.double() * sb.double()).T
    acc = 64 * 2.0 ** -24 * (qa.double().abs() * sa.double()) @ (qb.double().abs() * sb.double()).T
    assert ((out.double() - deq).abs() <= acc + 2.0 ** -22 * deq.abs()).all()


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_float8_linear_forward_and_backward_within_bound(recipe):
    r = RECIPES[recipe]
    rowwise = r.scaling == "rowwise"
    x, w = operands(32, 64, 48, seed=1)
    x.requires_grad_(True)
    w.requires_grad_(True)
    bias = torch.randn(48, requires_grad=True)
    y = float8_linear(x, w, bias, r)
    g = torch.randn(32, 48, generator=torch.Generator().manual_seed(2))
    (y * g).sum().backward()
    xd, wd, gd = x.detach().double(), w.detach().double(), g.double()
    ex, ew = error_bound(x, E4M3, rowwise), error_bound(w, E4M3, rowwise)
    assert ((y.detach().double() - (xd @ wd.T + bias.detach().double())).abs()
            <= product_bound(x.detach(), w.detach(), ex, ew) + 2.0 ** -23 * (xd @ wd.T).abs()).all()
    # input gradient g @ w: g quantised in the grad format along N, w^T in e4m3 along N
    wt = w.detach().T.contiguous()
    bound_gx = product_bound(g, wt, error_bound(g, r.grad_dtype, rowwise), error_bound(wt, E4M3, rowwise))
    assert ((x.grad.double() - gd @ wd).abs() <= bound_gx).all()
    # weight gradient g^T @ x: both quantised along M
    gt, xt = g.T.contiguous(), x.detach().T.contiguous()
    bound_gw = product_bound(gt, xt, error_bound(gt, r.grad_dtype, rowwise), error_bound(xt, E4M3, rowwise))
    assert ((w.grad.double() - gd.T @ xd).abs() <= bound_gw).all()
    assert torch.allclose(bias.grad, g.sum(0))


def test_float8_linear_falls_back_for_ragged_rows_and_keeps_bf16_under_autocast():
    lin = torch.nn.Linear(32, 16)
    convert_to_float8(lin)
    assert isinstance(lin, Float8Linear)
    x = torch.randn(5, 32)                                   # 5 rows: not a multiple of 16 -> plain F.linear
    assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lin(torch.randn(2, 8, 32)).dtype == torch.bfloat16


def test_convert_keeps_keys_tying_and_skips_odd_sizes():
    model = mf.build_model(mf.ModelConfig(vocab_size=65, n_layer=1, d_model=32, n_head=2, max_seq_len=16))
    keys = list(model.state_dict())
    names = convert_to_float8(model, Float8Recipe("rowwise", E4M3))
    assert "lm_head" not in names and any("mlp" in n or "ffn" in n for n in names)    # vocab 65 stays bf16
    assert list(model.state_dict()) == keys
    tied = mf.build_model(mf.ModelConfig(vocab_size=64, n_layer=1, d_model=32, n_head=2, max_seq_len=16,
                                         tie_embeddings=True))
    assert "lm_head" in convert_to_float8(tied) and tied.lm_head.weight is tied.tok_emb.weight


def test_precision_fp8_needs_a_capable_gpu(monkeypatch, tmp_path):
    from modformer.train.trainer import Trainer

    monkeypatch.delenv("MODFORMER_FP8_CPU", raising=False)
    cfg = RunConfig(name="fp8", out_dir=str(tmp_path), model=mf.ModelConfig(n_layer=1, d_model=32, n_head=2),
                    train=TrainConfig(steps=2, device="cpu", precision="fp8", progress=False, tensorboard=False))
    cfg.data.name = "modular_arithmetic"
    with pytest.raises(ConfigError, match=r"train\.precision=fp8 needs a CUDA GPU of compute capability >= 8\.9"):
        Trainer(cfg)
    with pytest.raises(ConfigError, match="train.precision"):
        TrainConfig(precision="fp16").validate()
    with pytest.raises(ConfigError, match="train.dtype=float32"):
        TrainConfig(precision="fp8", dtype="float32").validate()


def test_precision_fp8_trains_on_the_cpu_reference_kernel(monkeypatch, tmp_path):
    """MODFORMER_FP8_CPU=1 runs the FP8 path on _scaled_mm's CPU kernel: the swap happens and losses are finite."""
    from modformer.train.trainer import Trainer

    monkeypatch.setenv("MODFORMER_FP8_CPU", "1")
    cfg = RunConfig(name="fp8", out_dir=str(tmp_path), model=mf.ModelConfig(n_layer=1, d_model=32, n_head=2),
                    train=TrainConfig(steps=3, device="cpu", precision="fp8", progress=False, tensorboard=False,
                                      eval_every=3, eval_batches=1, sample_tokens=0, batch_size=32))
    tr = Trainer(cfg)
    assert tr.dtype == torch.bfloat16
    assert any(isinstance(m, Float8Linear) for m in tr.raw_model.modules())
    summary = tr.fit()
    assert summary["steps"] == 3 and torch.isfinite(torch.tensor(summary["final_val_loss"]))


def test_float8_linear_traces_into_one_graph():
    """torch.compile(fullgraph=True) takes the FP8 layer whole (no graph break) and matches eager forward and
    backward (aot_eager: the same ops, no code generation)."""
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 32))
    convert_to_float8(mlp)
    x = torch.randn(4, 16, 32)

    def loss(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return mlp(x).float().square().mean()

    eager = loss(x)
    eager.backward()
    grads = [p.grad.clone() for p in mlp.parameters()]
    mlp.zero_grad()
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)(x)
    compiled.backward()
    assert torch.equal(compiled, eager)
    assert all(torch.equal(p.grad, g) for p, g in zip(mlp.parameters(), grads))


def test_tensorwise_backward_reuses_one_quantisation_of_each_operand():
    """Tensorwise, the saved FP8 copies give the gradients the per-matmul quantisation gives (one scale per tensor,
    whatever the contraction dimension): the backward need not re-quantise ``x`` and ``w``."""
    r = RECIPES["tensorwise"]
    x, w = operands(32, 64, 48, seed=3)
    x.requires_grad_(True)
    w.requires_grad_(True)
    y = float8_linear(x, w, None, r)
    g = torch.randn(32, 48, generator=torch.Generator().manual_seed(4))
    y.backward(g)
    xd, wd = x.detach(), w.detach()
    assert torch.equal(y.detach(), fp8_mm(xd, wd, E4M3, E4M3, False, torch.float32))
    assert torch.equal(x.grad, fp8_mm(g, wd.t(), r.grad_dtype, E4M3, False, torch.float32))
    assert torch.equal(w.grad, fp8_mm(g.t(), xd.t(), r.grad_dtype, E4M3, False, torch.float32))
