"""Density of sparse attention (exact pair counts, tuning to a density), the gate's block choice, the issue-25
metrics and the forward+backward timing's plumbing."""

from __future__ import annotations

import pytest
import torch

import modformer as mf
from modformer.bench import fidelity
from modformer.compress.distill import build_student
from modformer.layers.attention import density as dn
from modformer.layers.attention.kernels import AttnSpec, eager_attention

V = 29


def _model(attention: str = "mha", options: dict | None = None, t: int = 80) -> torch.nn.Module:
    cfg = mf.ModelConfig(vocab_size=V, n_layer=1, d_model=16, n_head=2, max_seq_len=t, attn_backend="eager")
    teacher = mf.build_model(cfg).eval()
    if attention == "mha":
        return teacher
    return build_student(teacher, {"attention": attention, "attention_options": options or {}}).eval()


@pytest.mark.parametrize("family", list(dn.FAMILIES))
def test_pattern_pairs_count_exactly_what_the_module_keeps(family: str) -> None:
    """The closed forms / distance counts equal the pairs of the module's own dense keep-mask."""
    t = 77
    kind, free, defaults = dn.FAMILIES[family]
    for value in (1, 5, 13, 40, 77, 100):
        opts = {**defaults(t), free: value}
        attn = _model(kind, opts, t).blocks[0].attn
        pos = torch.arange(t)
        want = int(attn.keep_mask(pos, pos).sum())
        assert dn.pattern_pairs(kind, opts, t) == want


@pytest.mark.parametrize("family", list(dn.FAMILIES))
@pytest.mark.parametrize("target", [0.05, 0.25, 0.5, 0.75])
def test_tune_picks_the_closest_density(family: str, target: float) -> None:
    """The bisection returns the value whose density is closest to the target among every value 1..T."""
    t = 97
    kind, free, defaults = dn.FAMILIES[family]
    opts = dn.tune(family, t, target)
    err = abs(dn.pattern_density(kind, opts, t) - target)
    best = min(abs(dn.pattern_density(kind, {**defaults(t), free: v}, t) - target) for v in range(1, t + 1))
    assert err == pytest.approx(best, abs=1e-12)
    assert {k: v for k, v in opts.items() if k != free} == defaults(t)


def test_tune_rejects_bad_input() -> None:
    with pytest.raises(mf.ConfigError, match="unknown sparse family"):
        dn.tune("windw", 64, 0.25)
    with pytest.raises(mf.ConfigError, match="density"):
        dn.tune("window", 64, 0.0)


@pytest.mark.parametrize("top_k", [1, 2, 3, 9])
def test_gate_pairs_match_the_gate_keep_mask(top_k: int) -> None:
    """The closed-form count of the top-k gate equals the pairs of its token-level keep-mask (T not a multiple of
    the block), for any input."""
    t, block = 70, 16
    student = _model("learned_gate", {"block_size": block, "top_k": top_k}, t)
    student(torch.randint(0, V, (2, t)))
    attn = student.blocks[0].attn
    keep = attn.last_keep if attn.last_keep is not None else torch.ones(2, 2, 5, 5, dtype=torch.bool)
    qb = torch.arange(keep.shape[2])
    per_head = attn._dense_keep(keep, qb, 0, t, t).sum((-1, -2))
    assert (per_head == dn.gate_pairs(t, block, top_k)).all()
    k = dn.gate_top_k(t, block, 0.3)
    assert dn.gate_density(t, block, k) <= 0.3 < dn.gate_density(t, block, k + 1)


def test_gate_top_k_picks_the_highest_mass_blocks() -> None:
    """Keys of block b all point along the query direction with strength c_b: the dense attention's mass per
    block is ordered as c_b, and the (identity-initialised) gate keeps exactly the top_k - 1 heaviest past blocks."""
    t, block, dh, top_k = 64, 8, 8, 3
    cfg = mf.ModelConfig(vocab_size=V, n_layer=1, d_model=dh, n_head=1, max_seq_len=t)
    from modformer.layers.attention.gate import LearnedGateAttention

    gate = LearnedGateAttention(cfg, 0, block_size=block, top_k=top_k)
    u = torch.zeros(dh)
    u[0] = 1.0
    strength = torch.tensor([0.3, 2.0, 0.1, 1.5, 0.7, 1.9, 0.2, 1.0])          # per key block
    k = (strength.repeat_interleave(block)[:, None] * u).view(1, 1, t, dh)
    q = u.expand(1, 1, t, dh).clone()
    _, keep, qb, past = gate.gate(q, k, 0, t)
    _, probs = eager_attention(q, k, k, AttnSpec(causal=True), need_weights=True)
    mass = probs[0, 0].view(t // block, block, t // block, block).sum((1, 3))   # (query block, key block)
    for j in range(t // block):
        heaviest = mass[j, :j].argsort(descending=True)[: top_k - 1]
        want = torch.zeros(t // block, dtype=torch.bool)
        want[heaviest] = True
        want[j] = True
        assert torch.equal(keep[0, 0, j], want), j


def test_attention_metrics_on_hand_computed_cases() -> None:
    """All-pairs MSE counts a dropped pair with the teacher's probability; kept mass is the teacher's mass there."""
    teacher = torch.tensor([[1.0, 0.0], [0.5, 0.5]]).view(1, 1, 2, 2)
    student = torch.tensor([[1.0, 0.0], [1.0, 0.0]]).view(1, 1, 2, 2)          # drops pair (1, 1)
    assert fidelity.attn_prob_mse_all(teacher, student) == pytest.approx((0.25 + 0.25) / 3)
    assert fidelity.kept_mass(teacher, student) == pytest.approx((1.0 + 0.5) / 2)
    assert fidelity.attn_prob_mse_all(teacher, teacher) == 0.0


def test_headline_reports_the_gate_against_the_best_fixed_pattern() -> None:
    rows = [{"method": "gate", "attention": "learned_gate", "kl": 0.01, "density": 0.2, "attn_mse_all": 1e-5,
             "grad_cos": 0.9},
            {"method": "window", "attention": "sliding_window", "kl": 0.04},
            {"method": "sink", "attention": "sink_window", "kl": 0.02},
            {"method": "performer", "attention": "performer", "kl": 0.005}]
    speed = [{"T": 4096, "mask": "learned_gate", "speedup": 2.0, "gate_overhead": 0.3},
             {"T": 16384, "mask": "learned_gate", "speedup": 5.0, "gate_overhead": 0.1},
             {"T": 16384, "mask": "learned_gate", "speedup": 4.0, "gate_overhead": 0.2},   # another flex mode
             {"T": 16384, "mask": "sink4_window829", "speedup": 7.0}]
    memory = [{"model": "student", "method": "gate", "train_reduction_vs_sdpa": 0.05, "peak_mem_reduction": 0.4}]
    h = fidelity.headline_of(rows, [], memory, speed, seq_len=4096)
    assert h["method"] == "gate" and h["kl"] == 0.01 and h["kl_ratio_vs_best_fixed"] == pytest.approx(0.5)
    assert h["best_fixed_method"] == "sink" and h["lowest_kl_method"] == "performer"
    assert (h["attn_fwd_bwd_speedup_4k"], h["attn_fwd_bwd_speedup_16k"], h["gate_overhead"]) == (2.0, 5.0, 0.1)
    assert h["peak_mem_reduction_vs_sdpa"] == 0.05 and h["seq_len"] == 4096 and h["attn_mse"] == 1e-5


@pytest.mark.parametrize("compile_gate", [False, True])
def test_fwd_bwd_speed_runs_on_cpu(compile_gate: bool) -> None:
    """CPU plumbing of the timing (dense keep-mask reference there): rows per T, densities as tuned; the compiled
    gate is timed beside the eager one."""
    from modformer.bench.sparse_speed import fwd_bwd_speed

    rows = fwd_bwd_speed([64], [0.3], torch.device("cpu"), heads=1, head_dim=8, block=16, tokens=64, iters=1,
                         compile_gate=compile_gate, flex_modes=("default", "max-autotune-no-cudagraphs"))
    assert [r["flex_mode"] for r in rows] == ["default"] * 2 + ["max-autotune-no-cudagraphs"] * 2
    rows = rows[:2]
    gate = rows[1]
    assert gate["gate_compiled"] is compile_gate and gate["gate_eager_ms"] > 0
    assert gate["density"] == dn.gate_density(64, 16, gate["top_k"]) <= 0.3
    fixed = dn.tune("sink", 64, gate["density"])
    assert [r["mask"] for r in rows] == [f"sink4_window{fixed['window']}", "learned_gate"]
    assert gate["speedup"] > 0 and gate["gate_overhead"] > 0 and not gate["block_skipping"]


def test_student_spec_matches_every_family_to_the_gate_density() -> None:
    """--density D: the gate keeps the most blocks within D, each fixed family is tuned to the gate's exact density,
    a method's own key=value wins, other kinds' options are not inherited, performer is left alone."""
    from modformer.bench.studies.sparse_density import spec_density, student_spec

    t, block = 512, 32
    base = {"attention": "learned_gate", "attn_backend": "flex",
            "attention_options": {"block_size": block, "top_k": 2, "gate_loss": 1.0}}
    gate = student_spec("gate", {}, base, t, 0.25, block)
    want = dn.gate_density(t, block, gate["attention_options"]["top_k"])
    assert want <= 0.25 < dn.gate_density(t, block, gate["attention_options"]["top_k"] + 1)
    assert spec_density(gate, t) == want and gate["attn_backend"] == "flex"
    for fam in dn.FAMILIES:
        spec = student_spec(fam, {}, base, t, 0.25, block)
        assert "top_k" not in spec["attention_options"] and spec["attention_options"]["block_size"] == block
        assert spec["attention_options"] == {**dn.tune(fam, t, want), "block_size": block}
    strided = student_spec("strided", {"stride": 7}, base, t, 0.25, block)
    assert strided["attention_options"]["stride"] == 7
    assert strided["attention_options"]["window"] == dn.tune("strided", t, want, stride=7)["window"]
    assert student_spec("window", {"window": 5}, base, t, None, block)["attention_options"] == {
        "block_size": block, "window": 5}
    assert student_spec("performer", {}, base, t, 0.25, block)["attention_options"] == {}


def test_density_curve_is_saved_point_by_point_and_resumed(tmp_path, monkeypatch) -> None:
    """A curve cut off after its first point keeps that point in the JSON; ``--resume`` measures only the rest."""
    import json

    from modformer.bench.studies import sparse_density as sd
    from modformer.bench.studies import sparse_fidelity

    argv = ["--quick", "--methods", "window", "--teacher-steps", "10", "--distill-steps", "1", "--curve", "0.25",
            "0.5", "--set", "eval_batches=1", "--out", str(tmp_path)]
    real, calls = sd.spec_density, []

    def cut_off(spec: dict, seq_len: int) -> float | None:
        calls.append(spec)
        if len(calls) == 3:                 # 1: the distilled window student, 2: curve point 0.25, 3: point 0.5
            raise RuntimeError("cut off")
        return real(spec, seq_len)

    monkeypatch.setattr(sd, "spec_density", cut_off)
    sparse_fidelity.main(argv)
    first = json.loads((tmp_path / "sparse_fidelity.json").read_text())["density_curve"]
    assert [r.get("target") for r in first] == [0.25, None] and "cut off" in first[1]["error"]

    monkeypatch.setattr(sd, "spec_density", real)
    sparse_fidelity.main([*argv, "--resume"])
    saved = json.loads((tmp_path / "sparse_fidelity.json").read_text())
    second = saved["density_curve"]
    assert [r["target"] for r in second] == [0.25, 0.5]
    assert saved["curve_gate_vs_best_fixed"] == []          # a window-only curve has no gate to compare
    assert second[0] == first[0]            # kept, not measured again
    assert 0.4 < second[1]["density"] <= 0.5

    sparse_fidelity.main([*argv, "--resume", "--curve-steps", "1"])      # other steps: measured anew, not mixed
    third = json.loads((tmp_path / "sparse_fidelity.json").read_text())["density_curve"]
    assert [(r["target"], r["steps"]) for r in third] == [(0.25, 1), (0.5, 1)]


def test_gate_vs_best_fixed_divides_by_the_lowest_fixed_kl_at_each_target() -> None:
    from modformer.bench.studies.sparse_density import gate_vs_best_fixed

    rows = [{"family": "gate", "target": 0.25, "density": 0.21, "kl": 0.02},
            {"family": "window", "target": 0.25, "density": 0.25, "kl": 0.05},
            {"family": "dilated", "target": 0.25, "density": 0.25, "kl": 0.04},
            {"family": "performer", "target": 0.25, "density": None, "kl": 0.001},    # not a fixed mask family
            {"family": "window", "target": 0.5, "density": 0.5, "kl": 0.01},       # no gate point: left out
            {"family": "gate", "target": 0.75, "density": 0.73, "kl": 0.002}]       # no fixed point: left out
    (row,) = gate_vs_best_fixed(rows)
    assert row["target"] == 0.25 and row["best_fixed"] == "dilated"
    assert row["kl_ratio"] == 0.02 / 0.04 and row["gate_density"] == 0.21


def test_memory_steps_measure_inference_in_eval_mode(monkeypatch) -> None:
    """The inference peak is an eval-mode forward (no gate target computed); the training step runs the target."""
    from modformer.bench.studies.sparse_fidelity import memory_steps
    from modformer.layers.attention.gate import LearnedGateAttention

    student = _model("learned_gate", {"block_size": 16, "top_k": 2}, t=64).train()
    targets = []
    real = LearnedGateAttention._gate_target_loss

    def spy(self, *args):
        targets.append(self.training)
        return real(self, *args)

    monkeypatch.setattr(LearnedGateAttention, "_gate_target_loss", spy)
    x = torch.randint(0, V, (2, 64))
    step, infer = memory_steps(student, x, x)
    infer()
    assert targets == [] and student.training            # eval forward, train mode restored
    step()
    assert targets == [True]
    assert all(p.grad is None for p in student.parameters())    # the step leaves no gradients behind


def test_saved_for_backward_attributes_bytes_to_where_they_were_saved() -> None:
    """The eager backend saves its (B, H, T, T) probabilities inside the attention module's own forward; the loss
    saves its float32 log-softmax outside the model; frozen weights drop out of ``trainable_params``. The hooks are
    removed afterwards and no HookPoint is switched on (which would change the attention path)."""
    model = _model(t=64).train()                    # eager attention, 1 layer, 2 heads, float32
    x = torch.randint(0, V, (3, 64))

    def forward() -> None:
        torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())

    saved = fidelity.saved_for_backward(model, forward)
    assert saved["attention_core"] >= 3 * 2 * 64 * 64 * 4                 # the probabilities, float32
    assert saved["outside"] >= 3 * 64 * V * 4                              # log-softmax of the logits
    assert saved["attention_projections"] > 0 and saved["other_modules"] > 0
    assert saved["trainable_params"] == sum(p.numel() * 4 for p in model.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    for p in model.blocks[0].mlp.parameters():
        p.requires_grad_(False)
    frozen = sum(p.numel() * 4 for p in model.blocks[0].mlp.parameters())
    assert fidelity.saved_for_backward(model, forward)["trainable_params"] == saved["trainable_params"] - frozen


def test_flex_compile_mode_selects_one_compiled_flex_per_mode(monkeypatch) -> None:
    """Inside ``flex_compile_mode(m)`` CUDA flex calls go through ``torch.compile(flex_attention, mode=m)``, one
    wrapper per mode kept for later calls; the mode is restored on exit; an unknown mode fails by name; the CPU
    keeps the uncompiled reference."""
    from torch.nn.attention.flex_attention import flex_attention

    from modformer.layers.attention import kernels

    made = []
    monkeypatch.setattr(kernels, "_compiled_flex", {})
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: made.append((fn, kw)) or ("compiled", kw["mode"]))
    cuda = torch.device("cuda")
    assert kernels._flex_fn(cuda) == ("compiled", None) == kernels._flex_fn(cuda)
    with kernels.flex_compile_mode("max-autotune-no-cudagraphs"):
        assert kernels._flex_fn(cuda) == ("compiled", "max-autotune-no-cudagraphs") == kernels._flex_fn(cuda)
    assert kernels._flex_fn(cuda) == ("compiled", None) and kernels._flex_mode == "default"
    assert [(fn, kw["mode"], kw["dynamic"]) for fn, kw in made] == [(flex_attention, None, False),
                                                                   (flex_attention, "max-autotune-no-cudagraphs",
                                                                    False)]
    assert kernels._flex_fn(torch.device("cpu")) is flex_attention
    with pytest.raises(ValueError, match="unknown 'fast'"), kernels.flex_compile_mode("fast"):
        pass
