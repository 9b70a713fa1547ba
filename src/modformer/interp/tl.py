"""Load a modformer GPT into TransformerLens's ``HookedTransformer`` (the ``interp`` extra; TransformerLens < 4).

Supported: MHA, learned absolute positions (``learned``: TL's "standard"; ``shortformer``), pre-norm LayerNorm /
RMSNorm / no norm (final norm present iff blocks have one), causal attention, attention-only or MLP (relu / gelu /
gelu_tanh) blocks, with or without biases. The conversion is ``weights.split_heads`` per layer (TL stores W_Q/W_K/W_V
as ``(H, D, Dh)`` and W_O as ``(H, Dh, D)``, the row convention used throughout ``interp``) plus: ``embed.W_E =
tok_emb.weight``, ``pos_embed.W_pos = wpe.weight[:n_ctx]``, ``unembed.W_U = lm_head.weight.T`` (b_U = 0), ``mlp.W_in =
up.weight.T``, ``mlp.W_out = down.weight.T``; missing biases become zeros.

Convention differences (modformer vs TransformerLens):
- hook_q / hook_k / hook_v / hook_z: ours ``(B, H, T, Dh)``, TL ``(B, T, H, Dh)``;
  hook_pattern ``(B, H, Tq, Tk)`` and hook_result ``(B, T, H, D)`` agree (TL needs ``use_attn_result``).
- TL has ``hook_attn_scores`` (pre-softmax); we expose only the pattern.
- TL's ``from_pretrained`` folds LayerNorm, centres writing weights and the unembedding and folds value
  biases into b_O by default; ``extract_weights(fold_ln, center_writing, center_unembed)`` reproduces the
  first three (value-bias folding is not done: b_V stays per head).
- TL prepends BOS by default for string inputs; token-id inputs (as here) are used as given.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from modformer.interp.weights import attention_modules, split_heads


def _require_tl() -> Any:
    try:
        import transformer_lens
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError as e:
        raise ImportError("needs transformer-lens < 4 (HookedTransformer): pip install 'modformer[interp]'") from e
    return transformer_lens


def tl_config(model: nn.Module, **overrides: Any) -> Any:
    """The matching ``HookedTransformerConfig`` (raises ValueError for unsupported options)."""
    from transformer_lens import HookedTransformerConfig

    c = model.cfg
    bad = []
    if c.kv_heads != c.n_head:
        bad.append(f"attention={c.attention} (grouped K/V heads)")
    if c.position not in ("learned", "shortformer"):
        bad.append(f"position={c.position}")
    if c.norm_placement != "pre" and c.norm != "none":
        bad.append(f"norm_placement={c.norm_placement}")
    if c.norm != "none" and not c.final_norm:
        bad.append("final_norm=false (TL always has ln_final with normalization)")
    if c.layer_overrides:
        bad.append("layer_overrides (per-layer shapes, e.g. a pruned model)")
    if c.qk_norm or c.rezero or not c.causal or c.scale_embeddings:
        bad.append("qk_norm / rezero / non-causal / scale_embeddings")
    bad += [f"{f}={getattr(c, f)}" for f in c.GPT_ONLY if getattr(c, f)]   # speedrun components
    acts = {"relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_new"}
    if not c.attn_only and c.ffn not in acts:
        bad.append(f"ffn={c.ffn}")
    if bad:
        raise ValueError("TransformerLens conversion does not support " + ", ".join(bad))
    pos_type = "shortformer" if c.position == "shortformer" else "standard"
    kw = dict(n_layers=c.n_layer, d_model=c.d_model, n_ctx=c.max_seq_len, d_head=c.head_dim, n_heads=c.n_head,
              d_vocab=c.vocab_size, attn_only=c.attn_only, eps=c.norm_eps, positional_embedding_type=pos_type,
              normalization_type={"layernorm": "LN", "rmsnorm": "RMS", "none": None}[c.norm],
              default_prepend_bos=False, use_attn_result=True, original_architecture="modformer",
              dtype=model.tok_emb.weight.dtype, device=str(model.tok_emb.weight.device))
    if not c.attn_only:
        kw.update(act_fn=acts[c.ffn], d_mlp=model.blocks[0].mlp.up.out_features)
    kw.update(overrides)
    return HookedTransformerConfig(**kw)


def tl_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """modformer weights in HookedTransformer's names and layouts (unprocessed)."""
    c = model.cfg
    D, V = c.d_model, c.vocab_size
    zeros = lambda *s: torch.zeros(*s, dtype=model.tok_emb.weight.dtype, device=model.tok_emb.weight.device)  # noqa: E731

    def norm(prefix: str, mod: nn.Module) -> dict[str, torch.Tensor]:
        if c.norm == "none":
            return {}
        out = {f"{prefix}.w": mod.weight.detach()}
        if c.norm == "layernorm":
            out[f"{prefix}.b"] = mod.bias.detach() if mod.bias is not None else zeros(D)
        return out

    sd = {"embed.W_E": model.tok_emb.weight.detach(), "pos_embed.W_pos": model.position.wpe.weight.detach(),
          "unembed.W_U": model.lm_head.weight.detach().T, "unembed.b_U": zeros(V)}
    for i, (block, attn) in enumerate(zip(model.blocks, attention_modules(model))):
        W_Q, W_K, W_V, W_O, b_Q, b_K, b_V, b_O = split_heads(attn)
        p = f"blocks.{i}"
        sd.update({f"{p}.attn.W_Q": W_Q, f"{p}.attn.W_K": W_K, f"{p}.attn.W_V": W_V, f"{p}.attn.W_O": W_O,
                   f"{p}.attn.b_Q": b_Q, f"{p}.attn.b_K": b_K, f"{p}.attn.b_V": b_V, f"{p}.attn.b_O": b_O})
        sd.update(norm(f"{p}.ln1", block.ln1))
        if block.mlp is not None:
            mlp = block.mlp
            F_ = mlp.up.out_features
            sd.update({f"{p}.mlp.W_in": mlp.up.weight.detach().T, f"{p}.mlp.W_out": mlp.down.weight.detach().T,
                       f"{p}.mlp.b_in": mlp.up.bias.detach() if mlp.up.bias is not None else zeros(F_),
                       f"{p}.mlp.b_out": mlp.down.bias.detach() if mlp.down.bias is not None else zeros(D)})
            sd.update(norm(f"{p}.ln2", block.ln2))
    sd.update(norm("ln_final", model.ln_f))
    return {k: v.clone().to(model.tok_emb.weight.dtype) for k, v in sd.items()}


def to_hooked_transformer(model: nn.Module, fold_ln: bool = False, center_writing_weights: bool = False,
                          center_unembed: bool = False, fold_value_biases: bool = False) -> Any:
    """A ``HookedTransformer`` computing the same function (processing flags as in TransformerLens)."""
    tl = _require_tl()
    ht = tl.HookedTransformer(tl_config(model))
    ht.load_and_process_state_dict(tl_state_dict(model), fold_ln=fold_ln,
                                   center_writing_weights=center_writing_weights, center_unembed=center_unembed,
                                   fold_value_biases=fold_value_biases)
    return ht.eval()
