"""Llama, Mistral and Qwen2 (``*ForCausalLM``): one mapping, three small differences.

    model.embed_tokens                   -> tok_emb
    model.layers.i.input_layernorm       -> blocks.i.ln1             (RMSNorm)
    model.layers.i.self_attn.q/k/v_proj  -> blocks.i.attn.qkv rows   ([q; k; v], GQA: Hkv key/value heads)
    model.layers.i.self_attn.o_proj      -> blocks.i.attn.out
    model.layers.i.post_attention_layernorm -> blocks.i.ln2
    model.layers.i.mlp.gate/up/down_proj -> blocks.i.mlp.gate / up / down   (SwiGLU)
    model.norm / lm_head                 -> ln_f / lm_head

HF stores q/k in the half-split RoPE layout (``rotate_half``) that ``position: rope`` uses, so no
permutation is needed. Mistral: ``sliding_window`` -> attention ``sliding_window`` (both keep key j for
query i when i - j < window). Qwen2: biases on q/k/v only (``qkv_bias``); its sliding-window layers become
``layer_overrides``. Llama-3 / linear RoPE scaling -> ``rope_scaling`` (HF's keys).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from modformer.config import ModelConfig
from modformer.layers.ffn import glu_hidden
from modformer.models.hf.common import Pair, linear_pairs, unsupported

MODEL_TYPES = ("llama", "mistral", "qwen2")
_ROPE_TYPES = ("default", "linear", "llama3")
_NAMES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}


def _rope_scaling(c: Any, why: str) -> tuple[float, dict[str, Any]]:
    """(rope_theta, our rope_scaling) from HF's ``rope_parameters`` (transformers 5) or legacy fields."""
    params = dict(getattr(c, "rope_parameters", None) or {})
    theta = float(params.pop("rope_theta", getattr(c, "rope_theta", 10000.0)))
    if "partial_rotary_factor" in params and float(params.pop("partial_rotary_factor")) != 1.0:
        raise unsupported(why, "rope_parameters.partial_rotary_factor != 1 is not supported for this family")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in _ROPE_TYPES:
        raise unsupported(why, f"rope_type={kind!r} is not supported (supported: {', '.join(_ROPE_TYPES)})")
    return theta, ({} if kind == "default" else {**params, "rope_type": kind})


def config_from_hf(c: Any) -> ModelConfig:
    """The ModelConfig equal to an HF Llama / Mistral / Qwen2 config (ValueError names an option with none)."""
    family = c.model_type
    why = f"cannot import HF {_NAMES[family]} model"
    if c.hidden_act != "silu":
        raise unsupported(why, f"hidden_act={c.hidden_act!r} is not supported (SwiGLU needs 'silu')")
    if getattr(c, "pretraining_tp", 1) != 1:
        raise unsupported(why, f"pretraining_tp={c.pretraining_tp} is not supported")
    theta, scaling = _rope_scaling(c, why)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    bias, qkv_bias = False, None
    attention, attention_options, overrides = "mha", {}, []
    if family == "llama":
        attn_bias, mlp_bias = bool(getattr(c, "attention_bias", False)), bool(getattr(c, "mlp_bias", False))
        if attn_bias != mlp_bias:
            raise unsupported(why, f"attention_bias={attn_bias} with mlp_bias={mlp_bias} is not supported "
                                   "(modformer has biases on all linear layers or none)")
        bias = attn_bias
    elif family == "qwen2":
        qkv_bias = True
        types = list(getattr(c, "layer_types", None) or [])
        if "sliding_attention" in types:
            overrides = [{"attention": "sliding_window", "attention_options": {"window": c.sliding_window}}
                         if t == "sliding_attention" else {} for t in types]
    elif c.sliding_window is not None:
        attention, attention_options = "sliding_window", {"window": int(c.sliding_window)}
    return ModelConfig(
        vocab_size=c.vocab_size, max_seq_len=c.max_position_embeddings, d_model=c.hidden_size,
        n_layer=c.num_hidden_layers, n_head=c.num_attention_heads, n_kv_heads=c.num_key_value_heads,
        d_head=head_dim, d_ff=c.intermediate_size, model="gpt", attention=attention,
        attention_options=attention_options, layer_overrides=overrides, position="rope", rope_base=theta,
        rope_scaling=scaling, norm="rmsnorm", norm_eps=c.rms_norm_eps, norm_placement="pre", ffn="swiglu",
        bias=bias, qkv_bias=qkv_bias, causal=True, final_norm=True,
        tie_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        attn_dropout=float(getattr(c, "attention_dropout", 0.0)), init_std=c.initializer_range,
    )


def family_of(cfg: ModelConfig) -> str:
    """Which of the three HF families a rope + rmsnorm config exports to."""
    if cfg.qkv_bias and not cfg.bias:
        return "qwen2"
    return "mistral" if cfg.attention == "sliding_window" else "llama"


def _window(attention: str, options: dict[str, Any], why: str, where: str) -> int | None:
    if attention in ("mha", "gqa", "mqa"):
        extra = set(options) - {"n_kv_heads"}
        if extra:
            raise unsupported(why, f"{where}attention_options {sorted(extra)} (HF has none)")
        return None
    if attention != "sliding_window":
        raise unsupported(why, f"{where}attention={attention!r} (HF needs mha / gqa / mqa or sliding_window)")
    if set(options) - {"window", "block_size"}:
        raise unsupported(why, f"{where}attention_options={options!r} (only window)")
    return int(options["window"])


def hf_config(cfg: ModelConfig) -> tuple[type, type, dict[str, Any]]:
    """(config class, model class, config kwargs) of the HF Llama / Mistral / Qwen2 equal to ``cfg``."""
    import transformers

    family = family_of(cfg)
    name = _NAMES[family]
    why = f"cannot export to HF {name}"
    required = {"model": "gpt", "position": "rope", "norm": "rmsnorm", "norm_placement": "pre", "ffn": "swiglu",
                "qk_norm": False, "rezero": False, "final_norm": True, "causal": True, "attn_only": False,
                "scale_embeddings": False, "parallel_residual": False, "rope_fraction": 1.0,
                "logit_softcap": None, "value_embeds": 0, "unet_skips": False, "window_pattern": []}
    for field, want in required.items():
        if getattr(cfg, field) != want:
            raise unsupported(why, f"model.{field}={getattr(cfg, field)!r} ({name} needs {want!r})")
    if cfg.ffn_options:
        raise unsupported(why, f"model.ffn_options={cfg.ffn_options!r} ({name} has none)")
    if cfg.qkv_bias is not None and cfg.qkv_bias != cfg.bias and family != "qwen2":
        raise unsupported(why, f"model.qkv_bias={cfg.qkv_bias} with model.bias={cfg.bias} "
                               "(Qwen2 needs qkv_bias: true, bias: false)")
    kv = cfg.attention_options.get("n_kv_heads") or (1 if cfg.attention == "mqa" else cfg.kv_heads)
    window = _window(cfg.attention, cfg.attention_options, why, "model.")
    kwargs: dict[str, Any] = dict(
        vocab_size=cfg.vocab_size, max_position_embeddings=cfg.max_seq_len, hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=kv,
        head_dim=cfg.head_dim, intermediate_size=glu_hidden(cfg), hidden_act="silu", rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_theta": cfg.rope_base, "rope_type": "default", **cfg.rope_scaling},
        tie_word_embeddings=cfg.tie_embeddings, attention_dropout=cfg.attn_dropout,
        initializer_range=cfg.init_std, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if family == "qwen2":
        windows = [_window(cfg.for_layer(i).attention, cfg.for_layer(i).attention_options, why,
                           f"model.layer_overrides[{i}].") for i in range(cfg.n_layer)]
        sizes = {w for w in windows if w is not None}
        if len(sizes) > 1:
            raise unsupported(why, f"sliding windows of several sizes {sorted(sizes)} (Qwen2 has one)")
        kwargs.update(use_sliding_window=bool(sizes), sliding_window=sizes.pop() if sizes else None,
                      layer_types=["full_attention" if w is None else "sliding_attention" for w in windows])
    elif cfg.layer_overrides:
        raise unsupported(why, f"model.layer_overrides (per-layer shapes; {name} has one shape)")
    if family == "llama":
        kwargs.update(attention_bias=cfg.bias, mlp_bias=cfg.bias)
    if family == "mistral":
        kwargs.update(sliding_window=window)
    cls = getattr(transformers, f"{name}Config"), getattr(transformers, f"{name}ForCausalLM")
    return cls[0], cls[1], kwargs


def pairs(model: nn.Module, hf: nn.Module) -> list[Pair]:
    """Every weight of a modformer GPT against an HF Llama-family model; q/k/v fill row blocks of our QKV."""
    m = hf.model
    out = linear_pairs("tok_emb", model.tok_emb, m.embed_tokens)
    for i, (ours, theirs) in enumerate(zip(model.blocks, m.layers, strict=True)):
        a, sa = ours.attn, theirs.self_attn
        sizes = [a.n_head * a.head_dim, a.n_kv_heads * a.head_dim, a.n_kv_heads * a.head_dim]
        rows = a.qkv.weight.split(sizes, dim=0)
        bias_rows = a.qkv.bias.split(sizes, dim=0) if a.qkv.bias is not None else (None,) * 3
        for name, w, b, proj in zip("qkv", rows, bias_rows, (sa.q_proj, sa.k_proj, sa.v_proj), strict=True):
            if (b is None) != (proj.bias is None):
                raise ValueError(f"blocks.{i}.attn.qkv: only one side has a {name} bias")
            out.append(Pair(f"blocks.{i}.attn.qkv.{name}.weight", w, proj.weight))
            if b is not None:
                out.append(Pair(f"blocks.{i}.attn.qkv.{name}.bias", b, proj.bias))
        out += linear_pairs(f"blocks.{i}.attn.out", a.out, sa.o_proj)
        out += linear_pairs(f"blocks.{i}.ln1", ours.ln1, theirs.input_layernorm)
        out += linear_pairs(f"blocks.{i}.ln2", ours.ln2, theirs.post_attention_layernorm)
        for name in ("gate", "up", "down"):
            out += linear_pairs(f"blocks.{i}.mlp.{name}", getattr(ours.mlp, name), getattr(theirs.mlp, f"{name}_proj"))
    out += linear_pairs("ln_f", model.ln_f, m.norm)
    if not model.cfg.tie_embeddings:
        out += linear_pairs("lm_head", model.lm_head, hf.lm_head)
    return out
