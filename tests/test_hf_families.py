"""HF families (GPT-2, Llama incl. Llama-3 RoPE scaling, Mistral, Qwen2, GPT-NeoX): logits, round trips,
cache and greedy generation against transformers; load_pretrained with a tokenizer; clear errors.

Tolerance: every comparison is fp32 on logits of magnitude <= ~10 (weights jittered by 0.1). The two sides
differ only in summation order (fused vs separate QKV, SDPA vs eager softmax, RMSNorm and RoPE formulas
equal up to rounding), each op contributing about sqrt(K) * 2^-24 relative error for reductions of length
K <= 64, compounded over 2 layers: ~1e-6 absolute on the logits, so 1e-5 leaves a 10x margin while any
mis-mapped weight (an O(0.1) change) shows up as an O(0.1-1) difference.
"""

from __future__ import annotations

import pytest
import torch

import modformer as mf

transformers = pytest.importorskip("transformers")

V, T = 97, 16
COMMON = dict(vocab_size=V, bos_token_id=None, eos_token_id=None, pad_token_id=None)
LLAMA = dict(COMMON, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False)
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16)   # head_dim 8: one frequency kept, one smoothed, two divided
VARIANTS = {
    "gpt2": ("GPT2", dict(COMMON, n_positions=64, n_embd=32, n_layer=2, n_head=4)),
    "llama": ("Llama", LLAMA),
    "llama3_rope_tied_bias": ("Llama", dict(LLAMA, rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True,
                                            attention_bias=True, mlp_bias=True)),
    "mistral_window5": ("Mistral", dict(LLAMA, sliding_window=5)),
    "qwen2": ("Qwen2", dict(LLAMA)),
    "qwen2_sliding_layer1": ("Qwen2", dict(LLAMA, use_sliding_window=True, sliding_window=5, max_window_layers=1)),
    "neox_parallel_partial": ("GPTNeoX", dict(COMMON, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                              num_attention_heads=4, max_position_embeddings=64, rotary_pct=0.5)),
    "neox_serial_full_rotary": ("GPTNeoX", dict(COMMON, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                                num_attention_heads=4, max_position_embeddings=64, rotary_pct=1.0,
                                                use_parallel_residual=False, hidden_act="gelu_new")),
}


def _jitter(module: torch.nn.Module, std: float) -> None:
    """Perturb every parameter (biases and norm gains too) so that any mis-mapping shows up."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * std)


def hf_model(variant: str, std: float = 0.1) -> torch.nn.Module:
    torch.manual_seed(0)
    prefix, kwargs = VARIANTS[variant]
    config_cls = getattr(transformers, f"{prefix}Config")
    model_cls = getattr(transformers, f"{prefix}LMHeadModel" if prefix == "GPT2" else f"{prefix}ForCausalLM")
    model = model_cls(config_cls(**kwargs, attn_implementation="eager"))
    _jitter(model, std)
    return model.eval()


def _ids(n: int = 2, t: int = T) -> torch.Tensor:
    return torch.randint(0, V, (n, t), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _max_diff(ours: torch.nn.Module, hf: torch.nn.Module, idx: torch.Tensor) -> float:
    return (ours(idx) - hf(idx).logits).abs().max().item()


@pytest.mark.parametrize("variant", VARIANTS)
def test_from_hf_logits_match(variant: str) -> None:
    hf = hf_model(variant)
    ours = mf.hf.from_hf(hf)
    assert not ours.training and ours.cfg.tie_embeddings == hf.config.tie_word_embeddings
    with torch.no_grad():
        scale = hf(_ids()).logits.abs().max().item()
    assert 1.0 < scale < 30.0          # logits large enough for the tolerance to mean something
    assert _max_diff(ours, hf, _ids()) <= 1e-5


@pytest.mark.parametrize("variant", VARIANTS)
def test_to_hf_round_trip(variant: str) -> None:
    hf = hf_model(variant)
    back = mf.hf.to_hf(mf.hf.from_hf(hf))
    assert type(back) is type(hf) and not back.training
    for (name, a), (_, b) in zip(hf.state_dict().items(), back.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    for key in ("sliding_window", "layer_types", "rope_parameters", "use_parallel_residual", "tie_word_embeddings"):
        assert getattr(back.config, key, None) == getattr(hf.config, key, None), key
    assert _max_diff(mf.hf.from_hf(back), hf, _ids()) <= 1e-5


@pytest.mark.parametrize("variant", VARIANTS)
def test_cache_equals_no_cache(variant: str) -> None:
    """Prefill 5 tokens then one token at a time (past the sliding windows) == one full forward."""
    ours = mf.hf.from_hf(hf_model(variant))
    idx = _ids()
    with torch.no_grad():
        full = ours(idx)
        logits, cache = ours(idx[:, :5], return_cache=True)
        steps = [logits]
        for t in range(5, T):
            logits, cache = ours(idx[:, t:t + 1], cache=cache, return_cache=True)
            steps.append(logits)
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-5


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_generation_matches_hf(variant: str) -> None:
    hf = hf_model(variant, std=0.5)      # larger weights -> well-separated logits, no argmax near-ties
    ours = mf.hf.from_hf(hf)
    idx = _ids(2, 6)
    mine = ours.generate(idx, 10, temperature=0)
    theirs = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=10, do_sample=False,
                         pad_token_id=0)
    assert torch.equal(mine, theirs)
    assert torch.equal(mine, ours.generate(idx, 10, temperature=0, use_cache=False))
