"""GroupedMuon (train/muon.py): torch's Muon with the Newton–Schulz iteration batched over same-shape matrices."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("torch.optim._muon", reason="torch.optim.Muon needs PyTorch >= 2.9")
from modformer.train.muon import GroupedMuon, adjusted_lr, orthogonalize  # noqa: E402

COEF, STEPS, EPS = (3.4445, -4.775, 2.0315), 5, 1e-7
SHAPES = [(48, 16), (16, 48), (16, 16), (16, 16), (32, 16), (16, 48)]   # tall and wide of one shape share a batch


def reference_ns(g: torch.Tensor) -> torch.Tensor:
    """Muon's iteration on one matrix, float64, written out (Jordan et al. 2024; torch's coefficients)."""
    a, b, c = COEF
    x = g.double()
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=EPS)
    for _ in range(STEPS):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def reference_muon_steps(weights, grads_per_step, lr, wd, momentum, fn):
    """Nesterov-momentum Muon with decoupled weight decay, one matrix at a time, float64."""
    ws = [w.double().clone() for w in weights]
    bufs = [torch.zeros_like(w) for w in ws]
    for grads in grads_per_step:
        for w, buf, g in zip(ws, bufs, grads):
            g = g.double()
            buf.mul_(momentum).add_(g, alpha=1 - momentum)                  # lerp_(g, 1 - momentum)
            update = g * (1 - momentum) + buf * momentum                    # nesterov: g.lerp(buf, momentum)
            w.mul_(1 - lr * wd).add_(reference_ns(update), alpha=-adjusted_lr(lr, fn, tuple(w.shape)))
    return ws


def test_orthogonalize_batch_equals_each_matrix_in_float64():
    torch.manual_seed(0)
    g = torch.randn(5, 16, 40, dtype=torch.float64)
    got = orthogonalize(g, COEF, STEPS, EPS, dtype=torch.float64)
    for i in range(5):
        torch.testing.assert_close(got[i], reference_ns(g[i]), rtol=1e-10, atol=1e-12)
    s = torch.linalg.svdvals(got[0])            # the quintic's fixed band: singular values pushed into ~[0.5, 1.5]
    assert s.min() > 0.3 and s.max() < 1.5


@pytest.mark.parametrize("tensor_lr", [False, True])
@pytest.mark.parametrize("fn", ["match_rms_adamw", "original"])
def test_grouped_muon_matches_the_algorithm_in_float64(fn, tensor_lr):
    """Three steps on mixed shapes (tall, wide, square, repeated): the batched step equals the per-matrix
    float64 reference, so stacking, transposes, per-shape learning rates and weight decay are right. With a tensor
    learning rate (train.cuda_graph writes it in place) the step reads it from the tensor and equals the same."""
    torch.manual_seed(1)
    weights = [torch.randn(s, dtype=torch.float64) for s in SHAPES]
    grads = [[torch.randn(s, dtype=torch.float64) for s in SHAPES] for _ in range(3)]
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    opt = GroupedMuon(params, lr=0.5, weight_decay=0.1, momentum=0.95, adjust_lr_fn=fn)
    opt.param_groups[0]["lr"] = torch.tensor(0.02, dtype=torch.float64) if tensor_lr else 0.02
    opt.ns_dtype = torch.float64
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    want = reference_muon_steps(weights, grads, 0.02, 0.1, 0.95, fn)
    for p, w in zip(params, want):
        torch.testing.assert_close(p.detach(), w, rtol=1e-10, atol=1e-12)


def test_adjusted_lr_is_torchs_rule():
    from torch.optim._muon import _adjust_lr
    for fn in (None, "original", "match_rms_adamw"):
        for shape in ((48, 16), (16, 48), (16, 16)):
            assert math.isclose(adjusted_lr(0.01, fn, shape), _adjust_lr(0.01, fn, torch.Size(shape)))


def test_grouped_muon_matches_torch_muon_in_bfloat16():
    """The default bfloat16 iteration against torch.optim.Muon over 3 steps, on each matrix's total displacement.
    A batched and a single matmul may sum in another order; each of the iteration's 15 bf16 matmuls rounds at 2^-8
    relative, so to first order the two displacements differ by at most 15 * 2^-8 (~6%) of their size. A wrong
    transpose, per-shape learning rate (>= 39% here) or momentum breaks that bound; on a CPU the two are equal."""
    torch.manual_seed(2)
    weights = [torch.randn(s) for s in SHAPES]
    a = [torch.nn.Parameter(w.clone()) for w in weights]
    b = [torch.nn.Parameter(w.clone()) for w in weights]
    ref = torch.optim.Muon(a, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    opt = GroupedMuon(b, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    for _ in range(3):
        for p, q, s in zip(a, b, SHAPES):
            p.grad = torch.randn(s)
            q.grad = p.grad.clone()
        ref.step()
        opt.step()
    for w, p, q in zip(weights, a, b):
        moved = p.detach() - w
        assert (q.detach() - p.detach()).norm() <= 15 * 2**-8 * moved.norm()


class _CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm,
                                   torch.ops.aten.baddbmm):
            self.n += 1
        return func(*args, **(kwargs or {}))


def test_grouped_muon_launches_one_iteration_per_shape():
    """6 matrices of 3 wide shapes with the trainer's per-shape lr rule: 3 batched iterations of 3 matmuls x 5
    steps, against 6 x 15 in torch's Muon. (Under the "original" rule a tall and a wide matrix of one shape get
    different learning rates, hence batches of their own.)"""
    params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    for p in params:
        p.grad = torch.randn_like(p)
    counts = {}
    for name, cls in (("grouped", GroupedMuon), ("torch", torch.optim.Muon)):
        opt = cls(params, lr=0.02, adjust_lr_fn="match_rms_adamw")
        with _CountMatmuls() as mode:
            opt.step()
        counts[name] = mode.n
    assert counts == {"grouped": 3 * 3 * STEPS, "torch": len(SHAPES) * 3 * STEPS}


def test_grouped_muon_state_dict_round_trips_with_torch_muon():
    """Same state layout as torch's Muon: a checkpoint of either continues in the other identically."""
    torch.manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    opt = GroupedMuon(params, lr=0.02)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    other = torch.optim.Muon([torch.nn.Parameter(p.detach().clone()) for p in params], lr=0.02)
    other.load_state_dict(opt.state_dict())
    back = GroupedMuon([torch.nn.Parameter(p.detach().clone()) for p in params], lr=0.02)
    back.load_state_dict(other.state_dict())
    for i in range(len(SHAPES)):
        torch.testing.assert_close(back.state_dict()["state"][i]["momentum_buffer"],
                                   opt.state_dict()["state"][i]["momentum_buffer"], rtol=0, atol=0)


def test_trainer_muon_uses_torch_muon_by_default_and_grouped_on_request():
    import modformer as mf
    from modformer.config import TrainConfig
    from modformer.train.optim import muon

    model = mf.build_model(mf.ModelConfig(vocab_size=17, n_layer=2, n_head=2, d_model=16, max_seq_len=8))
    assert type(muon(model, TrainConfig(optimizer="muon")).muon) is torch.optim.Muon
    grouped = muon(model, TrainConfig(optimizer="muon", optimizer_options={"muon_grouped": True})).muon
    assert type(grouped) is GroupedMuon
    with pytest.raises(mf.ConfigError, match="muon_grouped"):
        muon(model, TrainConfig(optimizer="muon", optimizer_options={"muon_grouped": "yes"}))
