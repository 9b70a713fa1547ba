"""Per-head attention weights in the row convention of TransformerLens, from modformer's fused layout.

modformer stores each layer's projections fused: ``attn.qkv`` is one Linear whose weight rows are
``[q heads; k heads; v heads]`` (``H*Dh``, ``Hkv*Dh``, ``Hkv*Dh`` rows, head-major), and
``attn.out`` maps the concatenated heads ``(H*Dh)`` back to ``D``. Extraction splits them into

    W_Q, W_K, W_V  (L, H, D, Dh)   q = x @ W_Q[l, h] + b_Q[l, h]     (GQA/MQA: K/V repeated per query head)
    W_O            (L, H, Dh, D)   out = sum_h z_h @ W_O[l, h] + b_O[l]
    (layers with fewer heads, e.g. after structured pruning, are padded with zero heads; ``head_counts``)
    W_E (V, D), W_pos (Tmax, D) or None, W_U (D, V), b_U (V,)

i.e. activations are row vectors multiplied on the right (as in TransformerLens). The papers'
column convention (Elhage et al. 2021) is the transpose: their ``W_U W_O W_V W_E`` is our
``W_E W_V W_O W_U`` transposed.

LayerNorm folding (``fold_ln=True``, pre-norm blocks): LN(x) = n(x) * w + b with n(x) the
centred, scaled residual. For a reader W with bias c, ``LN(x) @ W + c = n(x) @ (w[:, None] * W)
+ (b @ W + c)``, so w goes into the weights and b into the biases, exactly (the same for
ln_final into W_U/b_U). Because n(x) has zero mean over D, the reading weights are also centred
over D (``W -= W.mean(D)``) without changing any output. RMSNorm folds its weight only (no bias,
no centring). What stays is the per-token scale 1/std(x), which the circuits analyses ignore
(the papers' simplification). ReZero gates are multiplied into W_O and b_O. Not foldable: post-norm
blocks (the norm follows the residual add) and the output norm of sandwich blocks; their weights are
returned unfolded and ``notes`` says so.

``center_writing``: subtract the mean over D from everything that writes into the residual
(W_E, W_pos, W_O, b_O); harmless when every reader is a LayerNorm (pre-norm, ``norm=layernorm``).
``center_unembed``: subtract the mean over the vocabulary from W_U and b_U (softmax-invariant).
These match TransformerLens's ``fold_ln``, ``center_writing_weights`` and ``center_unembed``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from modformer.interp.views import circuit_view, model_kind


@dataclass
class ModelWeights:
    """All attention-head weights of a model in row convention (see the module docstring)."""

    W_E: Tensor                      # (V, D)
    W_pos: Tensor | None             # (Tmax, D) absolute positions, None for rope/alibi/none
    W_Q: Tensor                      # (L, H, D, Dh)
    W_K: Tensor                      # (L, H, D, Dh)
    W_V: Tensor                      # (L, H, D, Dh)
    W_O: Tensor                      # (L, H, Dh, D)
    b_Q: Tensor                      # (L, H, Dh)
    b_K: Tensor                      # (L, H, Dh)
    b_V: Tensor                      # (L, H, Dh)
    b_O: Tensor                      # (L, D)
    W_U: Tensor                      # (D, V)
    b_U: Tensor                      # (V,)
    norm: str = "none"               # the blocks' norm: layernorm | rmsnorm | none
    norm_eps: float = 1e-5
    folded: bool = False             # norm weights/biases folded into the readers
    causal: bool = True
    notes: list[str] = field(default_factory=list)
    head_counts: list[int] | None = None  # per-layer heads when they differ (structured pruning); the rest are zeros

    def present(self) -> Tensor:
        """``(L, H)`` bool: True for real heads, False for the zero padding of layers with fewer heads."""
        counts = self.head_counts or [self.n_head] * self.n_layer
        return torch.arange(self.n_head)[None, :] < torch.tensor(counts)[:, None]

    @property
    def input_norm(self) -> str:
        """The parameter-free normalisation the (folded) readers expect: ``normalize(resid, input_norm)``."""
        return self.norm if self.folded else "none"

    @property
    def n_layer(self) -> int:
        return self.W_Q.shape[0]

    @property
    def n_head(self) -> int:
        return self.W_Q.shape[1]

    @property
    def d_model(self) -> int:
        return self.W_Q.shape[2]

    @property
    def d_head(self) -> int:
        return self.W_Q.shape[3]

    def QK(self) -> Tensor:
        """Dense bilinear forms W_Q W_K^T ``(L, H, D, D)``: score = x_dest @ QK @ x_src^T (unscaled)."""
        return self.W_Q @ self.W_K.transpose(-1, -2)

    def OV(self) -> Tensor:
        """Dense W_V W_O ``(L, H, D, D)``: a head moves x_src @ OV into the destination's residual."""
        return self.W_V @ self.W_O


def _linear_head_classes() -> tuple[type, ...]:
    """Attention classes whose heads are exactly softmax(x W_Q W_K^T x^T) x W_V W_O (extend to opt in)."""
    from modformer.layers.attention.mha import MultiHeadAttention

    return (MultiHeadAttention,)


def attention_modules(model: nn.Module, sparse_ok: bool = False) -> list[nn.Module]:
    """The attention module of every block; only plain mha/gqa/mqa (subclasses may mix heads: refused).
    ``sparse_ok``: also the fixed sparse patterns (``layers/attention/sparse.py``: the same per-head weights, the
    pattern only hides keys), for weight-only analyses; not for a conversion that would drop the pattern."""
    from modformer.layers.attention.sparse import SparseAttention

    if getattr(model, "blocks", None) is None:       # an hourglass: pass circuit_view(model) (views.py)
        raise ValueError(f"model kind {model_kind(model)!r} ({type(model).__name__}) has no .blocks; this analysis "
                         "reads decoders with .blocks")
    names = getattr(model, "layer_names", None) or [f"blocks.{i}" for i in range(len(model.blocks))]
    mods = []
    for name, block in zip(names, model.blocks):
        attn = getattr(block, "attn", None)
        if type(attn) not in _linear_head_classes() and not (sparse_ok and isinstance(attn, SparseAttention)):
            raise ValueError(f"{name}.attn ({type(attn).__name__}) has no per-head W_Q/W_K/W_V/W_O; "
                             "weight extraction supports mha/gqa/mqa attention")
        mods.append(attn)
    return mods


def split_heads(attn: nn.Module) -> tuple[Tensor, ...]:
    """One attention module -> W_Q, W_K, W_V (H, D, Dh), W_O (H, Dh, D), b_Q, b_K, b_V (H, Dh), b_O (D,)."""
    H, Hkv, Dh = attn.n_head, attn.n_kv_heads, attn.head_dim
    w = attn.qkv.weight.detach().float()                              # (H*Dh + 2*Hkv*Dh, D)
    D = w.shape[1]
    wq, wk, wv = w.split([H * Dh, Hkv * Dh, Hkv * Dh], dim=0)
    rep = H // Hkv

    def heads(m: Tensor, n: int) -> Tensor:                            # (n*Dh, D) -> (H, D, Dh)
        return m.view(n, Dh, D).transpose(1, 2).repeat_interleave(H // n, dim=0)

    if attn.qkv.bias is not None:
        bq, bk, bv = attn.qkv.bias.detach().float().split([H * Dh, Hkv * Dh, Hkv * Dh])
        b_Q = bq.view(H, Dh)
        b_K, b_V = bk.view(Hkv, Dh).repeat_interleave(rep, 0), bv.view(Hkv, Dh).repeat_interleave(rep, 0)
    else:
        b_Q = b_K = b_V = torch.zeros(H, Dh, device=w.device)
    wo = attn.out.weight.detach().float()                             # (D, H*Dh)
    W_O = wo.view(D, H, Dh).permute(1, 2, 0)                          # (H, Dh, D)
    b_O = attn.out.bias.detach().float() if attn.out.bias is not None else torch.zeros(D, device=w.device)
    return heads(wq, H), heads(wk, Hkv), heads(wv, Hkv), W_O, b_Q, b_K, b_V, b_O


def _norm_kind(mod: nn.Module | None) -> str:
    if mod is None or isinstance(mod, nn.Identity):
        return "none"
    if isinstance(mod, nn.LayerNorm):
        return "layernorm"
    if isinstance(mod, nn.RMSNorm):
        return "rmsnorm"
    raise ValueError(f"cannot fold norm {type(mod).__name__}")


def _norm_params(mod: nn.Module, d: int, device: torch.device) -> tuple[Tensor, Tensor]:
    w = getattr(mod, "weight", None)
    b = getattr(mod, "bias", None)
    w = w.detach().float() if w is not None else torch.ones(d, device=device)
    b = b.detach().float() if b is not None else torch.zeros(d, device=device)
    return w, b


def _fold_reader(W: Tensor, b: Tensor, w: Tensor, nb: Tensor, center: bool) -> tuple[Tensor, Tensor]:
    """Fold norm (w, nb) into a reader W (..., D, n) with bias b (..., n)."""
    b = b + torch.einsum("d,...dn->...n", nb, W)
    W = W * w[:, None]
    if center:
        W = W - W.mean(-2, keepdim=True)
    return W, b


def extract_weights(model: nn.Module, fold_ln: bool = True, center_writing: bool = False,
                    center_unembed: bool = False) -> ModelWeights:
    """Per-head weights of every layer (float32, detached; the model is not modified). Sparse-pattern attention
    (sliding window, sinks, ...) has the same per-head matrices; its pattern is not part of them. For the hourglass,
    the token-level layers in forward order (``views.py`` says when that reading holds; otherwise ValueError)."""
    model = circuit_view(model)
    if getattr(model, "weights_refused", None):
        raise ValueError(model.weights_refused)
    attns = attention_modules(model, sparse_ok=True)
    parts = [split_heads(a) for a in attns]
    counts = [p[0].shape[0] for p in parts]
    H = max(counts)

    def pad(t: Tensor) -> Tensor:                 # zero heads up to H (pruned layers keep fewer heads)
        return torch.cat([t, t.new_zeros(H - t.shape[0], *t.shape[1:])]) if t.shape[0] < H else t

    W_Q, W_K, W_V, W_O, b_Q, b_K, b_V = (torch.stack([pad(x) for x in t]) for t in list(zip(*parts))[:7])
    b_O = torch.stack([p[7] for p in parts])
    W_E = model.tok_emb.weight.detach().float() * getattr(model, "embed_scale", 1.0)   # what the residual receives
    D = W_E.shape[1]
    dev = W_E.device
    W_pos = None
    position = getattr(model, "position", None)
    if position is not None:
        n = getattr(position, "max_len", None) or getattr(getattr(model, "cfg", None), "max_seq_len", 1024)
        pe = position.embed(torch.arange(n, device=dev))
        if pe is None:
            pe = position.qk_embed(torch.arange(n, device=dev))        # shortformer: queries and keys only
        W_pos = pe.detach().float().clone() if pe is not None else None
    W_U = model.lm_head.weight.detach().float().t().clone()         # (D, V)
    b_U = model.lm_head.bias.detach().float().clone() if getattr(model.lm_head, "bias", None) is not None \
        else torch.zeros(W_U.shape[1], device=dev)
    cfg = getattr(model, "cfg", None)
    placement = getattr(cfg, "norm_placement", "pre")
    kinds = {_norm_kind(b.ln1) for b in model.blocks}
    if len(kinds) > 1:
        raise ValueError(f"mixed norm kinds {kinds} across layers")
    norm = kinds.pop()
    notes: list[str] = []
    if getattr(cfg, "qk_norm", False):
        notes.append("qk_norm: scores are not a bilinear form of the residual; QK circuits ignore the q/k norms")
    if getattr(cfg, "position", "learned") == "rope":
        notes.append("rope: QK circuits are those of relative distance 0 (no rotation applied)")
    if getattr(cfg, "position", "learned") == "shortformer":
        notes.append("shortformer: W_pos enters only queries and keys, after the norm (not folded into it)")
    if getattr(cfg, "position", "learned") == "alibi":
        notes.append("alibi: the per-head distance bias is not part of the QK circuits")
    folded = False
    if fold_ln and norm != "none":
        if placement == "post":
            notes.append("post-norm: norms follow the residual add and are not folded")
        else:
            if placement == "sandwich":
                notes.append("sandwich: the norm after each sublayer is not folded")
            center = norm == "layernorm"
            for i, block in enumerate(model.blocks):
                w, nb = _norm_params(block.ln1, D, dev)
                W_Q[i], b_Q[i] = _fold_reader(W_Q[i], b_Q[i], w, nb, center)
                W_K[i], b_K[i] = _fold_reader(W_K[i], b_K[i], w, nb, center)
                W_V[i], b_V[i] = _fold_reader(W_V[i], b_V[i], w, nb, center)
            folded = True
    for i, block in enumerate(model.blocks):
        gate = getattr(block, "gate_attn", None)
        if gate is not None:             # ReZero: the block scales the attention output by a learned scalar
            W_O[i], b_O[i] = W_O[i] * gate.detach().float(), b_O[i] * gate.detach().float()
    if getattr(cfg, "model_options", {}).get("denseformer"):
        notes.append("denseformer: layers read weighted averages of earlier outputs; circuits ignore the weights")
    final = getattr(model, "ln_f", None)
    if fold_ln and _norm_kind(final) != "none":
        w, nb = _norm_params(final, D, dev)
        W_U, b_U = _fold_reader(W_U, b_U, w, nb, _norm_kind(final) == "layernorm")
    if center_writing:
        if not (norm == "layernorm" and placement == "pre" and _norm_kind(final) in ("layernorm", "none")):
            notes.append("center_writing with readers that are not LayerNorms changes the model's function")
        W_E = W_E - W_E.mean(-1, keepdim=True)
        if W_pos is not None and getattr(cfg, "position", "learned") != "shortformer":   # shortformer: not written
            W_pos = W_pos - W_pos.mean(-1, keepdim=True)
        W_O = W_O - W_O.mean(-1, keepdim=True)
        b_O = b_O - b_O.mean(-1, keepdim=True)
    if center_unembed:
        W_U = W_U - W_U.mean(-1, keepdim=True)
        b_U = b_U - b_U.mean()
    return ModelWeights(W_E=W_E, W_pos=W_pos, W_Q=W_Q, W_K=W_K, W_V=W_V, W_O=W_O, b_Q=b_Q, b_K=b_K,
                        b_V=b_V, b_O=b_O, W_U=W_U, b_U=b_U, norm=norm,
                        norm_eps=getattr(cfg, "norm_eps", 1e-5), folded=folded,
                        causal=getattr(cfg, "causal", True), notes=notes,
                        head_counts=counts if len(set(counts)) > 1 else None)


def normalize(x: Tensor, kind: str, eps: float = 1e-5) -> Tensor:
    """The parameter-free part of a norm: what folded weights expect as input."""
    if kind == "layernorm":
        x = x - x.mean(-1, keepdim=True)
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    if kind == "rmsnorm":
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return x


def attention_forward(weights: ModelWeights, layer: int, x: Tensor) -> tuple[Tensor, Tensor]:
    """Attention sublayer output ``(B, T, D)`` and pattern ``(B, H, T, T)`` from extracted weights alone.

    ``x`` is ``normalize(resid, weights.input_norm)`` when the weights are folded, else the attention
    module's input (the output of ln1). No positional rotation or bias: for learned/sinusoidal/none positions.
    """
    q = torch.einsum("btd,hde->bhte", x, weights.W_Q[layer]) + weights.b_Q[layer][None, :, None]
    k = torch.einsum("btd,hde->bhte", x, weights.W_K[layer]) + weights.b_K[layer][None, :, None]
    v = torch.einsum("btd,hde->bhte", x, weights.W_V[layer]) + weights.b_V[layer][None, :, None]
    scores = q @ k.transpose(-1, -2) / math.sqrt(weights.d_head)
    if weights.causal:
        T = x.shape[1]
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    pattern = scores.softmax(-1)
    z = pattern @ v                                                       # (B, H, T, Dh)
    return torch.einsum("bhte,hed->btd", z, weights.W_O[layer]) + weights.b_O[layer], pattern
