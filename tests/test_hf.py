"""HF GPT-2 interop: logits and greedy generation match in both directions; clear errors."""

from __future__ import annotations

import pytest
import torch

import modformer as mf

transformers = pytest.importorskip("transformers")
GPT2Config, GPT2LMHeadModel = transformers.GPT2Config, transformers.GPT2LMHeadModel

TINY = dict(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=None,
            eos_token_id=None, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
VARIANTS = {"gpt2": {}, "relu_ninner_untied": dict(n_inner=48, activation_function="relu",
                                                   tie_word_embeddings=False, layer_norm_epsilon=1e-6)}


def _jitter(module: torch.nn.Module, std: float = 0.1) -> None:
    """Perturb every parameter (biases and norm gains too) so that any mis-mapping shows up."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * std)


def _hf_model(**overrides: object) -> GPT2LMHeadModel:
    model = GPT2LMHeadModel(GPT2Config(**{**TINY, **overrides}))
    _jitter(model)
    return model.eval()


def _hf_logits(hf: GPT2LMHeadModel, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(idx).logits


def _ids(n: int = 2, t: int = 16) -> torch.Tensor:
    return torch.randint(0, 97, (n, t))


def _max_diff(ours: torch.nn.Module, hf: GPT2LMHeadModel, idx: torch.Tensor) -> float:
    with torch.no_grad():
        return (ours(idx) - _hf_logits(hf, idx)).abs().max().item()


@pytest.mark.parametrize("variant", VARIANTS)
def test_from_hf_logits_match(variant: str) -> None:
    hf = _hf_model(**VARIANTS[variant])
    ours = mf.hf.from_hf(hf)
    assert not ours.training and ours.cfg.tie_embeddings == hf.config.tie_word_embeddings
    assert _max_diff(ours, hf, _ids()) <= 1e-5


@pytest.mark.parametrize("ffn", ["gelu_tanh", "gelu", "relu"])
def test_to_hf_logits_match(ffn: str) -> None:
    cfg = mf.ModelConfig(vocab_size=97, n_layer=2, d_model=32, n_head=4, max_seq_len=64, ffn=ffn,
                         d_ff=48 if ffn == "relu" else None, tie_embeddings=ffn != "relu")
    ours = mf.build_model(cfg).eval()
    _jitter(ours)
    hf = mf.hf.to_hf(ours)
    assert isinstance(hf, GPT2LMHeadModel) and not hf.training
    assert hf.config._attn_implementation == "sdpa"
    assert hf.config.tie_word_embeddings == cfg.tie_embeddings
    assert _max_diff(ours, hf, _ids()) <= 1e-5
    back = mf.hf.from_hf(hf)   # round trip restores every weight exactly
    for (name, a), (_, b) in zip(ours.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), name


def test_save_and_load_pretrained_local_dir(tmp_path) -> None:
    hf = _hf_model()
    hf.save_pretrained(tmp_path / "hf")
    ours = mf.hf.load_pretrained(str(tmp_path / "hf"))
    assert _max_diff(ours, hf, _ids()) <= 1e-5
    mf.hf.save_hf(ours, tmp_path / "back")
    again = GPT2LMHeadModel.from_pretrained(tmp_path / "back").eval()
    assert _max_diff(ours, again, _ids()) <= 1e-5


def test_greedy_generation_matches() -> None:
    hf = _hf_model()
    _jitter(hf, 0.5)        # larger weights -> well-separated logits, no argmax near-ties
    ours = mf.hf.from_hf(hf)
    idx = _ids(2, 5)
    mine = ours.generate(idx, 8, temperature=0)
    theirs = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=8, do_sample=False,
                         pad_token_id=0)
    assert torch.equal(mine, theirs)


@pytest.mark.parametrize("option,value", [("scale_attn_by_inverse_layer_idx", True),
                                          ("reorder_and_upcast_attn", True),
                                          ("add_cross_attention", True),
                                          ("scale_attn_weights", False),
                                          ("activation_function", "silu")])
def test_from_hf_rejects_unsupported(option: str, value: object) -> None:
    hf = GPT2LMHeadModel(GPT2Config(**{**TINY, "n_layer": 1, option: value}))
    with pytest.raises(ValueError, match=option):
        mf.hf.from_hf(hf)


@pytest.mark.parametrize("field,value", [("position", "rope"), ("norm", "rmsnorm"),
                                         ("norm_placement", "post"), ("ffn", "swiglu"), ("bias", False),
                                         ("n_kv_heads", 2), ("attention", "mqa"),
                                         ("qk_norm", True), ("rezero", True), ("final_norm", False),
                                         ("causal", False), ("attn_only", True), ("d_head", 4),
                                         ("scale_embeddings", True)])
def test_to_hf_rejects_unsupported(field: str, value: object) -> None:
    cfg = mf.ModelConfig(vocab_size=97, n_layer=1, d_model=32, n_head=4, max_seq_len=64, **{field: value})
    with pytest.raises(ValueError, match=f"model.{field}"):
        mf.hf.to_hf(mf.build_model(cfg), family="gpt2")
