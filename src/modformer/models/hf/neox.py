"""GPT-NeoX / Pythia (``GPTNeoXForCausalLM``) mapping.

    gpt_neox.embed_in                       -> tok_emb
    gpt_neox.layers.i.input_layernorm       -> blocks.i.ln1
    gpt_neox.layers.i.attention.query_key_value -> blocks.i.attn.qkv   (HF rows are per head [q_h; k_h; v_h],
                                                                        ours [q; k; v]: permuted)
    gpt_neox.layers.i.attention.dense       -> blocks.i.attn.out
    gpt_neox.layers.i.post_attention_layernorm -> blocks.i.ln2
    gpt_neox.layers.i.mlp.dense_h_to_4h / dense_4h_to_h -> blocks.i.mlp.up / down
    gpt_neox.final_layer_norm / lm_head     -> ln_f / lm_head   (untied by default)

``use_parallel_residual`` -> ``parallel_residual``; ``partial_rotary_factor`` (``rotary_pct``) ->
``rope_fraction`` (RoPE on the first dims of each head, half-split layout).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from modformer.config import ModelConfig
from modformer.models.hf.common import Pair, linear_pairs, unsupported
from modformer.models.hf.gpt2 import FROM_HF_ACT, TO_HF_ACT

MODEL_TYPES = ("gpt_neox",)


def config_from_hf(c: Any) -> ModelConfig:
    """The ModelConfig equal to an HF ``GPTNeoXConfig`` (ValueError names an option with none)."""
    why = "cannot import HF GPT-NeoX model"
    if c.hidden_act not in FROM_HF_ACT:
        raise unsupported(why, f"hidden_act={c.hidden_act!r} is not supported "
                               f"(supported: {', '.join(sorted(FROM_HF_ACT))})")
    if not getattr(c, "attention_bias", True):
        raise unsupported(why, "attention_bias=False is not supported (modformer has biases on all layers or none)")
    params = dict(getattr(c, "rope_parameters", None) or {})
    kind = params.get("rope_type", "default")
    if kind not in ("default", "linear", "llama3"):
        raise unsupported(why, f"rope_type={kind!r} is not supported (supported: default, linear, llama3)")
    theta = float(params.pop("rope_theta", getattr(c, "rotary_emb_base", 10000.0)))
    fraction = float(params.pop("partial_rotary_factor", getattr(c, "rotary_pct", 1.0)))
    return ModelConfig(
        vocab_size=c.vocab_size, max_seq_len=c.max_position_embeddings, d_model=c.hidden_size,
        n_layer=c.num_hidden_layers, n_head=c.num_attention_heads, d_ff=c.intermediate_size, model="gpt",
        attention="mha", position="rope", rope_base=theta, rope_fraction=fraction,
        rope_scaling={} if kind == "default" else params, norm="layernorm", norm_eps=c.layer_norm_eps,
        norm_placement="pre", ffn=FROM_HF_ACT[c.hidden_act], bias=True, causal=True, final_norm=True,
        parallel_residual=bool(c.use_parallel_residual),
        tie_embeddings=bool(getattr(c, "tie_word_embeddings", False)), dropout=float(c.hidden_dropout),
        attn_dropout=float(c.attention_dropout), init_std=c.initializer_range,
    )


def hf_config(cfg: ModelConfig) -> tuple[type, type, dict[str, Any]]:
    """(config class, model class, config kwargs) of the HF GPT-NeoX equal to ``cfg``."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    why = "cannot export to HF GPT-NeoX"
    required = {"model": "gpt", "attention": "mha", "position": "rope", "norm": "layernorm", "norm_placement": "pre",
                "bias": True, "qk_norm": False, "rezero": False, "final_norm": True, "causal": True,
                "attn_only": False, "scale_embeddings": False, "layer_overrides": [], "ffn_options": {}}
    for field, want in required.items():
        if getattr(cfg, field) != want:
            raise unsupported(why, f"model.{field}={getattr(cfg, field)!r} (GPT-NeoX needs {want!r})")
    if cfg.qkv_bias is False:
        raise unsupported(why, "model.qkv_bias=False (GPT-NeoX has QKV biases)")
    if cfg.ffn not in TO_HF_ACT:
        raise unsupported(why, f"model.ffn={cfg.ffn!r} (GPT-NeoX needs one of {', '.join(TO_HF_ACT)})")
    if cfg.kv_heads != cfg.n_head or set(cfg.attention_options) - {"n_kv_heads"} or \
            cfg.attention_options.get("n_kv_heads", cfg.n_head) != cfg.n_head:
        raise unsupported(why, f"model.n_kv_heads={cfg.n_kv_heads} / attention_options={cfg.attention_options} "
                               "(GPT-NeoX needs plain multi-head attention)")
    if cfg.head_dim * cfg.n_head != cfg.d_model:
        raise unsupported(why, f"model.d_head={cfg.d_head} (GPT-NeoX needs d_model / n_head)")
    return GPTNeoXConfig, GPTNeoXForCausalLM, dict(
        vocab_size=cfg.vocab_size, max_position_embeddings=cfg.max_seq_len, hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, intermediate_size=cfg.d_ff or 4 * cfg.d_model,
        hidden_act=TO_HF_ACT[cfg.ffn], layer_norm_eps=cfg.norm_eps, use_parallel_residual=cfg.parallel_residual,
        rope_parameters={"rope_theta": cfg.rope_base, "rope_type": "default", **cfg.rope_scaling,
                         "partial_rotary_factor": cfg.rope_fraction},
        attention_bias=True, tie_word_embeddings=cfg.tie_embeddings, hidden_dropout=cfg.dropout,
        attention_dropout=cfg.attn_dropout, initializer_range=cfg.init_std,
        bos_token_id=None, eos_token_id=None, pad_token_id=None)


def _qkv_maps(n_head: int, head_dim: int) -> tuple:
    """HF (per head [q_h; k_h; v_h]) <-> ours ([q; k; v]) row permutations, for weights and biases."""
    def to_ours(x: Tensor) -> Tensor:
        return x.reshape(n_head, 3, head_dim, *x.shape[1:]).transpose(0, 1).reshape(x.shape)

    def to_theirs(x: Tensor) -> Tensor:
        return x.reshape(3, n_head, head_dim, *x.shape[1:]).transpose(0, 1).reshape(x.shape)

    return to_ours, to_theirs


def pairs(model: nn.Module, hf: nn.Module) -> list[Pair]:
    """Every weight of a modformer GPT against an HF ``GPTNeoXForCausalLM``."""
    m = hf.gpt_neox
    out = linear_pairs("tok_emb", model.tok_emb, m.embed_in)
    for i, (ours, theirs) in enumerate(zip(model.blocks, m.layers, strict=True)):
        to_ours, to_theirs = _qkv_maps(ours.attn.n_head, ours.attn.head_dim)
        qkv, hf_qkv = ours.attn.qkv, theirs.attention.query_key_value
        out.append(Pair(f"blocks.{i}.attn.qkv.weight", qkv.weight, hf_qkv.weight, to_ours, to_theirs))
        out.append(Pair(f"blocks.{i}.attn.qkv.bias", qkv.bias, hf_qkv.bias, to_ours, to_theirs))
        out += linear_pairs(f"blocks.{i}.attn.out", ours.attn.out, theirs.attention.dense)
        out += linear_pairs(f"blocks.{i}.ln1", ours.ln1, theirs.input_layernorm)
        out += linear_pairs(f"blocks.{i}.ln2", ours.ln2, theirs.post_attention_layernorm)
        out += linear_pairs(f"blocks.{i}.mlp.up", ours.mlp.up, theirs.mlp.dense_h_to_4h)
        out += linear_pairs(f"blocks.{i}.mlp.down", ours.mlp.down, theirs.mlp.dense_4h_to_h)
    out += linear_pairs("ln_f", model.ln_f, m.final_layer_norm)
    if not model.cfg.tie_embeddings:
        out += linear_pairs("lm_head", model.lm_head, hf.lm_head)
    return out
