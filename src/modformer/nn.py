"""Drop-in modules with PyTorch's interfaces, backed by modformer's attention kernels.

``MultiheadAttention`` takes ``torch.nn.MultiheadAttention``'s constructor and ``forward`` arguments, keeps its
parameter names (``in_proj_weight`` / ``q_proj_weight``..., ``in_proj_bias``, ``out_proj``, ``bias_k``,
``bias_v``), so a torch state dict loads unchanged, and returns the same outputs (tested to float tolerance).
The scores go through ``kernels.attend`` (``backend``: sdpa | eager | flex). Differences: fully masked query rows
give 0 instead of NaN; with dropout the returned weights are those before dropout; ``is_causal=True`` needs no
``attn_mask`` (the causal mask is built).

``kind="sliding_window"`` (any registered attention kind, with its options) runs that kind's module instead:
self-attention only (query, key and value the same tensor), masked by the kind's own pattern (causal) plus
``key_padding_mask`` (positions then count from each row's first real token); a torch state dict still loads
(``in_proj_*`` -> ``attn.qkv``, ``out_proj`` -> ``attn.out``; a kind's extra parameters keep their values).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modformer.layers.attention.kernels import AttnSpec, attend

TORCH_TO_KIND = {"in_proj_weight": "attn.qkv.weight", "in_proj_bias": "attn.qkv.bias",
                 "out_proj.weight": "attn.out.weight", "out_proj.bias": "attn.out.bias"}


class MultiheadAttention(nn.Module):
    """``torch.nn.MultiheadAttention`` on modformer's kernels (or on a registered attention ``kind``)."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: int | None = None,
                 vdim: int | None = None, batch_first: bool = False, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, kind: str | None = None, backend: str = "sdpa",
                 **options: object) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.dropout, self.batch_first, self.backend, self.kind = dropout, batch_first, backend, kind
        self.add_zero_attn = add_zero_attn
        factory = dict(device=device, dtype=dtype)
        if kind is not None:
            if not self._qkv_same_embed_dim or add_bias_kv or add_zero_attn:
                raise ValueError(f"kind={kind!r} is self-attention: kdim / vdim / add_bias_kv / add_zero_attn "
                                 "are not supported with it")
            self.attn, self._no_position = _build_kind(kind, embed_dim, num_heads, dropout, bias, backend, options)
            self.attn.to(**factory)
            self._register_load_state_dict_pre_hook(self._from_torch_names)
            return
        if options:
            raise ValueError(f"unknown MultiheadAttention arguments {sorted(options)} (options need kind=...)")
        E = embed_dim
        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * E, E, **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(E, E, **factory))
            self.k_proj_weight = nn.Parameter(torch.empty(E, self.kdim, **factory))
            self.v_proj_weight = nn.Parameter(torch.empty(E, self.vdim, **factory))
            self.register_parameter("in_proj_weight", None)
        self.in_proj_bias = nn.Parameter(torch.empty(3 * E, **factory)) if bias else None
        self.out_proj = nn.Linear(E, E, bias=bias, **factory)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, E, **factory))
            self.bias_v = nn.Parameter(torch.empty(1, 1, E, **factory))
        else:
            self.bias_k = self.bias_v = None
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """torch's initialisation: Xavier-uniform projections, zero biases, normal bias_k / bias_v."""
        for w in (self.in_proj_weight, self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
            if w is not None:
                nn.init.xavier_uniform_(w)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)
        for b in (self.bias_k, self.bias_v):
            if b is not None:
                nn.init.xavier_normal_(b)

    def _from_torch_names(self, state_dict: dict, prefix: str, *args: object) -> None:
        """Rename a torch MultiheadAttention state dict onto ``attn``; fill the kind's extra parameters."""
        for old, new in TORCH_TO_KIND.items():
            if prefix + old in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old)
        if any(k.startswith(prefix + "attn.") for k in state_dict):
            for name, t in self.state_dict().items():
                state_dict.setdefault(prefix + name, t)

    # ---- forward -------------------------------------------------------------------------------------
    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        """``(attn_output, attn_weights)`` as torch's: output ``(L, N, E)`` (``(N, L, E)`` with batch_first,
        ``(L, E)`` unbatched); weights ``(N, L, S)`` averaged over heads, ``(N, H, L, S)`` if not averaged,
        None unless ``need_weights``. Masks: bool True = not attended, float = added to the scores."""
        batched, same = query.dim() == 3, key is query and value is query
        if self.kind is not None and not same:
            raise ValueError(f"kind={self.kind!r} is self-attention: pass the same tensor as query, key and value")
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
            if attn_mask is not None and attn_mask.dim() == 3:
                attn_mask = attn_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        if self.kind is not None:
            out, weights = self._kind_forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                                              is_causal)
        else:
            out, weights = self._attend(query, key, value, key_padding_mask, need_weights, attn_mask, is_causal)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if not batched:
            return out[0], (weights[0] if weights is not None else None)
        return (out if self.batch_first else out.transpose(0, 1)), weights

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        E = self.embed_dim
        b = self.in_proj_bias.split(E) if self.in_proj_bias is not None else (None, None, None)
        if self._qkv_same_embed_dim:
            wq, wk, wv = self.in_proj_weight.split(E)
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        return F.linear(query, wq, b[0]), F.linear(key, wk, b[1]), F.linear(value, wv, b[2])

    def _attend(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None,
                need_weights: bool, attn_mask: Tensor | None, is_causal: bool) -> tuple[Tensor, Tensor | None]:
        N, L, E = query.shape
        H, Dh = self.num_heads, self.head_dim
        q, k, v = self._project(query, key, value)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(N, 1, E)], 1)
            v = torch.cat([v, self.bias_v.expand(N, 1, E)], 1)
            attn_mask, key_padding_mask = _pad_key(attn_mask), _pad_key(key_padding_mask)
        q, k, v = (t.view(N, -1, H, Dh).transpose(1, 2) for t in (q, k, v))     # (N, H, T, Dh)
        if self.add_zero_attn:
            k, v = F.pad(k, (0, 0, 0, 1)), F.pad(v, (0, 0, 0, 1))
            attn_mask, key_padding_mask = _pad_key(attn_mask), _pad_key(key_padding_mask)
        S = k.shape[2]
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(L, S, dtype=torch.bool, device=q.device).triu(1)
        keep, bias = _merge_masks(attn_mask, key_padding_mask, N, H, L, S)
        spec = AttnSpec(causal=False, keep=keep, bias=bias, scale=1.0 / math.sqrt(Dh),
                        dropout_p=self.dropout if self.training else 0.0)
        z, probs = attend(q, k, v, spec, self.backend, need_weights)
        out = self.out_proj(z.transpose(1, 2).reshape(N, L, E))
        return out, (probs.to(out.dtype) if probs is not None else None)

    def _kind_forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None,
                      need_weights: bool, attn_mask: Tensor | None, is_causal: bool) -> tuple[Tensor, Tensor | None]:
        from modformer.layers.attention.masks import row_positions
        from modformer.layers.context import Context

        if attn_mask is not None:
            raise ValueError(f"attn_mask is not supported with kind={self.kind!r} (its pattern is the mask; "
                             "padding goes in key_padding_mask)")
        N, T, _ = query.shape
        ctx = Context(pos=torch.arange(T, device=query.device), position=self._no_position)
        if key_padding_mask is not None:
            if key_padding_mask.dtype != torch.bool:
                raise ValueError(f"kind={self.kind!r} takes a boolean key_padding_mask (True = padding)")
            valid = ~key_padding_mask.to(query.device)
            ctx.slots, ctx.key_valid = ctx.pos, valid
            ctx.key_pos = ctx.pos = row_positions(valid)
        captured: list[Tensor] = []
        hook = getattr(self.attn, "hook_pattern", None)
        if need_weights and hook is None:
            raise ValueError(f"kind={self.kind!r} has no attention weights (need_weights=False)")
        handle = hook.add_hook(lambda x, h: captured.append(x)) if need_weights else None
        try:
            out = self.attn(query, ctx)
        finally:
            if handle is not None:
                handle.remove()
        return out, (captured[0].to(out.dtype) if captured else None)


def _build_kind(kind: str, embed_dim: int, num_heads: int, dropout: float, bias: bool, backend: str,
                options: dict) -> tuple[nn.Module, nn.Module]:
    """The registered attention ``kind`` and a ``Position`` (none: torch's attention has no positions)."""
    from modformer.config import ModelConfig
    from modformer.layers.block import build_component
    from modformer.layers.position import Position

    cfg = ModelConfig(d_model=embed_dim, n_head=num_heads, bias=bias, attention=kind, attention_options=options,
                      attn_backend=backend, attn_dropout=dropout, position="none", n_layer=1)
    return build_component("attention", kind, dict(options), cfg, 0), Position(cfg)


def _pad_key(mask: Tensor | None) -> Tensor | None:
    """One more key column (bias_k / zero attention), never masked."""
    if mask is None:
        return None
    return F.pad(mask, (0, 1), value=False if mask.dtype == torch.bool else 0.0)


def _merge_masks(attn_mask: Tensor | None, key_padding_mask: Tensor | None, N: int, H: int, L: int,
                 S: int) -> tuple[Tensor | None, Tensor | None]:
    """torch's masks -> a keep-mask (all boolean) or an additive bias (any float), ``(N|1, H|1, L, S)``."""
    parts = []
    if attn_mask is not None:                       # (L, S) | (N * H, L, S) | (1, H, L, S) (unbatched (H, L, S))
        parts.append(attn_mask.view(1, 1, L, S) if attn_mask.dim() == 2 else attn_mask.view(-1, H, L, S))
    if key_padding_mask is not None:
        parts.append(key_padding_mask.view(N, 1, 1, S))
    if not parts:
        return None, None
    if all(p.dtype == torch.bool for p in parts):
        masked = parts[0] if len(parts) == 1 else parts[0] | parts[1]
        return ~masked, None
    bias = 0.0
    for p in parts:
        bias = bias + (torch.zeros(p.shape, device=p.device).masked_fill(p, float("-inf"))
                       if p.dtype == torch.bool else p.float())
    return None, bias
