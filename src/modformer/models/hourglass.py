"""Hourglass transformer (registry model ``hourglass``): shorten the sequence into latents, run most
layers there, upsample back (seed 001; Nawrot et al. 2022, "Hierarchical Transformers Are More
Efficient Language Models"; Mirasol3B's Combiner and latent loss, Piergiovanni et al. 2024).

With ``levels`` H, resolution 0 is the tokens and resolution r + 1 the latents of resolution r::

    x_0 = embed(tokens) + pos_0
    for r in 0..H-1:   x_r = encoder_r(x_r);  skip_r = x_r;  x_{r+1} = shorten_r(x_r) + pos_{r+1}
    x_H = encoder_H(x_H);  x_H = latent_stack(x_H)            (global layers, optional DenseFormer)
    for r in H-1..0:   x_r = skip_r + upsample_r(x_{r+1}) [+ attention upsampling] + pos_r;  x_r = decoder_r(x_r)
    logits = lm_head(ln_f(x_0))

``layers/shorten.py`` has the compressors and upsamplers and the causal shift (right by g - 1 before
grouping, so the latents of group i hold positions ``<= i g`` and serve positions ``i g .. i g + g - 1``).
Causality, by induction over resolutions: every element of resolution r serves a first token
tau_r, non-decreasing along the sequence (tau_0(t) = t; the K latents of group i all get
tau_{r+1} = tau_r(i g)), and depends only on tokens ``<= tau``. Shortening keeps this (a group holds
elements ``<= i g``), so do causal global attention, local attention within one group's K latents (all
share one tau, so it is bidirectional there; at resolution 0 local attention is causal within blocks of
g tokens), repeat upsampling (position t reads group ``t // g``) and attention upsampling (groups
``<= t // g``). Tested by perturbing each token in turn for every option combination.

Encoder/decoder layers follow ``schedule``: ``alternate`` (local, global, local, ...), ``local_first``
(a run of ceil(n / 2) local then global), ``global`` or ``local``. The latent stack is all global.

``model_options`` (defaults in brackets):
- ``levels`` [1]; ``group_len`` g per level [4] (int or list); ``n_latents`` K per level [1], g % K == 0
- ``compression`` perceiver | last_k [perceiver]; ``upsampling`` repeat | attention [repeat]
- ``encoder_layers`` per resolution 0..H [1, 0, ...]; ``decoder_layers`` per resolution 0..H-1 [1, 0, ...]
  (an int means that many at every resolution); ``latent_layers`` [model.n_layer]
- ``schedule`` [alternate]; ``skip`` [true] (skip connections around each level)
- ``denseformer`` [false], ``dwa_dilation``, ``dwa_period``: depth-weighted averaging in the latent stack
- ``latent_loss`` weight [0]: MSE between a linear prediction from the latent stack's output for group i
  and the (detached, LayerNorm-ed) input latents of group i + 1; added to ``model.aux_loss``
- ``latent_block``: ModelConfig overrides for latent-stack blocks, e.g. ``{attention: multichannel,
  attn_only: true, attention_options: {n_channels: 2}}``
- ``local_backend`` [model.attn_backend]: attention backend of the layers that attend within one group (local
  token and latent layers, the compressor). ``eager`` computes a group's g x g scores directly, where SDPA's fused
  kernels give every group of g (4) elements a whole query/key tile of 64-128 rows; the same function either way.

Position embeddings: resolution r > 0 gets its own module of kind ``model.position`` (a learned table
sized for that resolution, sinusoidal, or RoPE/ALiBi applied inside attention at that resolution's
indices), shared by the encoder and decoder at that resolution and re-added after shortening and after
upsampling.

Generation (greedy decoding equals cache-free decoding, tested): with one level and only global
token-level layers, ``new_cache`` returns an ``HourglassCache``: the token-level encoder and decoder layers
keep K/V caches, the encoder outputs (skips) are kept, and the latent path (shorten + latent layers) is
recomputed only when a call completes a group (every g tokens; a latent of group i depends on tokens
``<= i g``, so it is final once token i g is in). Otherwise (several levels or local token layers) it
returns a ``TokenCache`` and every call recomputes the whole sequence (exact, no speed-up).
Hook points: ``hook_embed``, ``shorten.{r}.hook_latents`` (B, L_{r+1}, D), ``hook_latent_in`` /
``hook_latent_out`` (the latent stack's input and output), ``hook_upsampled_{r}`` (B, L_r, D) and every
block's hooks (``encoders.{r}.blocks.{i}.*``, ``latent_blocks.{i}.*``, ``decoders.{r}.blocks.{i}.*``).
``model.grad_checkpointing`` recomputes every block's activations in the backward pass.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from modformer import registry
from modformer.config import ModelConfig
from modformer.layers.block import Block
from modformer.layers.cache import KVCache
from modformer.layers.context import Context
from modformer.layers.dwa import DepthWeightedAverage
from modformer.layers.hooks import HookedMixin, HookPoint, name_hook_points
from modformer.layers.norm import build_norm
from modformer.layers.shorten import AttentionUpsample, Shorten, n_groups, upsample_add, upsample_repeat
from modformer.models.common import (
    AuxLossMixin,
    check_token_input,
    init_linear_and_embeddings,
    token_embeddings,
    wants_value_check,
)
from modformer.models.generation import GenerationMixin
from modformer.registry import ConfigError

OPTIONS = {"levels", "group_len", "n_latents", "compression", "upsampling", "encoder_layers", "decoder_layers",
           "latent_layers", "schedule", "skip", "denseformer", "dwa_dilation", "dwa_period", "latent_loss",
           "latent_block", "local_backend"}
COMPRESSIONS = ("perceiver", "last_k")
UPSAMPLINGS = ("repeat", "attention")
SCHEDULES = ("alternate", "local_first", "global", "local")
LATENT_BLOCK_FIELDS = {"attention", "attention_options", "attn_only", "ffn", "ffn_options", "n_head",
                       "n_kv_heads", "d_head", "d_ff", "qk_norm", "attn_backend"}


def _per_level(opts: dict, key: str, default: object, n: int) -> list[int]:
    value = opts.get(key, default)
    values = [value] * n if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(values, list) or len(values) != n or not all(isinstance(v, int) and v >= 0 for v in values):
        raise ConfigError(f"model.model_options.{key} must be a non-negative integer or a list of {n} of them, "
                          f"got {value!r}")
    return list(values)


@dataclasses.dataclass
class HourglassOptions:
    levels: int
    group_len: list[int]
    n_latents: list[int]
    compression: str
    upsampling: str
    encoder_layers: list[int]
    decoder_layers: list[int]
    latent_layers: int
    schedule: str
    skip: bool
    denseformer: bool
    dwa_dilation: int
    dwa_period: int
    latent_loss: float
    latent_block: dict
    local_backend: str

    @classmethod
    def parse(cls, cfg: ModelConfig) -> HourglassOptions:
        """Validate ``cfg.model_options`` for the hourglass; every error names the option."""
        opts = cfg.model_options
        unknown = set(opts) - OPTIONS
        if unknown:
            raise ConfigError(f"model.model_options: unknown {sorted(unknown)} for model 'hourglass'; "
                              f"allowed: {', '.join(sorted(OPTIONS))}")
        if getattr(cfg, "layer_overrides", None):
            raise ConfigError("model.layer_overrides is not supported by model 'hourglass'")
        if not cfg.causal:
            raise ConfigError("model 'hourglass' is a causal language model; model.causal must be true")
        H = opts.get("levels", 1)
        if not isinstance(H, int) or isinstance(H, bool) or H < 1:
            raise ConfigError(f"model.model_options.levels must be an integer >= 1, got {H!r}")
        g = _per_level(opts, "group_len", 4, H)
        k = _per_level(opts, "n_latents", 1, H)
        for r in range(H):
            if g[r] < 1 or k[r] < 1 or k[r] > g[r] or g[r] % k[r]:
                raise ConfigError(f"model.model_options: level {r} needs group_len >= 1 and n_latents dividing "
                                  f"it (1 <= K <= g, g % K == 0); got group_len={g[r]}, n_latents={k[r]}")
        for key, allowed in (("compression", COMPRESSIONS), ("upsampling", UPSAMPLINGS), ("schedule", SCHEDULES)):
            val = opts.get(key, allowed[0])
            if val not in allowed:
                raise ConfigError(f"model.model_options.{key}: unknown {val!r}; allowed: {', '.join(allowed)}")
        enc = _per_level(opts, "encoder_layers", [1] + [0] * H, H + 1)
        dec = _per_level(opts, "decoder_layers", [1] + [0] * (H - 1), H)
        latent_layers = opts.get("latent_layers", cfg.n_layer)
        if not isinstance(latent_layers, int) or isinstance(latent_layers, bool) or latent_layers < 0:
            raise ConfigError(f"model.model_options.latent_layers must be an integer >= 0, got {latent_layers!r}")
        if sum(enc) + sum(dec) + latent_layers == 0:
            raise ConfigError("model 'hourglass' needs at least one layer (encoder, latent or decoder)")
        weight = opts.get("latent_loss", 0.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise ConfigError(f"model.model_options.latent_loss must be a weight >= 0, got {weight!r}")
        if weight and latent_layers == 0:
            raise ConfigError("model.model_options.latent_loss needs latent_layers >= 1")
        block = opts.get("latent_block", {}) or {}
        if not isinstance(block, dict) or set(block) - LATENT_BLOCK_FIELDS:
            bad = sorted(set(block) - LATENT_BLOCK_FIELDS) if isinstance(block, dict) else block
            raise ConfigError(f"model.model_options.latent_block: {bad!r} not allowed; it maps model fields "
                              f"({', '.join(sorted(LATENT_BLOCK_FIELDS))}) to values for the latent stack")
        local_backend = opts.get("local_backend", cfg.attn_backend)
        registry.get("attn_backend", local_backend, field="model.model_options.local_backend")
        for key in ("skip", "denseformer"):
            if not isinstance(opts.get(key, key == "skip"), bool):
                raise ConfigError(f"model.model_options.{key} must be true or false, got {opts[key]!r}")
        return cls(H, g, k, opts.get("compression", "perceiver"), opts.get("upsampling", "repeat"), enc, dec,
                   latent_layers, opts.get("schedule", "alternate"), opts.get("skip", True),
                   opts.get("denseformer", False), int(opts.get("dwa_dilation", 1)), int(opts.get("dwa_period", 1)),
                   float(weight), dict(block), local_backend)


def run_block(block: nn.Module, x: Tensor, ctx: Context, ckpt: bool) -> Tensor:
    return checkpoint(block, x, ctx, use_reentrant=False) if ckpt else block(x, ctx)


def layer_kinds(n: int, schedule: str) -> list[str]:
    """``local`` / ``global`` for each of n encoder or decoder layers."""
    if schedule == "alternate":
        return ["local" if i % 2 == 0 else "global" for i in range(n)]
    if schedule == "local_first":
        return ["local" if i < math.ceil(n / 2) else "global" for i in range(n)]
    return [schedule] * n


class Stage(nn.Module):
    """Encoder or decoder layers at one resolution. Local layers fold windows of ``window`` elements
    into the batch (causal at resolution 0, bidirectional within a group's latents above it) and attend
    with ``local_backend``."""

    def __init__(self, cfg: ModelConfig, n: int, schedule: str, window: int, resolution: int, first: int,
                 local_backend: str) -> None:
        super().__init__()
        self.kinds = layer_kinds(n, schedule)
        self.window = window
        local_cfg = dataclasses.replace(cfg, causal=resolution == 0, attn_backend=local_backend)
        self.blocks = nn.ModuleList(Block(local_cfg if kind == "local" else cfg, first + i)
                                    for i, kind in enumerate(self.kinds))

    def forward(self, x: Tensor, position: nn.Module, ckpt: bool = False, cache: KVCache | None = None,
                offset: int = 0, pos: Tensor | None = None) -> Tensor:
        """``cache`` / ``offset`` (global layers only): continue a sequence whose first ``offset`` elements
        are in the cache's K/V (layer slots = the blocks' layer indices). ``pos``: the positions
        ``offset .. offset + L - 1`` if the caller has them (else built once here, shared by the layers)."""
        B, L, D = x.shape
        ctx_global = ctx_local = None
        for kind, block in zip(self.kinds, self.blocks):
            if kind == "global":
                if ctx_global is None:
                    if pos is None:
                        pos = torch.arange(offset, offset + L, device=x.device)
                    ctx_global = Context(pos=pos, position=position, cache=cache, q_offset=offset)
                x = run_block(block, x, ctx_global, ckpt)
            else:
                w = self.window
                n = n_groups(L, w)
                if ctx_local is None:
                    ctx_local = Context(pos=torch.arange(w, device=x.device), position=position)
                xp = (F.pad(x, (0, 0, 0, n * w - L)) if n * w != L else x).reshape(B * n, w, D)
                y = run_block(block, xp, ctx_local, ckpt)
                x = y.reshape(B, n * w, D)[:, :L]
        return x


class TokenCache:
    """Recompute fallback for generation: holds the tokens so far; each call reruns the whole sequence."""

    def __init__(self) -> None:
        self.tokens: Tensor | None = None
        self.length = 0


class HourglassCache:
    """Incremental decoding state (one level, global token layers): token-level K/V, skips, latent outputs."""

    def __init__(self, n_layer: int) -> None:
        self.kv = KVCache(n_layer)
        self.skip: Tensor | None = None       # (B, t, D) token-level encoder outputs so far
        self.latents: Tensor | None = None    # (B, n K, D) latent-stack outputs for the complete groups
        self.length = 0


@registry.register("model", "hourglass")
class Hourglass(HookedMixin, GenerationMixin, AuxLossMixin, nn.Module):
    """``model(idx) -> logits (B, T, V)``; see the module docstring for the options."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.opts = o = HourglassOptions.parse(cfg)
        if cfg.position == "shortformer":
            raise ConfigError("model.position='shortformer' is not supported by model 'hourglass' "
                              "(its shortening layers read positions from the residual stream)")
        D = cfg.d_model
        self.tok_emb = nn.Embedding(cfg.vocab_size, D)
        self.embed_scale = D ** 0.5 if cfg.scale_embeddings else 1.0
        self.position = registry.get("position", cfg.position, field="model.position")(cfg)
        self.max_lens = [cfg.max_seq_len]
        for r in range(o.levels):
            self.max_lens.append(n_groups(self.max_lens[-1], o.group_len[r]) * o.n_latents[r])
        self.positions = nn.ModuleList(registry.get("position", cfg.position)(
            dataclasses.replace(cfg, max_seq_len=self.max_lens[r])) for r in range(1, o.levels + 1))
        self.drop = nn.Dropout(cfg.dropout)
        count = [0]      # distinct layer indices for every block (the hourglass passes no KV cache)

        def first(n: int) -> int:
            count[0] += n
            return count[0] - n

        windows = [o.group_len[0]] + o.n_latents      # local attention: g tokens at resolution 0, K latents above
        self.encoders = nn.ModuleList(Stage(cfg, o.encoder_layers[r], o.schedule, windows[r], r,
                                            first(o.encoder_layers[r]), o.local_backend) for r in range(o.levels + 1))
        group_cfg = dataclasses.replace(cfg, attn_backend=o.local_backend)    # the compressor attends within a group
        self.shorten = nn.ModuleList(Shorten(group_cfg, o.group_len[r], o.n_latents[r], o.compression, first(1))
                                     for r in range(o.levels))
        latent_cfg = dataclasses.replace(cfg, **o.latent_block) if o.latent_block else cfg
        if o.latent_block:
            latent_cfg.validate(vocab_from_data=True)
        self.latent_blocks = nn.ModuleList(Block(latent_cfg, first(1)) for _ in range(o.latent_layers))
        # RoPE / ALiBi depend on the head shape: latent blocks with other heads get their own (parameter-free) module
        self.latent_position = None
        if cfg.position in ("rope", "alibi") and (latent_cfg.head_dim, latent_cfg.n_head) != (cfg.head_dim, cfg.n_head):
            self.latent_position = registry.get("position", cfg.position)(latent_cfg)
        self.dwa = DepthWeightedAverage(o.latent_layers, o.dwa_dilation, o.dwa_period) if o.denseformer else None
        self.upsample_attn = nn.ModuleList(AttentionUpsample(cfg) for _ in range(o.levels)) \
            if o.upsampling == "attention" else None
        self.decoders = nn.ModuleList(Stage(cfg, o.decoder_layers[r], o.schedule, windows[r], r,
                                            first(o.decoder_layers[r]), o.local_backend) for r in range(o.levels))
        if o.latent_loss:
            self.latent_norm = build_norm(cfg)
            self.latent_head = nn.Linear(D, D, bias=cfg.bias)
        self.ln_f = build_norm(cfg) if cfg.final_norm else nn.Identity()
        self.lm_head = nn.Linear(D, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.hook_embed = HookPoint()        # (B, T, D)
        self.hook_latent_in = HookPoint()    # (B, L_H, D) input of the latent stack
        self.hook_latent_out = HookPoint()   # (B, L_H, D) output of the latent stack
        for r in range(o.levels):
            setattr(self, f"hook_upsampled_{r}", HookPoint())   # (B, L_r, D) after upsampling + skip + pos
        self.hook_resid_final = HookPoint()
        self.n_blocks = sum(len(s.blocks) for s in (*self.encoders, *self.decoders)) + o.latent_layers + \
            (o.levels if o.compression == "last_k" else 0)
        self.n_layer_slots = count[0]
        self.incremental = o.levels == 1 and "local" not in self.encoders[0].kinds + self.decoders[0].kinds
        self.reset_parameters()
        name_hook_points(self)
        self.init_aux()

    # ---- initialisation and accounting -------------------------------------------------
    def reset_parameters(self) -> None:
        """GPT-2 init (as ``gpt``): N(0, init_std), residual projections scaled by 1/sqrt(2 n_blocks);
        perceiver queries and within-group positions N(0, init_std); the shift pad starts at 0."""
        std = self.cfg.init_std
        init_linear_and_embeddings(self, self.cfg, max(self.n_blocks, 1), lambda name: name.endswith(
            ("attn.out", "mlp.down", "compress.out")) or (name.startswith("upsample_attn.") and name.endswith(".out")))
        for name, p in self.named_parameters():
            if name.endswith(("compress.queries", "compress.group_pos")):
                nn.init.normal_(p, 0.0, std)
        if self.cfg.embed_init_std is not None:
            nn.init.normal_(self.tok_emb.weight, 0.0, self.cfg.embed_init_std)

    def _position_params(self) -> set[int]:
        return {id(p) for m in (self.position, *self.positions) for p in m.parameters()}

    def num_params(self, non_embedding: bool = False) -> int:
        """Unique parameters; ``non_embedding`` drops the token table and every position table."""
        params = {id(p): p for p in self.parameters()}
        if non_embedding:
            params.pop(id(self.tok_emb.weight), None)
            for i in self._position_params():
                params.pop(i, None)
        return sum(p.numel() for p in params.values())

    def lengths(self, seq_len: int) -> list[int]:
        """Sequence length at each resolution 0..H for a token sequence of ``seq_len``."""
        out = [seq_len]
        for g, k in zip(self.opts.group_len, self.opts.n_latents):
            out.append(n_groups(out[-1], g) * k)
        return out

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (PaLM appendix B, as ``gpt``): 6 x (matmul parameters x the fraction
        of positions they run on: L_r / T at resolution r) + 12 x (heads x head dim x keys visible) per
        query for every attention call (no causal halving, like ``gpt``). Position tables excluded."""
        o, T = self.opts, seq_len
        L = self.lengths(T)
        m = [x / T for x in L]
        seen = self._position_params()
        total = 0.0

        def params(mod: nn.Module | list, mult: float) -> None:
            nonlocal total
            for p in (mod.parameters() if isinstance(mod, nn.Module) else [q for x in mod for q in x.parameters()]):
                if id(p) not in seen:
                    seen.add(id(p))
                    total += 6 * p.numel() * mult

        def attn(mult: float, width: int, keys: int) -> None:
            nonlocal total
            total += 12 * width * keys * mult

        def width(block: nn.Module) -> int:
            from modformer.layers.attention.mha import MultiHeadAttention
            heads = [a.n_head * a.head_dim for a in block.modules() if isinstance(a, MultiHeadAttention)]
            return sum(heads) or self.cfg.n_head * self.cfg.head_dim

        for r, stage in enumerate([*self.encoders, *self.decoders]):
            r = r if r <= o.levels else r - o.levels - 1
            params(stage, m[r])
            for kind, block in zip(stage.kinds, stage.blocks):
                attn(m[r], width(block), L[r] if kind == "global" else stage.window)
        for r, sh in enumerate(self.shorten):
            g = o.group_len[r]
            params(sh.compress.kv_side(), m[r])
            params(sh, m[r + 1])
            hd = self.cfg.n_head * self.cfg.head_dim
            attn(m[r + 1], hd, g) if o.compression == "perceiver" else attn(m[r], width(sh.compress.block), g)
            if self.upsample_attn is not None:
                up = self.upsample_attn[r]
                params([up.ln_kv, up.kv], m[r + 1])
                params(up, m[r])
                attn(m[r], hd, L[r + 1])
        for block in self.latent_blocks:
            params(block, m[-1])
            attn(m[-1], width(block), L[-1])
        if o.latent_loss:
            params([self.latent_norm, self.latent_head], m[-1])
        params(self, 1.0)          # embeddings / LM head, final norm, DWA weights
        return total

    # ---- forward -----------------------------------------------------------------------
    def _check_input(self, idx: Tensor, offset: int = 0) -> None:
        check_token_input(idx, offset, self.cfg, self.position.max_len,
                          check_values=wants_value_check(idx, self.training, offset))

    @classmethod
    def _add_pos(cls, x: Tensor, position: nn.Module, offset: int = 0) -> Tensor:
        return cls._plus(x, position.embed(torch.arange(offset, offset + x.shape[1], device=x.device)))

    @staticmethod
    def _plus(x: Tensor, emb: Tensor | None) -> Tensor:
        return x if emb is None else x + emb.to(x.dtype)

    def forward(self, idx: Tensor, cache: TokenCache | HourglassCache | None = None, return_cache: bool = False,
                last_only: bool = False, pos: Tensor | None = None, attention_mask: Tensor | None = None,
                document_ids: Tensor | None = None) -> Tensor | tuple[Tensor, object]:
        """Logits ``(B, T, V)``; with a cache (``new_cache``) the call continues the cached sequence.

        ``attention_mask`` (no cache): left or right padding. Right padding is invisible to causal layers; a
        left-padded row is rotated so its real tokens start at position 0 (the groups and positions it would
        have alone, as HF counts positions from the first real token), run, and rotated back."""
        if pos is not None:
            raise ValueError("model 'hourglass' does not take tensor positions (no compiled decoding)")
        lead = None
        if attention_mask is not None:
            if cache is not None:
                check_right_padded(attention_mask, cached=True)
            else:
                lead = leading_padding(attention_mask)
                if lead is not None:
                    idx, attention_mask = rotate_rows(idx, lead), rotate_rows(attention_mask, lead)
                check_right_padded(attention_mask)
        if document_ids is not None:
            raise ValueError("model 'hourglass' does not take document_ids (data.pack): its token groups would "
                             "straddle documents; use data.pack: false or model 'gpt'")
        if return_cache and cache is None:
            cache = self.new_cache(idx.shape[0])
        T = idx.shape[1]
        if isinstance(cache, HourglassCache):
            x = self._forward_incremental(idx, cache)
            logits = self.lm_head(x[:, -1:] if last_only else x)
            return (logits, cache) if return_cache else logits
        full = idx if cache is None or cache.tokens is None else torch.cat([cache.tokens, idx], dim=1)
        self._check_input(full)
        x = self._forward(full)
        if lead is not None:
            x = rotate_rows(x, -lead)
        if cache is not None:
            cache.tokens, cache.length = full, full.shape[1]
        x = x[:, -1:] if last_only else (x if x.shape[1] == T else x[:, -T:])
        logits = self.lm_head(x)
        return (logits, cache) if return_cache else logits

    def _forward(self, idx: Tensor) -> Tensor:
        """Final hidden states ``(B, T, D)``.

        Per call, each resolution's positions (``arange``) and absolute position embedding are built once
        and shared by its encoder, decoder and both additions of the embedding (after shortening / embedding
        and after upsampling); repeat upsampling and the skip add are one broadcast add (``upsample_add``).
        """
        o = self.opts
        positions = [self.position, *self.positions]
        ckpt = self.cfg.grad_checkpointing and self.training and torch.is_grad_enabled()
        pos = [torch.arange(n, device=idx.device) for n in self.lengths(idx.shape[1])]
        emb = [p.embed_arange(q) for p, q in zip(positions, pos)]
        tok = token_embeddings(self.tok_emb, idx, self.embed_scale, self.cfg.embed_noise, self.training)
        x = self._plus(self.hook_embed(tok), emb[0])
        x = self.drop(x)
        skips = []
        for r in range(o.levels):
            x = self.encoders[r](x, positions[r], ckpt, pos=pos[r])
            skips.append(x)
            x = self._plus(self.shorten[r](x, positions[r]), emb[r + 1])
        x = self.encoders[o.levels](x, positions[-1], ckpt, pos=pos[-1])
        latent_in, x = self._latent_stack(x, ckpt, pos[-1])
        latent_loss = self._latent_loss(latent_in, x) if o.latent_loss and self.training else None
        for r in reversed(range(o.levels)):
            g, k = o.group_len[r], o.n_latents[r]
            lat = x
            x = upsample_add(lat, skips[r], g, k) if o.skip else upsample_repeat(lat, g, k, skips[r].shape[1])
            if self.upsample_attn is not None:
                x = x + self.upsample_attn[r](x, lat, g, k)
            x = getattr(self, f"hook_upsampled_{r}")(self._plus(x, emb[r]))
            x = self.decoders[r](x, positions[r], ckpt, pos=pos[r])
        self._collect_aux(latent_loss, "latent_loss")
        return self.hook_resid_final(self.ln_f(x))

    def _latent_stack(self, x: Tensor, ckpt: bool = False, pos: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The latent layers (+ DenseFormer) on the shortest sequence: returns (input, output)."""
        x = self.hook_latent_in(x)
        latent_in, history = x, [x] if self.dwa is not None else None
        ctx = Context(pos=torch.arange(x.shape[1], device=x.device) if pos is None else pos,
                      position=self.latent_position or ([self.position, *self.positions][-1]))
        for i, block in enumerate(self.latent_blocks):
            x = run_block(block, x, ctx, ckpt)
            if history is not None:
                history.append(x)
                x = self.dwa(i, history)
        return latent_in, self.hook_latent_out(x)

    def _forward_incremental(self, idx: Tensor, cache: HourglassCache) -> Tensor:
        """One level, global token layers: hidden states ``(B, T, D)`` of the new tokens ``idx``."""
        o, off, T = self.opts, cache.length, idx.shape[1]
        g, k = o.group_len[0], o.n_latents[0]
        self._check_input(idx, off)
        x = self.drop(self._add_pos(self.hook_embed(self.tok_emb(idx) * self.embed_scale), self.position, off))
        x = self.encoders[0](x, self.position, cache=cache.kv, offset=off)
        cache.skip = x if cache.skip is None else torch.cat([cache.skip, x], dim=1)
        done = 0 if cache.latents is None else cache.latents.shape[1] // k
        if n_groups(off + T, g) > done:              # a group completed: recompute the latent path
            lat = self._add_pos(self.shorten[0](cache.skip, self.position), self.positions[0])
            cache.latents = self._latent_stack(self.encoders[1](lat, self.positions[0]))[1]
        lat = cache.latents
        t = torch.arange(off, off + T, device=idx.device)
        up = lat[:, t // (g // k)]                                           # repeat upsampling of rows t
        if o.skip:
            up = up + x
        if self.upsample_attn is not None:
            up = up + self.upsample_attn[0](up, lat, g, k, q_start=off)
        x = self.hook_upsampled_0(self._add_pos(up, self.position, off))
        x = self.decoders[0](x, self.position, cache=cache.kv, offset=off)
        cache.kv.advance(T)
        cache.length = off + T
        self._collect_aux()
        return self.hook_resid_final(self.ln_f(x))

    def _latent_loss(self, latent_in: Tensor, latent_out: Tensor) -> Tensor | None:
        """Predict group i + 1's input latents from group i's outputs (MSE to the LayerNorm-ed, detached target)."""
        k = self.opts.n_latents[-1]
        if latent_in.shape[1] <= k:
            return None
        target = F.layer_norm(latent_in[:, k:].detach().float(), (latent_in.shape[-1],))
        pred = self.latent_head(self.latent_norm(latent_out[:, :-k])).float()
        return self.opts.latent_loss * F.mse_loss(pred, target)


    def loss(self, idx: Tensor, targets: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Mean next-token cross-entropy (targets of -100 and at padding ignored); ``aux_loss`` is not included."""
        logits = self(idx, attention_mask=attention_mask)
        if attention_mask is not None:
            targets = targets.masked_fill(~attention_mask.bool(), -100)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)

    def new_cache(self, batch: int = 1, static: bool = False,
                  max_len: int | None = None) -> HourglassCache | TokenCache:
        """An ``HourglassCache`` where incremental decoding applies, else a recompute-fallback ``TokenCache``
        (``static`` and ``max_len`` are accepted and ignored)."""
        return HourglassCache(self.n_layer_slots) if self.incremental else TokenCache()

    def generate(self, idx: Tensor, max_new_tokens: int, *args: object, compile: bool = False,
                 **kwargs: object) -> Tensor:
        """As ``gpt``'s generate (greedy with and without cache agree); no compiled decoding."""
        if compile:
            raise ValueError("model 'hourglass' has no compiled decode step (its cache is not a static one)")
        mask = kwargs.get("attention_mask")
        if mask is not None and not bool(torch.as_tensor(mask).bool().all()):
            kwargs["use_cache"] = False      # a padded batch re-runs each (rotated) row: exact, slower
        return super().generate(idx, max_new_tokens, *args, **kwargs)


def leading_padding(attention_mask: Tensor) -> Tensor | None:
    """Leading zeros of each row of the 0/1 mask ``(B, T)``; None when no row starts with padding."""
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be (batch, length), got shape {tuple(attention_mask.shape)}")
    lead = (~attention_mask.bool()).long().cumprod(1).sum(1)
    return lead if bool(lead.any()) else None


def rotate_rows(x: Tensor, shift: Tensor) -> Tensor:
    """``out[b, j] = x[b, (j + shift[b]) % T]`` along dim 1 (``-shift`` undoes it); trailing dims follow."""
    T = x.shape[1]
    src = (torch.arange(T, device=x.device)[None] + shift.to(x.device)[:, None]) % T          # (B, T)
    return x.gather(1, src.view(*src.shape, *([1] * (x.dim() - 2))).expand_as(x))


def check_right_padded(attention_mask: Tensor, cached: bool = False) -> None:
    """ValueError unless every row of the 0/1 mask is real tokens then padding (what ``forward`` runs after
    moving left padding to the right): the hourglass groups tokens by position, so a row's real tokens must be
    contiguous. A cached call (decoding continues after the context) takes no padding at all: ``generate`` on a
    padded batch decodes without the cache instead."""
    m = attention_mask.bool()
    if cached and not bool(m.all()):
        raise ValueError("model 'hourglass' continues a cache only for unpadded batches; call it without a cache "
                         "(generate does so for padded batches)")
    if m.dim() != 2 or bool((m[:, 1:] & ~m[:, :-1]).any()):
        raise ValueError("model 'hourglass': each attention_mask row must hold its real tokens contiguously "
                         "(left or right padding), got a row with a hole")
