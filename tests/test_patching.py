"""Activation, path and attribution patching (interp/patching.py): TransformerLens parity, exact invariants,
first-order agreement, pruned models and the hand-wired induction circuit."""

import warnings

import pytest
import torch
from test_interp import induction_model

import modformer as mf
from modformer.compress.importance import masked
from modformer.compress.structured import remove_heads
from modformer.interp import patching

V, T = 37, 8


def tiny(norm: str = "layernorm", **kw) -> torch.nn.Module:
    cfg = mf.ModelConfig(vocab_size=V, n_layer=2, d_model=32, n_head=4, max_seq_len=16, attn_only=True, norm=norm,
                         **kw)
    model = mf.build_model(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "ln" in name and name.endswith("weight") else 0.0, 0.3)
    return model


def pair(batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    clean = torch.randint(0, V, (batch, T))
    corrupted = clean.clone()
    corrupted[:, 2] = (clean[:, 2] + 5) % V
    return clean, corrupted


def metric_for(clean: torch.Tensor):
    return patching.logit_diff(answer=clean[:, -1], wrong=(clean[:, -1] + 1) % V)


def test_activation_patching_agrees_with_transformer_lens():
    tl_patching = pytest.importorskip("transformer_lens.patching")
    from modformer.interp.tl import to_hooked_transformer

    model = tiny()
    clean, corrupted = (t[:1, :6] for t in pair())          # one short sequence: TL's loop is slow per patch
    metric = metric_for(clean)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ht = to_hooked_transformer(model)
        _, tl_cache = ht.run_with_cache(clean)
        cases = [("z", False, tl_patching.get_act_patch_attn_head_out_all_pos),
                 ("z", True, tl_patching.get_act_patch_attn_head_out_by_pos),
                 ("q", False, tl_patching.get_act_patch_attn_head_q_all_pos),
                 ("v", False, tl_patching.get_act_patch_attn_head_v_all_pos),
                 ("pattern", False, tl_patching.get_act_patch_attn_head_pattern_all_pos),
                 ("resid_pre", True, tl_patching.get_act_patch_resid_pre),
                 ("attn_out", True, tl_patching.get_act_patch_attn_out)]
        for site, by_pos, fn in cases:
            ours = patching.activation_patching(model, corrupted, clean, metric, site=site, by_position=by_pos)
            theirs = fn(ht, corrupted, tl_cache, metric).cpu()
            # logits agree to ~1e-5 (float32, d_model 32); the metric is a difference of two logits of size ~1
            torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4, msg=f"site {site} by_position={by_pos}")


@pytest.mark.parametrize("site", ["z", "k", "pattern", "resid_pre", "attn_out", "resid_post"])
def test_patching_clean_into_clean_gives_the_clean_metric_exactly(site):
    model = tiny()
    clean, _ = pair()
    metric = metric_for(clean)
    with torch.no_grad():
        plain = float(metric(model(clean)))
        # a hooked pattern switches that call to the eager kernel: compare with the same kernel
        hooked = float(metric(model.run_with_hooks(clean, [("blocks.0.attn.hook_pattern", lambda x, h: x)])))
    expected = hooked if site == "pattern" else plain
    for by_pos in (False, True):
        for fn in (patching.activation_patching, patching.attribution_patching):
            got = fn(model, clean, clean, metric, site=site, by_position=by_pos)
            if site == "pattern":     # the patched layer runs eager, the other sdpa: float32 rounding apart
                torch.testing.assert_close(got, torch.full_like(got, expected), atol=1e-5, rtol=0)
            else:
                assert torch.equal(got, torch.full_like(got, expected))
    path = patching.path_patching(model, clean, clean, metric, receiver=(1, 2), component="k")
    assert torch.equal(path[0], torch.full((4,), plain))


@pytest.mark.parametrize("site", ["z", "attn_out", "resid_post"])
def test_attribution_is_exact_when_the_metric_is_affine_in_the_activation(site):
    """No norms, last layer: logits are affine in its z / attn_out / resid_post, so the linearisation is exact."""
    model = tiny("none", final_norm=False).double()
    clean, corrupted = pair()
    metric = metric_for(clean)
    exact = patching.activation_patching(model, corrupted, clean, metric, site=site, by_position=True)
    approx = patching.attribution_patching(model, corrupted, clean, metric, site=site, by_position=True)
    torch.testing.assert_close(approx[1], exact[1], atol=1e-5, rtol=1e-5)   # float64 model, float32 results


def test_attribution_agrees_with_activation_patching_to_first_order():
    """A clean cache at distance eps from the corrupted run: the error shrinks as eps^2 (x4 when eps halves)."""
    model = tiny().double()
    clean, corrupted = pair()
    metric = metric_for(clean)
    names = ["blocks.0.attn.hook_z", "blocks.1.attn.hook_z"]
    _, cache = model.run_with_cache(corrupted, names_filter=names)
    g = torch.Generator().manual_seed(0)
    direction = {n: torch.randn(cache[n].shape, generator=g, dtype=torch.float64) for n in names}
    with torch.no_grad():
        base = float(metric(model(corrupted)))
    errors = []
    for eps in (1e-2, 5e-3):
        near = {n: cache[n] + eps * direction[n] for n in names}
        exact = patching.activation_patching(model, corrupted, near, metric, site="z").double()
        approx = patching.attribution_patching(model, corrupted, near, metric, site="z").double()
        assert (exact[0] - base).abs().max() > 1e-3 * eps           # a layer-0 patch moves the metric at all
        errors.append(float((approx[0] - exact[0]).abs().max()))
    assert 3.0 < errors[0] / errors[1] < 5.0


def test_patching_a_pruned_model_matches_the_masked_original():
    model = tiny()
    clean, corrupted = pair()
    metric = metric_for(clean)
    pruned = remove_heads(model, {0: [1], 1: [0, 3]})
    got = patching.activation_patching(pruned, corrupted, clean, metric, site="z")
    assert got.shape == (2, 3)
    assert torch.isnan(got[1, 2]) and torch.isfinite(got[0]).all() and torch.isfinite(got[1, :2]).all()
    heads = [torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([0.0, 1.0, 1.0, 0.0])]
    with masked(model, heads=heads):
        ref = patching.activation_patching(model, corrupted, clean, metric, site="z")
    torch.testing.assert_close(got[0], ref[0, [0, 2, 3]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1, :2], ref[1, [1, 2]], atol=1e-5, rtol=1e-5)
    attr = patching.attribution_patching(pruned, corrupted, clean, metric, site="z")
    assert torch.isnan(attr[1, 2]) and torch.isfinite(attr[1, :2]).all()


def test_path_patching_finds_the_k_composition_of_the_induction_circuit():
    """Hand-wired circuit: L0H0 (previous token) feeds L1H0's keys; L0H1 / L1H1 are zero heads."""
    model = induction_model()
    g = torch.Generator().manual_seed(1)
    half = torch.stack([torch.randperm(12, generator=g)[:8] + 4 for _ in range(4)])
    clean = torch.cat([half, half], 1)               # (4, 16): at the last token h7 the circuit predicts h0
    corrupted = torch.cat([half.flip(1), half], 1)   # first copy reversed: h7 is followed by h6 instead
    metric = patching.logit_diff(answer=half[:, 0], wrong=half[:, 6])
    with torch.no_grad():
        m_clean, m_corr = float(metric(model(clean))), float(metric(model(corrupted)))
    assert m_clean - m_corr > 1.0
    k_path = patching.path_patching(model, corrupted, clean, metric, receiver=(1, 0), component="k")
    q_path = patching.path_patching(model, corrupted, clean, metric, receiver=(1, 0), component="q")
    assert k_path.shape == (2, 2) and torch.isnan(k_path[1]).all()
    assert (k_path[0, 0] - m_corr) / (m_clean - m_corr) > 0.9         # the previous-token head's keys carry it
    assert k_path[0, 1] == pytest.approx(m_corr, abs=1e-6)             # a zero head changes nothing
    assert abs(q_path[0, 0] - m_corr) < 0.05 * (m_clean - m_corr)      # the query reads the current token only
    heads = patching.activation_patching(model, corrupted, clean, metric, site="z")
    assert (heads[1, 0] - m_corr) / (m_clean - m_corr) > 0.9


def test_patching_errors_and_plot(tmp_path):
    model = tiny()
    clean, corrupted = pair()
    metric = metric_for(clean)
    with pytest.raises(ValueError, match="unknown patching site"):
        patching.activation_patching(model, corrupted, clean, metric, site="mlp")
    with pytest.raises(ValueError, match="differ in shape"):
        patching.activation_patching(model, corrupted[:, :4], clean, metric)
    with pytest.raises(ValueError, match="before the receiver"):
        patching.path_patching(model, corrupted, clean, metric, receiver=(0, 0))
    assert torch.isnan(patching.activation_patching(model, corrupted, clean, metric, site="mlp_out")).all()
    res = patching.activation_patching(model, corrupted, clean, metric, site="resid_pre", by_position=True)
    path = patching.plot_patching(res, tmp_path / "p.png", center=float(metric(model(corrupted)).detach()))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
