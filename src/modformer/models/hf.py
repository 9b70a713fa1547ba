"""Hugging Face GPT-2 interop: ``from_hf``, ``to_hf``, ``load_pretrained``, ``save_hf``.

Weights map one to one (GPT-2 ``Conv1D`` stores ``(in, out)``, ``nn.Linear`` ``(out, in)``):

    transformer.wte / wpe          -> tok_emb / position.wpe
    transformer.h.i.ln_1 / ln_2    -> blocks.i.ln1 / ln2
    transformer.h.i.attn.c_attn    -> blocks.i.attn.qkv    ([q; k; v] along the output dim)
    transformer.h.i.attn.c_proj    -> blocks.i.attn.out
    transformer.h.i.mlp.c_fc       -> blocks.i.mlp.up
    transformer.h.i.mlp.c_proj     -> blocks.i.mlp.down
    transformer.ln_f / lm_head     -> ln_f / lm_head       (tied to the token embedding by default)

Only configurations both sides compute identically are converted; anything else raises a
``ValueError`` naming the option. ``transformers`` is imported only when these functions run.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from modformer.config import ModelConfig
from modformer.models.gpt import GPT
from modformer.saving import build_model, unwrap

if TYPE_CHECKING:
    from transformers import GPT2Config, GPT2LMHeadModel

__all__ = ["from_hf", "to_hf", "load_pretrained", "save_hf"]

# HF activation name -> our ffn name (mathematically identical functions only)
_FROM_HF_ACT = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
                "gelu": "gelu", "gelu_python": "gelu", "relu": "relu"}
_TO_HF_ACT = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}
_GPT2_EOS = 50256   # <|endoftext|> of the GPT-2 tokenizer


def _unsupported(what: str, detail: str) -> ValueError:
    return ValueError(f"{what}: {detail}")


def _check_hf_config(c: GPT2Config) -> None:
    """Raise for HF GPT-2 options modformer cannot reproduce exactly."""
    why = "cannot import HF GPT-2 model"
    if getattr(c, "model_type", None) != "gpt2":
        raise _unsupported(why, f"config.model_type={getattr(c, 'model_type', None)!r} is not 'gpt2'")
    if c.activation_function not in _FROM_HF_ACT:
        raise _unsupported(why, f"activation_function={c.activation_function!r} is not supported "
                                f"(supported: {', '.join(sorted(_FROM_HF_ACT))})")
    if not getattr(c, "scale_attn_weights", True):
        raise _unsupported(why, "scale_attn_weights=False (modformer always scales by 1/sqrt(head_dim))")
    for name in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
        if getattr(c, name, False):
            raise _unsupported(why, f"{name}=True is not supported")
    if getattr(c, "pruned_heads", None):
        raise _unsupported(why, "pruned_heads is set (heads of unequal count per layer)")
    if c.n_embd % c.n_head:
        raise _unsupported(why, f"n_embd ({c.n_embd}) is not divisible by n_head ({c.n_head})")


def config_from_hf(c: GPT2Config) -> ModelConfig:
    """The ModelConfig equivalent to an HF ``GPT2Config`` (raises ValueError if there is none).

    HF's separate ``embd_pdrop`` has no counterpart; ``resid_pdrop`` sets ``dropout`` (training only).
    """
    _check_hf_config(c)
    return ModelConfig(
        vocab_size=c.vocab_size, max_seq_len=c.n_positions, d_model=c.n_embd, n_layer=c.n_layer,
        n_head=c.n_head, d_ff=c.n_inner, norm_eps=c.layer_norm_epsilon,
        ffn=_FROM_HF_ACT[c.activation_function], model="gpt", attention="mha", position="learned",
        norm="layernorm", norm_placement="pre", bias=True, causal=True, final_norm=True,
        tie_embeddings=bool(getattr(c, "tie_word_embeddings", True)),
        dropout=float(c.resid_pdrop), attn_dropout=float(c.attn_pdrop), init_std=c.initializer_range,
    )


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """``GPT2Config`` kwargs for a GPT-2-shaped ModelConfig; ValueError names the blocking field."""
    why = "cannot export to HF GPT-2"
    required = {"model": "gpt", "attention": "mha", "position": "learned", "norm": "layernorm",
                "norm_placement": "pre", "bias": True, "qk_norm": False, "rezero": False,
                "final_norm": True, "causal": True, "attn_only": False, "scale_embeddings": False}
    for name, want in required.items():
        if getattr(cfg, name) != want:
            raise _unsupported(why, f"model.{name}={getattr(cfg, name)!r} (GPT-2 needs {want!r})")
    if cfg.ffn not in _TO_HF_ACT:
        raise _unsupported(why, f"model.ffn={cfg.ffn!r} (GPT-2 needs one of {', '.join(_TO_HF_ACT)})")
    if cfg.ffn_options:
        raise _unsupported(why, f"model.ffn_options={cfg.ffn_options!r} (GPT-2 has none)")
    if cfg.layer_overrides:
        raise _unsupported(why, "model.layer_overrides (per-layer shapes, e.g. a pruned model; GPT-2 has one shape)")
    kv = cfg.attention_options.get("n_kv_heads") or cfg.kv_heads
    if kv != cfg.n_head:
        raise _unsupported(why, f"model.n_kv_heads={kv} (GPT-2 needs multi-head attention, n_kv_heads "
                                f"= n_head = {cfg.n_head})")
    if set(cfg.attention_options) - {"n_kv_heads"}:
        raise _unsupported(why, f"model.attention_options={cfg.attention_options!r} (GPT-2 has none)")
    if cfg.head_dim * cfg.n_head != cfg.d_model:
        raise _unsupported(why, f"model.d_head={cfg.d_head} (GPT-2 needs d_model / n_head = "
                                f"{cfg.d_model / cfg.n_head:g})")
    gpt2_vocab = cfg.vocab_size > _GPT2_EOS   # keep GPT-2's special token ids only if they exist
    return dict(
        vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.d_model, n_layer=cfg.n_layer,
        n_head=cfg.n_head, n_inner=cfg.d_ff, activation_function=_TO_HF_ACT[cfg.ffn],
        layer_norm_epsilon=cfg.norm_eps, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.attn_dropout, initializer_range=cfg.init_std,
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=_GPT2_EOS if gpt2_vocab else None, eos_token_id=_GPT2_EOS if gpt2_vocab else None,
    )


def _pairs(model: GPT, hf: GPT2LMHeadModel) -> list[tuple[str, Tensor, Tensor, bool]]:
    """(our name, our param, HF param, HF is Conv1D) for every weight; checks nothing is left out."""
    t = hf.transformer
    pairs = [("tok_emb.weight", model.tok_emb.weight, t.wte.weight, False),
             ("position.wpe.weight", model.position.wpe.weight, t.wpe.weight, False)]
    for i, (ours, theirs) in enumerate(zip(model.blocks, t.h, strict=True)):
        for name, a, b, conv in (("ln1", ours.ln1, theirs.ln_1, False),
                                 ("attn.qkv", ours.attn.qkv, theirs.attn.c_attn, True),
                                 ("attn.out", ours.attn.out, theirs.attn.c_proj, True),
                                 ("ln2", ours.ln2, theirs.ln_2, False),
                                 ("mlp.up", ours.mlp.up, theirs.mlp.c_fc, True),
                                 ("mlp.down", ours.mlp.down, theirs.mlp.c_proj, True)):
            pairs.append((f"blocks.{i}.{name}.weight", a.weight, b.weight, conv))
            pairs.append((f"blocks.{i}.{name}.bias", a.bias, b.bias, False))
    pairs += [("ln_f.weight", model.ln_f.weight, t.ln_f.weight, False),
              ("ln_f.bias", model.ln_f.bias, t.ln_f.bias, False)]
    if model.cfg.tie_embeddings:
        if hf.lm_head.weight.data_ptr() != t.wte.weight.data_ptr():
            raise ValueError("HF lm_head is not tied to wte although tie_word_embeddings=True")
    else:
        pairs.append(("lm_head.weight", model.lm_head.weight, hf.lm_head.weight, False))
    for side, mod, idx in (("modformer", model, 1), ("HF", hf, 2)):
        n_params = len({id(p) for p in mod.parameters()})
        if n_params != len(pairs):   # an unmapped parameter would silently keep its random init
            mapped = {id(p[idx]) for p in pairs}
            extra = [n for n, p in mod.named_parameters() if id(p) not in mapped]
            raise ValueError(f"{side} model has parameters with no GPT-2 counterpart: {extra}")
    return pairs


@torch.no_grad()
def _copy(pairs: list[tuple[str, Tensor, Tensor, bool]], to_ours: bool) -> None:
    for name, ours, theirs, conv in pairs:
        src_shape = tuple(theirs.shape[::-1] if conv else theirs.shape)
        if src_shape != tuple(ours.shape):
            raise ValueError(f"shape mismatch for {name}: modformer {tuple(ours.shape)}, "
                             f"HF (as nn.Linear) {src_shape}")
        if to_ours:
            ours.copy_(theirs.t() if conv else theirs)
        else:
            theirs.copy_(ours.t() if conv else ours)


def from_hf(hf_model: GPT2LMHeadModel) -> GPT:
    """A modformer GPT computing the same logits as an HF ``GPT2LMHeadModel`` (same dtype, device, mode)."""
    if not hasattr(hf_model, "transformer") or not hasattr(hf_model, "lm_head"):
        raise TypeError(f"expected a transformers GPT2LMHeadModel, got {type(hf_model).__name__}")
    cfg = config_from_hf(hf_model.config)
    model = build_model(cfg)
    _copy(_pairs(model, hf_model), to_ours=True)
    ref = hf_model.transformer.wte.weight
    return model.to(device=ref.device, dtype=ref.dtype).train(hf_model.training)


def _new_hf_model(kwargs: dict[str, Any]) -> GPT2LMHeadModel:
    """Build an HF GPT-2 with the SDPA attention implementation, falling back to eager."""
    from transformers import GPT2Config, GPT2LMHeadModel

    for impl in ("sdpa", "eager"):
        try:
            return GPT2LMHeadModel(GPT2Config(**kwargs, attn_implementation=impl))
        except (TypeError, ValueError, ImportError):
            continue
    return GPT2LMHeadModel(GPT2Config(**kwargs))


def to_hf(model: nn.Module) -> GPT2LMHeadModel:
    """An HF ``GPT2LMHeadModel`` with the same weights, dtype, device and mode.

    Raises ValueError naming the config field if the model is not GPT-2-shaped.
    """
    model = unwrap(model)
    if not isinstance(model, GPT):
        raise ValueError(f"cannot export to HF GPT-2: {type(model).__name__} is not a modformer GPT")
    hf = _new_hf_model(config_to_hf(model.cfg))
    _copy(_pairs(model, hf), to_ours=False)
    ref = model.tok_emb.weight
    return hf.to(device=ref.device, dtype=ref.dtype).train(model.training)


def load_pretrained(name_or_path: str = "gpt2", **kwargs: Any) -> GPT:
    """``GPT2LMHeadModel.from_pretrained(name_or_path, **kwargs)`` converted by ``from_hf``.

    Works with a hub name (needs network or the HF cache) or a folder written by ``save_pretrained``.
    """
    from transformers import GPT2LMHeadModel

    return from_hf(GPT2LMHeadModel.from_pretrained(name_or_path, **kwargs))


def save_hf(model: nn.Module, path: str | Path) -> Path:
    """``to_hf(model).save_pretrained(path)``; returns the folder."""
    to_hf(model).save_pretrained(str(path))
    return Path(path)
