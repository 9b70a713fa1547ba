"""Decoder-only GPT (registry model ``gpt``): embeddings -> N blocks -> final norm -> LM head.

Every component comes from the registries named in ``ModelConfig``; with ``attn_only=True``
the blocks have no FFN (the circuits papers' attention-only transformers). Weight init
follows GPT-2: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * n_layer).

``model_options``: ``denseformer: true`` adds depth-weighted averaging after the blocks
(``layers/dwa.py``; ``dwa_dilation``, ``dwa_period``). Auxiliary losses: any submodule with an
``aux_loss`` attribute (set in its forward, e.g. MoE load balancing) is summed into ``model.aux_loss``
after each forward (None when there is none), which the trainer adds to the loss; their
``aux_stats`` dicts (e.g. MoE overflow counts) are summed into ``model.aux_stats``.

Speedrun components (modded-nanogpt; ``ModelConfig`` fields, all off by default): ``value_embeds: K`` adds K
token-embedding tables ``ve_t`` (width Hkv * Dh); table t is mixed into the values of layers t and L - K + t
(``MultiHeadAttention.value_mix``). ``unet_skips``: the output of block i < L // 2 is added, times a learned
scalar (init 1), to the input of block L - 1 - i. ``logit_softcap: c``: logits -> c * tanh(logits / c),
computed in float32. ``zero_init_proj`` and ``window_pattern`` act in ``models/common.py`` and
``ModelConfig.for_layer``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from modformer import registry
from modformer.config import ModelConfig
from modformer.layers.attention.masks import row_masks
from modformer.layers.block import Block
from modformer.layers.cache import KVCache, StaticKVCache
from modformer.layers.context import Context
from modformer.layers.dwa import DepthWeightedAverage
from modformer.layers.hooks import HookedMixin, HookPoint, name_hook_points
from modformer.layers.norm import build_norm
from modformer.models.common import (
    AuxLossMixin,
    check_token_input,
    init_linear_and_embeddings,
    token_embeddings,
    wants_value_check,
)
from modformer.models.generation import GenerationMixin
from modformer.registry import ConfigError

GPT_OPTIONS = {"denseformer", "dwa_dilation", "dwa_period"}


@registry.register("model", "gpt")
class GPT(HookedMixin, GenerationMixin, AuxLossMixin, nn.Module):
    """``model(idx) -> logits (B, T, V)``; ``model(idx, cache=..., return_cache=True)`` decodes incrementally."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.embed_scale = cfg.d_model ** 0.5 if cfg.scale_embeddings else 1.0
        self.position = registry.get("position", cfg.position, field="model.position")(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = build_norm(cfg) if cfg.final_norm else nn.Identity()
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.hook_embed = HookPoint()        # (B, T, D) token embeddings
        self.hook_pos_embed = HookPoint()    # (T, D) absolute position embeddings (if any)
        self.hook_resid_final = HookPoint()  # (B, T, D) after the final norm
        unknown = set(cfg.model_options) - GPT_OPTIONS
        if unknown:
            raise ConfigError(f"model.model_options: unknown {sorted(unknown)} for model 'gpt'; "
                              f"allowed: {', '.join(sorted(GPT_OPTIONS))}")
        opts = cfg.model_options
        self.dwa = DepthWeightedAverage(cfg.n_layer, int(opts.get("dwa_dilation", 1)),
                                        int(opts.get("dwa_period", 1))) if opts.get("denseformer") else None
        self._init_speedrun(cfg)
        self.reset_parameters()
        name_hook_points(self)
        self.init_aux()

    def _init_speedrun(self, cfg: ModelConfig) -> None:
        """Value-embedding tables and U-net skip weights (see the module doc); ConfigError for what cannot work."""
        if cfg.unet_skips and self.dwa is not None:
            raise ConfigError("model.unet_skips and model_options.denseformer both rewire the residual stream; "
                              "choose one")
        self.skip_weights = nn.Parameter(torch.ones(cfg.n_layer // 2)) if cfg.unet_skips else None
        width = cfg.kv_heads * cfg.head_dim
        self.value_embeds = nn.ModuleList(nn.Embedding(cfg.vocab_size, width) for _ in range(cfg.value_embeds))
        self.value_layers = {i: t for i in range(cfg.n_layer) if (t := cfg.value_embed_table(i)) is not None}
        for i in self.value_layers:
            attn = self.blocks[i].attn
            if getattr(attn, "value_mix", None) is None:
                raise ConfigError(f"model.value_embeds needs an attention with a value projection (mha and its "
                                  f"variants); layer {i} has {type(attn).__name__}")
            if attn.n_kv_heads * attn.head_dim != width:
                raise ConfigError(f"model.value_embeds: layer {i} has values of width "
                                  f"{attn.n_kv_heads * attn.head_dim}, the tables {width}; per-layer head shapes "
                                  "(layer_overrides) must keep n_kv_heads * d_head")

    # ---- initialisation and accounting -------------------------------------------------
    def reset_parameters(self) -> None:
        """``init: gpt2``: N(0, init_std), residual projections (``attn.out``, ``mlp.down``) scaled by
        1/sqrt(2L), zero biases. ``init: torch``: PyTorch's default Linear init (Kaiming-uniform), as
        the grokking papers' models use. Token embeddings get ``embed_init_std`` (default init_std)."""
        init_linear_and_embeddings(self, self.cfg, self.cfg.n_layer,
                                   lambda name: name.endswith(("attn.out", "mlp.down")))
        if self.cfg.embed_init_std is not None:
            nn.init.normal_(self.tok_emb.weight, 0.0, self.cfg.embed_init_std)
        if self.cfg.tie_embeddings is False and self.cfg.init == "torch":
            self.lm_head.reset_parameters()
        self.position.init_after_model()

    def num_params(self, non_embedding: bool = False) -> int:
        """Unique parameters; ``non_embedding`` drops the token and position tables (Kaplan et al.)."""
        params = {id(p): p for p in self.parameters()}
        if non_embedding:
            params.pop(id(self.tok_emb.weight), None)
            for p in (*self.position.parameters(), *self.value_embeds.parameters()):
                params.pop(id(p), None)
        return sum(p.numel() for p in params.values())

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token, PaLM appendix B: 6N + 12 L H Dh T.

        N counts every matmul weight, including the (tied) LM head but not the position
        table (nor the value-embedding tables: lookups), as nanoGPT's MFU estimate does.
        """
        n = sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())
        n -= sum(p.numel() for p in (*self.position.parameters(), *self.value_embeds.parameters()))
        c = self.cfg
        heads = sum(c.for_layer(i).n_head * c.for_layer(i).head_dim for i in range(c.n_layer))  # per-layer shapes
        return 6 * n + 12 * heads * seq_len

    # ---- forward -----------------------------------------------------------------------
    def _check_input(self, idx: Tensor, offset: int) -> None:
        check_token_input(idx, offset, self.cfg, self.position.max_len,
                          check_values=wants_value_check(idx, self.training, offset))

    def embed(self, idx: Tensor, ctx: Context) -> Tensor:
        x = self.hook_embed(token_embeddings(self.tok_emb, idx, self.embed_scale, self.cfg.embed_noise, self.training))
        pos_emb = self.position.embed(ctx.pos)
        if pos_emb is not None:
            x = x + self.hook_pos_embed(pos_emb.to(x.dtype))
        return self.drop(x)

    def forward(self, idx: Tensor, cache: KVCache | None = None, return_cache: bool = False,
                last_only: bool = False, pos: Tensor | None = None, attention_mask: Tensor | None = None,
                document_ids: Tensor | None = None) -> Tensor | tuple[Tensor, KVCache]:
        """Logits ``(B, T, V)`` (``(B, 1, V)`` if ``last_only``); with a cache, continue from it.

        ``pos`` (T,) gives the absolute positions as a tensor (compiled decoding with a static cache):
        then no Python-side length is read or advanced; the caller tracks it.
        ``attention_mask`` ``(B, T)`` (or ``(B, cached + T)``) 1 for real tokens, 0 for padding (left or
        right): padding is never attended to and positions count from each row's first real token; a cache
        remembers it. ``document_ids`` ``(B, T)`` (packed batches, no cache): attention stays inside each
        document and positions restart at its start. Without either (and no padded cache) nothing changes.
        """
        if return_cache and cache is None:
            cache = KVCache(self.cfg.n_layer)
        graph_safe = pos is not None
        if not graph_safe:
            offset = cache.length if cache is not None else 0
            self._check_input(idx, offset)
            pos = torch.arange(offset, offset + idx.shape[1], device=idx.device)
        T = idx.shape[1]
        if cache is not None:
            cache.positions = pos
        ctx = Context(pos=pos, position=self.position, cache=cache, q_offset=None if graph_safe else offset)
        if attention_mask is not None or document_ids is not None or (cache is not None and "valid" in cache.masks):
            rows = row_masks(idx.shape[0], pos, cache, attention_mask, document_ids)
            ctx.slots, ctx.pos = pos, rows.pos
            ctx.key_valid, ctx.key_pos, ctx.key_doc = rows.key_valid, rows.key_pos, rows.key_doc
        x = self.embed(idx, ctx)
        if self.value_layers:
            tables = [emb(idx) for emb in self.value_embeds]
            ctx.value_embeds = {i: tables[t] for i, t in self.value_layers.items()}
        use_ckpt = self.cfg.grad_checkpointing and self.training and torch.is_grad_enabled()
        history = [x] if self.dwa is not None else None
        skips: list[Tensor] = []
        L, half = len(self.blocks), len(self.blocks) // 2
        for i, block in enumerate(self.blocks):
            if self.skip_weights is not None and i >= L - half:        # U-net: block L-1-j's input gets block j's out
                x = x + self.skip_weights[i - (L - half)].to(x.dtype) * skips.pop()
            x = checkpoint(block, x, ctx, use_reentrant=False) if use_ckpt else block(x, ctx)
            if self.skip_weights is not None and i < half:
                skips.append(x)
            if history is not None:
                history.append(x)
                x = self.dwa(i, history)
        self._collect_aux()
        if cache is not None and not graph_safe:
            cache.advance(T)
        x = self.hook_resid_final(self.ln_f(x))
        if last_only:
            x = x[:, -1:]
        logits = self.lm_head(x)
        if self.cfg.logit_softcap:
            cap = self.cfg.logit_softcap
            acc = torch.promote_types(logits.dtype, torch.float32)              # >= float32 inside the tanh
            logits = (cap * torch.tanh(logits.to(acc) / cap)).to(logits.dtype)
        return (logits, cache) if return_cache else logits

    def loss(self, idx: Tensor, targets: Tensor, attention_mask: Tensor | None = None,
             document_ids: Tensor | None = None) -> Tensor:
        """Mean next-token cross-entropy; targets of -100 and those at padding positions are ignored."""
        logits = self(idx, attention_mask=attention_mask, document_ids=document_ids)
        if attention_mask is not None:
            targets = targets.masked_fill(~attention_mask.bool(), -100)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)

    def new_cache(self, batch: int, static: bool = False, max_len: int | None = None) -> KVCache:
        """An empty cache; ``static`` preallocates ``max_len`` (default max_seq_len) slots."""
        if not static:
            return KVCache(self.cfg.n_layer)
        p = self.tok_emb.weight
        # Buffers are allocated per layer on first write, shaped by what each attention variant stores.
        return StaticKVCache(self.cfg.n_layer, batch, None, max_len or self.cfg.max_seq_len, None,
                             device=p.device, dtype=p.dtype)
