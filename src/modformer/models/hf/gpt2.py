"""GPT-2 (``GPT2LMHeadModel``) mapping. Weights map one to one (``Conv1D`` stores ``(in, out)``):

    transformer.wte / wpe          -> tok_emb / position.wpe
    transformer.h.i.ln_1 / ln_2    -> blocks.i.ln1 / ln2
    transformer.h.i.attn.c_attn    -> blocks.i.attn.qkv    ([q; k; v] along the output dim)
    transformer.h.i.attn.c_proj    -> blocks.i.attn.out
    transformer.h.i.mlp.c_fc       -> blocks.i.mlp.up
    transformer.h.i.mlp.c_proj     -> blocks.i.mlp.down
    transformer.ln_f / lm_head     -> ln_f / lm_head       (tied to the token embedding by default)
"""

from __future__ import annotations

from typing import Any

from torch import nn

from modformer.config import ModelConfig
from modformer.models.hf.common import Pair, conv1d_pair, linear_pairs, unsupported

MODEL_TYPES = ("gpt2",)

# HF activation name -> our ffn name (mathematically identical functions only)
FROM_HF_ACT = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
               "gelu": "gelu", "gelu_python": "gelu", "relu": "relu"}
TO_HF_ACT = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}
_GPT2_EOS = 50256   # <|endoftext|> of the GPT-2 tokenizer


def config_from_hf(c: Any) -> ModelConfig:
    """The ModelConfig equivalent to an HF ``GPT2Config`` (ValueError names an option with none).

    HF's separate ``embd_pdrop`` has no counterpart; ``resid_pdrop`` sets ``dropout`` (training only).
    """
    why = "cannot import HF GPT-2 model"
    if c.activation_function not in FROM_HF_ACT:
        raise unsupported(why, f"activation_function={c.activation_function!r} is not supported "
                               f"(supported: {', '.join(sorted(FROM_HF_ACT))})")
    if not getattr(c, "scale_attn_weights", True):
        raise unsupported(why, "scale_attn_weights=False (modformer always scales by 1/sqrt(head_dim))")
    for name in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
        if getattr(c, name, False):
            raise unsupported(why, f"{name}=True is not supported")
    if getattr(c, "pruned_heads", None):
        raise unsupported(why, "pruned_heads is set (heads of unequal count per layer)")
    if c.n_embd % c.n_head:
        raise unsupported(why, f"n_embd ({c.n_embd}) is not divisible by n_head ({c.n_head})")
    return ModelConfig(
        vocab_size=c.vocab_size, max_seq_len=c.n_positions, d_model=c.n_embd, n_layer=c.n_layer,
        n_head=c.n_head, d_ff=c.n_inner, norm_eps=c.layer_norm_epsilon,
        ffn=FROM_HF_ACT[c.activation_function], model="gpt", attention="mha", position="learned",
        norm="layernorm", norm_placement="pre", bias=True, causal=True, final_norm=True,
        tie_embeddings=bool(getattr(c, "tie_word_embeddings", True)),
        dropout=float(c.resid_pdrop), attn_dropout=float(c.attn_pdrop), init_std=c.initializer_range,
    )


def hf_config(cfg: ModelConfig) -> tuple[type, type, dict[str, Any]]:
    """(config class, model class, config kwargs) of the HF GPT-2 equal to ``cfg``; ValueError names the field."""
    from transformers import GPT2Config, GPT2LMHeadModel

    why = "cannot export to HF GPT-2"
    required = {"model": "gpt", "attention": "mha", "position": "learned", "norm": "layernorm",
                "norm_placement": "pre", "bias": True, "qk_norm": False, "rezero": False,
                "final_norm": True, "causal": True, "attn_only": False, "scale_embeddings": False,
                "parallel_residual": False,
                "logit_softcap": None, "value_embeds": 0, "unet_skips": False, "window_pattern": []}
    for name, want in required.items():
        if getattr(cfg, name) != want:
            raise unsupported(why, f"model.{name}={getattr(cfg, name)!r} (GPT-2 needs {want!r})")
    if cfg.qkv_bias is False:
        raise unsupported(why, "model.qkv_bias=False (GPT-2 has QKV biases)")
    if cfg.ffn not in TO_HF_ACT:
        raise unsupported(why, f"model.ffn={cfg.ffn!r} (GPT-2 needs one of {', '.join(TO_HF_ACT)})")
    if cfg.ffn_options:
        raise unsupported(why, f"model.ffn_options={cfg.ffn_options!r} (GPT-2 has none)")
    if cfg.layer_overrides:
        raise unsupported(why, "model.layer_overrides (per-layer shapes, e.g. a pruned model; GPT-2 has one shape)")
    kv = cfg.attention_options.get("n_kv_heads") or cfg.kv_heads
    if kv != cfg.n_head:
        raise unsupported(why, f"model.n_kv_heads={kv} (GPT-2 needs multi-head attention, n_kv_heads "
                               f"= n_head = {cfg.n_head})")
    if set(cfg.attention_options) - {"n_kv_heads"}:
        raise unsupported(why, f"model.attention_options={cfg.attention_options!r} (GPT-2 has none)")
    if cfg.head_dim * cfg.n_head != cfg.d_model:
        raise unsupported(why, f"model.d_head={cfg.d_head} (GPT-2 needs d_model / n_head = "
                               f"{cfg.d_model / cfg.n_head:g})")
    gpt2_vocab = cfg.vocab_size > _GPT2_EOS   # keep GPT-2's special token ids only if they exist
    return GPT2Config, GPT2LMHeadModel, dict(
        vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.d_model, n_layer=cfg.n_layer,
        n_head=cfg.n_head, n_inner=cfg.d_ff, activation_function=TO_HF_ACT[cfg.ffn],
        layer_norm_epsilon=cfg.norm_eps, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.attn_dropout, initializer_range=cfg.init_std,
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=_GPT2_EOS if gpt2_vocab else None, eos_token_id=_GPT2_EOS if gpt2_vocab else None,
    )


def pairs(model: nn.Module, hf: nn.Module) -> list[Pair]:
    """Every weight of a modformer GPT against an HF ``GPT2LMHeadModel``."""
    t = hf.transformer
    out = linear_pairs("tok_emb", model.tok_emb, t.wte) + linear_pairs("position.wpe", model.position.wpe, t.wpe)
    for i, (ours, theirs) in enumerate(zip(model.blocks, t.h, strict=True)):
        out += linear_pairs(f"blocks.{i}.ln1", ours.ln1, theirs.ln_1)
        out += linear_pairs(f"blocks.{i}.ln2", ours.ln2, theirs.ln_2)
        for name, a, b in (("attn.qkv", ours.attn.qkv, theirs.attn.c_attn),
                           ("attn.out", ours.attn.out, theirs.attn.c_proj),
                           ("mlp.up", ours.mlp.up, theirs.mlp.c_fc),
                           ("mlp.down", ours.mlp.down, theirs.mlp.c_proj)):
            out.append(conv1d_pair(f"blocks.{i}.{name}.weight", a.weight, b.weight))
            out.append(Pair(f"blocks.{i}.{name}.bias", a.bias, b.bias))
    out += linear_pairs("ln_f", model.ln_f, t.ln_f)
    if not model.cfg.tie_embeddings:
        out.append(Pair("lm_head.weight", model.lm_head.weight, hf.lm_head.weight))
    return out
