"""Term importance for attention-only transformers: the logits as a sum of paths (Elhage et al. 2021).

With each layer's attention patterns and each norm's per-token scale frozen at their values on the input, an
attention-only pre-norm transformer is linear in the embeddings, and the logits expand exactly into

    direct      embedding -> unembedding
    one_head    embedding -> head (l, h) -> unembedding                 (one per head)
    two_head    embedding -> head (l1, h1) -> head (l2, h2) -> unembed   (virtual attention heads, l1 < l2)
    higher      paths through three or more heads (3+ layers)
    bias        everything that starts at a bias (norm biases, b_V, b_O, the unembedding bias)

``path_terms`` returns every path's logits (float64, on a float64 copy of the model) and they sum to the model's
logits (tested for 1 and 2 layers). ``term_importance`` measures each class by ablation: the loss of the logits
with that class's terms removed, patterns kept frozen. A frozen norm scale s makes ``LN(x) = P(x) / s * w + b``
(P: centring for LayerNorm, identity for RMSNorm) affine in x, so the split is exact; ``path_terms`` recomputes
nothing through softmax, which is what "frozen patterns" means.

``dump_circuits`` writes the token-level OV and QK rows of every head for chosen tokens to safetensors + a
JSON index (seed 004: "complete attention heads dump").
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modformer.interp.weights import ModelWeights, attention_modules
from modformer.utils import atomic_write, atomic_write_text

PathKey = tuple[tuple[int, int], ...] | str           # heads traversed in order, or "bias"
CLASSES = ("direct", "one_head", "two_head", "higher", "bias")


def path_class(key: PathKey) -> str:
    """The class of a path key: ``()`` direct, one / two heads, ``higher``, or ``"bias"``."""
    if key == "bias":
        return "bias"
    return {0: "direct", 1: "one_head", 2: "two_head"}.get(len(key), "higher")


def _check_model(model: nn.Module) -> None:
    cfg = model.cfg
    if any(getattr(b, "mlp", None) is not None for b in model.blocks):
        raise ValueError("term importance needs an attention-only model (model.attn_only: true)")
    if cfg.norm != "none" and cfg.norm_placement != "pre":
        raise ValueError(f"term importance needs pre-norm blocks, not norm_placement={cfg.norm_placement!r}")
    if cfg.model_options.get("denseformer"):
        raise ValueError("term importance does not support DenseFormer averaging")
    if cfg.unet_skips or cfg.value_embeds or cfg.logit_softcap:
        raise ValueError("term importance does not support model.unet_skips, value_embeds or logit_softcap")
    attention_modules(model, sparse_ok=True)     # mha / gqa / mqa and fixed sparse patterns (per-head V and O;
                                                 # the patterns are read from the run, so a mask is included)


def _frozen_norm(norm: nn.Module, x_full: Tensor) -> tuple[Any, Tensor]:
    """``(linear part, bias)`` of ``norm`` with its per-token scale frozen at its value on ``x_full``."""
    if isinstance(norm, nn.Identity):
        return (lambda c: c), torch.zeros(x_full.shape[-1], dtype=x_full.dtype, device=x_full.device)
    w = norm.weight if getattr(norm, "weight", None) is not None else torch.ones_like(x_full[0, 0])
    b = norm.bias if getattr(norm, "bias", None) is not None else torch.zeros_like(x_full[0, 0])
    eps = norm.eps if norm.eps is not None else torch.finfo(x_full.dtype).eps
    if isinstance(norm, nn.LayerNorm):
        scale = torch.sqrt(x_full.var(-1, unbiased=False, keepdim=True) + eps)
        return (lambda c: (c - c.mean(-1, keepdim=True)) / scale * w), b
    if isinstance(norm, nn.RMSNorm):
        scale = torch.sqrt(x_full.pow(2).mean(-1, keepdim=True) + eps)
        return (lambda c: c / scale * w), b
    raise ValueError(f"cannot freeze norm {type(norm).__name__}")


def _value_output(attn: nn.Module) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """W_V ``(H, D, Dh)``, b_V ``(H, Dh)``, W_O ``(H, Dh, D)``, b_O ``(D,)`` in the model's dtype."""
    H, Hkv, Dh = attn.n_head, attn.n_kv_heads, attn.head_dim
    w = attn.qkv.weight.detach()
    D = w.shape[1]
    wv = w[(H + Hkv) * Dh:].view(Hkv, Dh, D).transpose(1, 2).repeat_interleave(H // Hkv, 0)
    bias = attn.qkv.bias
    bv = (bias.detach()[(H + Hkv) * Dh:].view(Hkv, Dh).repeat_interleave(H // Hkv, 0) if bias is not None
          else w.new_zeros(H, Dh))
    wo = attn.out.weight.detach().view(D, H, Dh).permute(1, 2, 0)
    bo = attn.out.bias.detach() if attn.out.bias is not None else w.new_zeros(D)
    return wv, bv, wo, bo


@torch.no_grad()
def path_terms(model: nn.Module, idx: Tensor) -> tuple[dict[PathKey, Tensor], Tensor]:
    """Every path's logits ``{key: (B, T, V)}`` (float64) and the float64 model's logits they sum to.

    There are (H + 1)^L paths: meant for the small models of the circuits papers."""
    _check_model(model)
    m = copy.deepcopy(model).double().eval()
    L = len(m.blocks)
    names = [f"blocks.{i}.hook_resid_pre" for i in range(L)] + [f"blocks.{i}.attn.hook_pattern" for i in range(L)]
    names.append(f"blocks.{L - 1}.hook_resid_post")
    logits, cache = m.run_with_cache(idx, names_filter=names)
    comps: dict[PathKey, Tensor] = {(): cache["blocks.0.hook_resid_pre"], "bias": torch.zeros_like(
        cache["blocks.0.hook_resid_pre"])}
    for i, block in enumerate(m.blocks):
        lin, ln_bias = _frozen_norm(block.ln1, cache[f"blocks.{i}.hook_resid_pre"])
        wv, bv, wo, bo = _value_output(block.attn)
        pattern = cache[f"blocks.{i}.attn.hook_pattern"]                      # (B, H, T, T)
        gate = block.gate_attn if getattr(block, "gate_attn", None) is not None else 1.0
        new: dict[PathKey, Tensor] = {}
        for key, c in comps.items():
            x = lin(c) + (ln_bias if key == "bias" else 0.0)                  # the norm's bias starts a bias path
            v = torch.einsum("btd,hde->bhte", x, wv) + (bv[None, :, None] if key == "bias" else 0.0)
            outs = torch.einsum("bhts,bhse,hed->bhtd", pattern, v, wo) * gate  # (B, H, T, D) per head
            for h in range(outs.shape[1]):
                target = "bias" if key == "bias" else key + ((i, h),)
                new[target] = new.get(target, 0.0) + outs[:, h]
        new["bias"] = new.get("bias", 0.0) + bo * gate
        for key, c in new.items():
            comps[key] = comps.get(key, 0.0) + c
    lin, ln_bias = _frozen_norm(m.ln_f, cache[f"blocks.{L - 1}.hook_resid_post"])
    W_U = m.lm_head.weight.detach().T
    b_U = m.lm_head.bias.detach() if getattr(m.lm_head, "bias", None) is not None else 0.0
    terms = {key: lin(c) @ W_U for key, c in comps.items()}
    terms["bias"] = terms["bias"] + ln_bias @ W_U + b_U
    return terms, logits


def class_sums(terms: dict[PathKey, Tensor]) -> dict[str, Tensor]:
    """Sum of the terms of each class present (``CLASSES`` order)."""
    out: dict[str, Tensor] = {}
    for key, t in terms.items():
        c = path_class(key)
        out[c] = out.get(c, 0.0) + t
    return {c: out[c] for c in CLASSES if c in out}


def _loss(logits: Tensor, targets: Tensor) -> float:
    return float(F.cross_entropy(logits.flatten(0, 1), targets.flatten().to(logits.device), ignore_index=-100))


def term_importance(model: nn.Module, idx: Tensor, targets: Tensor | None = None, top: int = 10) -> dict[str, Any]:
    """Each term class's importance by ablation, patterns frozen: ``{"loss", "classes": {name: {"loss_without",
    "delta_loss", "norm_share"}}, "top_paths": [...]}``. ``targets`` default to the next tokens of ``idx``
    (the last position ignored). ``top_paths``: the individual head paths whose removal raises the loss most."""
    if targets is None:
        targets = torch.cat([idx[:, 1:], torch.full_like(idx[:, :1], -100)], 1)
    terms, logits = path_terms(model, idx)
    sums = class_sums(terms)
    base = _loss(logits, targets)
    total_norm = sum(float(s.norm()) for s in sums.values())
    classes = {c: {"loss_without": _loss(logits - s, targets), "delta_loss": _loss(logits - s, targets) - base,
                   "norm_share": float(s.norm()) / max(total_norm, 1e-30)} for c, s in sums.items()}
    paths = []
    for key, t in terms.items():
        if key in ((), "bias"):
            continue
        paths.append({"path": " -> ".join(f"L{i}H{h}" for i, h in key), "class": path_class(key),
                      "delta_loss": _loss(logits - t, targets) - base})
    paths.sort(key=lambda r: -r["delta_loss"])
    return {"loss": base, "classes": classes, "top_paths": paths[:top]}


def dump_circuits(w: ModelWeights, tokens: Sequence[int], path: str | Path,
                  token_strings: Sequence[str] | None = None) -> Path:
    """Write every head's OV rows (logit effect on each output token of attending to a chosen source token,
    ``(n, V)``) and QK rows (score of each source token for a chosen destination token, ``(n, V)``) to
    ``path`` (safetensors) and ``path`` + ``.json`` (index: tokens, tensor names, shapes, conventions).

    Token circuits are the direct-path ones (``circuits.ov_circuit`` / ``qk_circuit``; biases ignored)."""
    from safetensors.torch import save_file

    from modformer.interp.circuits import ov_circuit, qk_circuit

    path = Path(path)
    ids = torch.as_tensor(list(tokens), dtype=torch.long)
    V = w.W_E.shape[0]
    if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= V:
        raise ValueError(f"tokens must be non-empty ids in [0, {V}), got {list(tokens)[:8]}")
    ov, qk = ov_circuit(w), qk_circuit(w)
    present = w.present()
    tensors, index = {}, {}
    for layer in range(w.n_layer):
        for head in range(w.n_head):
            if not present[layer, head]:
                continue
            for kind, circ in (("ov", ov), ("qk", qk)):
                name = f"L{layer}H{head}.{kind}"
                tensors[name] = circ[layer, head].rows(ids).float().contiguous().cpu()
                index[name] = {"layer": layer, "head": head, "kind": kind, "shape": list(tensors[name].shape)}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file(tensors, tmp))
    meta = {"file": path.name, "tokens": ids.tolist(), "token_strings": list(token_strings or []),
            "folded_ln": w.folded, "notes": w.notes,
            "conventions": {"ov": "row i: logits (V) added by attending to source token tokens[i] (W_E W_V W_O W_U)",
                            "qk": "row i: unscaled score of each source token (V) for destination token tokens[i] "
                                  "(W_E W_Q W_K^T W_E^T)"},
            "tensors": index}
    atomic_write_text(path.with_name(path.name + ".json"), json.dumps(meta, indent=1))
    return path
