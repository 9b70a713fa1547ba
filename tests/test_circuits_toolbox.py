"""Issue 28's studies 2-3 on tiny models: adapter components (exact partition, agreement with the bilinear
per-head deltas), the repeated-span data, weight circuits of a sparse-attention student, both benches end to end."""

from __future__ import annotations

import json

import pytest
import torch

from modformer.interp import adapter_circuits as ac
from modformer.interp.deltas import head_deltas
from modformer.interp.toy_induction import RepeatedSpans
from modformer.interp.weights import extract_weights
from tests._helpers import randomized


def _perturbed(model: torch.nn.Module, names: tuple[str, ...], seed: int = 0) -> torch.nn.Module:
    import copy

    g = torch.Generator().manual_seed(seed)
    tuned = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in tuned.named_parameters():
            if n.endswith(names):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return tuned


def test_components_partition_the_delta() -> None:
    base = randomized(attn_only=False, d_ff=16, tie_embeddings=False)
    tuned = _perturbed(base, ("attn.qkv.weight", "attn.out.weight", "mlp.up.weight", "mlp.down.weight",
                              "lm_head.weight"))
    deltas = ac.weight_delta(base, tuned)
    comps = ac.components(base, deltas)
    assert set(comps) == {f"L{i}H{h}.{k}" for i in range(2) for h in range(4) for k in ("qk", "ov")} | {
        "L0.mlp", "L1.mlp", "lm_head"}
    for name, d in deltas.items():                       # every changed entry in exactly one component
        count = sum(m.long() for c in comps.values() for p, m in c if p == name)
        assert torch.equal(count, torch.ones_like(d, dtype=torch.long)), name
    everything = ac.with_components(base, deltas, comps, list(comps))
    for (n, a), b in zip(everything.named_parameters(), tuned.parameters()):
        assert torch.equal(a, b), n                       # base + every delta = tuned, bit for bit
    nothing = ac.with_components(base, deltas, comps, [])
    assert all(torch.equal(a, b) for a, b in zip(nothing.parameters(), base.parameters()))
    with pytest.raises(KeyError, match="no adapter component"):
        ac.with_components(base, deltas, comps, ["L9H9.qk"])


def test_head_components_agree_with_bilinear_deltas() -> None:
    """Keeping one head's QK part moves only that head's W_Q W_K^T (interp.deltas, computed from the bilinear
    forms); its OV part only that head's W_V W_O."""
    base = randomized()
    tuned = _perturbed(base, ("attn.qkv.weight", "attn.out.weight"))
    deltas = ac.weight_delta(base, tuned)
    comps = ac.components(base, deltas)
    for kept, changed, still in (("L1H2.qk", "qk", "ov"), ("L0H3.ov", "ov", "qk")):
        d = head_deltas(base, ac.with_components(base, deltas, comps, [kept]))
        i, h = int(kept[1]), int(kept[3])
        moved = d[changed] > 1e-6
        assert moved[i, h] and int(moved.sum()) == 1, (kept, d[changed])
        assert float(d[still].abs().max()) < 1e-6
    sizes = ac.component_sizes(base, deltas, comps)
    qkv = dict(base.named_parameters())["blocks.1.attn.qkv.weight"]
    rows = torch.cat([torch.arange(16, 24), torch.arange(48, 56)])       # head 2's query and key rows (Dh = 8)
    expect = deltas["blocks.1.attn.qkv.weight"][rows].norm() / qkv.detach()[rows].norm()
    assert sizes["L1H2.qk"]["rel"] == pytest.approx(float(expect), rel=1e-5)


def test_ablation_study_reports_base_full_and_top_k() -> None:
    base = randomized()
    tuned = _perturbed(base, ("blocks.0.attn.qkv.weight",))
    x = torch.randint(37, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = tuned(x)

    def metric(m: torch.nn.Module) -> float:          # 1 at the tuned model, lower the further away
        with torch.no_grad():
            return float(1.0 / (1.0 + (m(x) - ref).pow(2).mean()))

    r = ac.ablation_study(base, tuned, metric, ks=(1, 8, 99))
    assert r["full"] == 1.0 and r["base"] < 1.0 and r["n_components"] == 8      # 4 heads x (qk, ov) of layer 0
    assert [c["rel"] for c in r["components"]] == sorted((c["rel"] for c in r["components"]), reverse=True)
    assert [t["k"] for t in r["top_k"]] == [1, 8] and all("alone" in c for c in r["components"])
    assert r["top_k"][-1]["only_top_k"] == 1.0 and r["top_k"][-1]["recovered"] == 1.0
    assert r["minimal_k"] in (1, 8)


@pytest.mark.parametrize("shift", [1, 2])
def test_repeated_spans_targets(shift: int) -> None:
    data = RepeatedSpans(vocab_size=11, seq_len=24, min_span=3, max_span=8, shift=shift)
    x, y = data.get_batch("train", 32, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (32, 24)
    for row_x, row_y in zip(x, y):
        pos = (row_y != -100).nonzero().flatten()
        assert 1 <= len(pos) <= 8 - shift and bool((pos.diff() == 1).all())
        # each target is the token `shift` after the current token's position in the span: the span copy is
        # contiguous, so the target at t is x[t + shift] (inside the copy)
        assert torch.equal(row_y[pos], row_x[pos + shift])
    a = [b[0] for b in data.iter_eval("val", 4, 2)]
    assert all(torch.equal(p, q) for p, q in zip(a, [b[0] for b in data.iter_eval("val", 4, 2)]))
    with pytest.raises(ValueError, match="shift"):
        RepeatedSpans(min_span=2, shift=2)


def test_sparse_student_has_the_teachers_weight_circuits() -> None:
    from modformer.compress.distill import build_student

    teacher = randomized()
    student = build_student(teacher, {"attention": "sliding_window", "attention_options": {"window": 4}})
    wt, ws = extract_weights(teacher), extract_weights(student)
    for k in ("W_Q", "W_K", "W_V", "W_O"):
        assert torch.equal(getattr(wt, k), getattr(ws, k))
    x = torch.randint(37, (1, 16))
    with torch.no_grad():
        assert not torch.allclose(teacher(x), student(x))      # the pattern is not part of the weights
    from modformer.interp.terms import path_terms
    from modformer.interp.weights import attention_modules

    terms, logits = path_terms(student, x)               # frozen (masked) patterns: the paths still sum exactly
    assert torch.allclose(sum(terms.values()), logits, atol=1e-9)

    with pytest.raises(ValueError, match="per-head"):     # what the TransformerLens conversion uses: refused, as
        attention_modules(student)                       # a conversion would drop the pattern


def test_benches_end_to_end_on_a_tiny_model(tmp_path) -> None:
    import modformer as mf

    mf.save(randomized(max_seq_len=16), tmp_path / "tiny")
    threads = torch.get_num_threads()                   # the benches set one thread; give the rest theirs back
    try:
        _run_benches(tmp_path)
    finally:
        torch.set_num_threads(threads)


def _run_benches(tmp_path) -> None:  # noqa: ANN001
    from modformer.bench.studies import circuits_lora, circuits_sparse

    assert circuits_sparse.main(["--run", str(tmp_path / "tiny"), "--steps", "2", "--students", "sliding_window:4",
                                 "--probes", "3", "6", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "circuits_sparse.json").read_text())
    assert [row["model"] for row in r["rows"]] == ["teacher (dense)", "sliding_window:4"]
    assert r["rows"][0]["kl_to_teacher"] == 0
    assert circuits_lora.main(["--parts", "induction", "--induction-run", str(tmp_path / "tiny"),
                               "--induction-lora-steps", "3", "--ks", "1", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "circuits_lora.json").read_text())
    comps = r["induction"]["components"]
    assert comps and {c["name"].split(".")[1] for c in comps} <= {"qk", "ov", "wpe"}
    assert r["headline"]["induction"]["n_components"] == len(comps)


def test_circuits_command_on_a_saved_model_without_its_run(tmp_path) -> None:
    """`modformer circuits FOLDER` on an mf.save folder (no run, no dataset): the report with random repeated
    tokens as the sample, including the pattern plot."""
    import modformer as mf
    from modformer.cli import main

    mf.save(randomized(max_seq_len=16), tmp_path / "m")
    assert main(["circuits", str(tmp_path / "m"), "--out", str(tmp_path / "c")]) == 0
    for name in ("head_scores.json", "circuits.html", "plots/patterns.png", "plots/ov_eigenvalues.png"):
        assert (tmp_path / "c" / name).stat().st_size > 0, name
