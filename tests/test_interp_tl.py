"""Cross-check against TransformerLens: the same weights in a HookedTransformer give the same patterns,
logits, processed weights and composition scores (skipped without transformer-lens < 4)."""

import warnings

import pytest
import torch

import modformer as mf
from modformer import interp

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    transformer_lens = pytest.importorskip("transformer_lens")
    try:
        from transformer_lens import HookedTransformer  # noqa: F401  (removed in TransformerLens 4)
    except ImportError:
        pytest.skip("transformer_lens >= 4 has no HookedTransformer", allow_module_level=True)

from modformer.interp.tl import to_hooked_transformer  # noqa: E402

WEIGHT_NAMES = ["W_E", "W_pos", "W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O", "W_U", "b_U"]


def model_for(norm: str, position: str = "learned") -> torch.nn.Module:
    cfg = mf.ModelConfig(vocab_size=37, n_layer=3, d_model=32, n_head=4, max_seq_len=24, attn_only=True,
                         position=position, norm=norm, norm_placement="pre", causal=True)
    model = mf.build_model(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "ln" in name and name.endswith("weight") else 0.0, 0.2)
    return model


def run_both(model: torch.nn.Module, idx: torch.Tensor):
    """The model and its HookedTransformer on the same ids: logits agree; returns both caches and the TL model."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ht = to_hooked_transformer(model)
        with torch.no_grad():
            logits, cache = model.run_with_cache(idx)
            tl_logits, tl_cache = ht.run_with_cache(idx)
    torch.testing.assert_close(logits, tl_logits, atol=1e-5, rtol=1e-5)
    return ht, logits, cache, tl_cache


@pytest.mark.parametrize("norm", ["layernorm", "none"])
def test_transformer_lens_agrees(norm):
    model = model_for(norm)
    idx = torch.randint(0, 37, (3, 20))
    ht, logits, cache, tl_cache = run_both(model, idx)
    for layer in range(3):
        for name in ("attn.hook_pattern", "attn.hook_result"):          # same shapes in both libraries
            key = f"blocks.{layer}.{name}"
            torch.testing.assert_close(cache[key], tl_cache[key], atol=1e-5, rtol=1e-5)
        # our q/k/v/z hooks are (B, H, T, Dh); TransformerLens's are (B, T, H, Dh)
        torch.testing.assert_close(cache[f"blocks.{layer}.attn.hook_z"].transpose(1, 2),
                                   tl_cache[f"blocks.{layer}.attn.hook_z"], atol=1e-5, rtol=1e-5)

    w = interp.extract_weights(model, fold_ln=False)
    ours = interp.all_composition_scores(w)
    for mode in "qkv":
        torch.testing.assert_close(ours[mode], ht.all_composition_scores(mode.upper()), atol=1e-5, rtol=1e-4)

    # TransformerLens's weight processing (fold_ln, centring) == extract_weights with the same flags
    center = norm == "layernorm"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        htp = to_hooked_transformer(model, fold_ln=True, center_writing_weights=center, center_unembed=True)
    wp = interp.extract_weights(model, fold_ln=True, center_writing=center, center_unembed=True)
    for name in WEIGHT_NAMES:
        torch.testing.assert_close(getattr(wp, name), getattr(htp, name).detach(), atol=1e-5, rtol=1e-5)
    oursp = interp.all_composition_scores(wp)
    for mode in "qkv":
        torch.testing.assert_close(oursp[mode], htp.all_composition_scores(mode.upper()), atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(htp(idx).log_softmax(-1), logits.log_softmax(-1), atol=1e-5, rtol=1e-5)


def test_transformer_lens_agrees_with_shortformer_positions():
    """Position-infused attention: positions enter queries and keys after ln1, never values or the residual."""
    model = model_for("layernorm", position="shortformer")
    ht, _, cache, tl_cache = run_both(model, torch.randint(0, 37, (3, 20)))
    for layer in range(3):
        key = f"blocks.{layer}.attn.hook_pattern"
        torch.testing.assert_close(cache[key], tl_cache[key], atol=1e-5, rtol=1e-5)
    w = interp.extract_weights(model, fold_ln=False)
    torch.testing.assert_close(w.W_pos, ht.W_pos.detach())
    ours = interp.all_composition_scores(w)
    for mode in "qkv":
        torch.testing.assert_close(ours[mode], ht.all_composition_scores(mode.upper()), atol=1e-5, rtol=1e-4)
