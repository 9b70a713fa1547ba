"""How the circuits package reads each model kind: a GPT-shaped view of the attention layers that attend over tokens.

Every analysis here (``heads.py``, ``weights.py``, ``report.py``) reads a decoder as ``blocks[i].attn`` on one
residual stream of tokens, with hooks named ``blocks.{i}.*``, plus ``tok_emb`` / ``position`` / ``ln_f`` /
``lm_head``. ``circuit_view(model)`` gives that reading for each model kind the toolbox builds:

- ``gpt`` (any model with ``.blocks``): the model itself.
- ``hourglass``: a ``TokenLayersView`` of its token-level layers (below).
- anything else: a one-line ``ValueError`` naming the model kind.

Hourglass (``models/hourglass.py``): the token-level layers are ``encoders.0.blocks.*`` (before the first
shortening) then ``decoders.0.blocks.*`` (after the last upsampling), in the order the forward pass runs them;
layer ``i`` of the view is the ``i``-th of these (``layer_names[i]`` is its module path). Global layers give
``(B, H, T, T)`` patterns as they are. Local layers run on windows of ``g`` tokens folded into the batch
(``(B * n, H, g, g)`` at the hook); the view puts them back as the block-diagonal ``(B, H, T, T)`` pattern (zero
outside a token's window) and unfolds every other activation to ``(B, T, ...)``, so the detectors see token
positions. A local layer cannot attend across a window edge, so its previous-token score is at most about
``(g - 1) / g`` and induction / duplicate-token scores on a repeat longer than ``g`` are 0 by construction.

Skipped, with a note in the report:

- the latent layers (``latent_blocks.*`` and ``encoders.r`` / ``decoders.r`` for ``r >= 1``). Their queries and
  keys are latents, each a summary of a group of ``g`` tokens (``K`` per group, causally shifted so group ``i``
  holds tokens ``<= i g``). The detectors are defined by token offsets (the previous token at ``t - 1``; the
  induction target at ``t - L + 1`` on a repeat of ``L`` tokens); in latent units these offsets exist only when
  ``L`` is a multiple of ``g``, and even then a "previous-latent" head moves a summary of ``g`` tokens, not a
  token. Scoring them in latent units would put numbers with another meaning into the same table, so they are
  left out rather than rescaled.
- the shortening's compressor (perceiver cross-attention within a group) and attention upsampling: not
  self-attention over tokens.

Weight-based circuits (OV / QK eigenvalues, copying, positional QK, skip-trigrams, composition) on the token-level
layers, only with ``skip: true``: then the residual stream at resolution 0 runs embedding -> encoder layers ->
(skip) -> decoder layers -> ``ln_f`` -> ``lm_head`` with the upsampled latents added as one more writer. Every
token-level layer reads ``W_E`` directly and writes into what ``W_U`` reads, so the ``W_E -> W_U`` circuits hold
for them to the same extent as in a GPT (the upsampled latents are ignored as the circuits ignore MLP outputs),
and composition between two token-level heads through that stream is a product of their weights. Composition
through shortening -> latent stack -> upsampling is not a product of weight matrices (grouping, compression,
latent attention) and is not scored. Decoder layers read the position embedding twice (at the embedding and
re-added after upsampling); the positional QK score uses it once. With ``skip: false`` the decoder layers read
only upsampled latents and the encoder layers reach the logits only through the latent path: no ``W_E -> W_U``
reading holds, so the weight-based circuits are skipped and the encoder layers get no ``copying_rank``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from modformer.layers.hooks import names_predicate

# hooks outside any block that the view passes through under their own names
PASSTHROUGH = ("hook_embed", "hook_upsampled_0", "hook_resid_final")
_HEAD_TIME = ("attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z")      # (B, H, T, Dh): time is dim 2


def model_kind(model: Any) -> str:
    """The registry name of ``model`` (``cfg.model``) or, without one, its class name."""
    return getattr(getattr(model, "cfg", None), "model", None) or type(model).__name__


def circuit_view(model: Any) -> Any:
    """``model`` as the circuits package reads it (see the module docstring); idempotent."""
    if isinstance(model, TokenLayersView) or getattr(model, "blocks", None) is not None:
        return model
    kind = model_kind(model)
    if kind == "hourglass" and hasattr(model, "encoders") and hasattr(model, "decoders"):
        return TokenLayersView(model)
    raise ValueError(f"circuits cannot read model kind {kind!r} ({type(model).__name__}): the analyses read "
                     "decoders with .blocks ('gpt') and the token-level layers of 'hourglass'")


@dataclass
class TokenLayer:
    """One attention layer over tokens: its module path, stage and attention span."""

    module: str                 # e.g. "decoders.0.blocks.1"
    stage: str                  # "encoder" (before shortening) | "decoder" (after upsampling)
    attention: str              # "global" | "local"
    window: int | None          # tokens per window for local layers
    block: nn.Module

    def describe(self) -> dict:
        span = f"local (windows of {self.window} tokens)" if self.attention == "local" else "global (causal)"
        return {"module": self.module, "stage": self.stage, "attention": span}


class _ConfigView:
    """The model's config with a few fields replaced (read-only)."""

    def __init__(self, cfg: Any, **over: Any) -> None:
        self._cfg, self._over = cfg, over

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return self._over[name] if name in self._over else getattr(self._cfg, name)


def unfold_windows(x: Tensor, suffix: str, batch: int, length: int) -> Tensor:
    """A local layer's activation over windows folded into the batch -> the same over the token sequence.

    ``*.hook_pattern`` ``(B n, H, w, w)`` -> block-diagonal ``(B, H, T, T)``; ``attn.hook_q/k/v/z``
    ``(B n, H, w, Dh)`` -> ``(B, H, T, Dh)``; anything else ``(B n, w, ...)`` -> ``(B, T, ...)``; padding past
    ``T = length`` dropped."""
    n = x.shape[0] // batch
    if suffix.endswith("hook_pattern"):
        w = x.shape[-1]
        out = x.new_zeros(batch, x.shape[1], n * w, n * w)
        x = x.view(batch, n, *x.shape[1:])
        for k in range(n):
            out[:, :, k * w:(k + 1) * w, k * w:(k + 1) * w] = x[:, k]
        return out[..., :length, :length]
    if suffix in _HEAD_TIME:
        H, w = x.shape[1], x.shape[2]
        return x.view(batch, n, H, w, *x.shape[3:]).transpose(1, 2).reshape(batch, H, n * w, *x.shape[3:])[
            :, :, :length]
    return x.reshape(batch, n * x.shape[1], *x.shape[2:])[:, :length]


class TokenLayersView:
    """The hourglass's token-level attention layers as a GPT-shaped decoder (see the module docstring).

    ``blocks[i]`` is the block at ``layer_names[i]``; ``run_with_cache`` names their hooks ``blocks.{i}.*``
    (local layers unfolded to token positions) and passes ``hook_embed`` / ``hook_upsampled_0`` /
    ``hook_resid_final`` through. ``notes`` says what is read and what is skipped; ``skipped`` lists the
    skipped modules with the reason; ``weights_refused`` is why weight-based circuits do not apply (or None)."""

    def __init__(self, model: nn.Module) -> None:
        o = model.opts
        layers: list[TokenLayer] = []
        for stage, st in (("encoder", model.encoders[0]), ("decoder", model.decoders[0])):
            for j, (kind, block) in enumerate(zip(st.kinds, st.blocks)):
                layers.append(TokenLayer(f"{stage}s.0.blocks.{j}", stage, kind,
                                         st.window if kind == "local" else None, block))
        latent = [f"encoders.{r}.blocks.{j}" for r in range(1, o.levels + 1)
                  for j in range(len(model.encoders[r].blocks))]
        latent += [f"latent_blocks.{i}" for i in range(len(model.latent_blocks))]
        latent += [f"decoders.{r}.blocks.{j}" for r in range(o.levels - 1, 0, -1)
                   for j in range(len(model.decoders[r].blocks))]
        if not layers:
            raise ValueError("circuits cannot read this model of kind 'hourglass': it has no attention layers "
                             "over tokens (model_options encoder_layers[0] = decoder_layers[0] = 0), and its latent "
                             "layers attend over groups of tokens, which the head detectors do not score")
        self.model = model
        self.layers = layers
        self.blocks = [t.block for t in layers]
        self.layer_names = [t.module for t in layers]
        L = len(layers)
        self.cfg = _ConfigView(model.cfg, n_layer=L, model_options={})
        self.tok_emb, self.embed_scale, self.position = model.tok_emb, model.embed_scale, model.position
        self.ln_f, self.lm_head = model.ln_f, model.lm_head
        has_decoder = any(t.stage == "decoder" for t in layers)
        # the input of ln_f: the last decoder block's output, or the upsampled stream when there is no decoder block
        self.final_resid_hook = f"blocks.{L - 1}.hook_resid_post" if has_decoder else "hook_upsampled_0"
        self.direct_to_logits = [o.skip or t.stage == "decoder" for t in layers]
        g = o.group_len[0]
        lat_reason = (f"latent attention: queries and keys are latents of groups of {g} tokens, so the "
                      "token-offset detectors (previous token, induction) do not apply")
        self.skipped = [{"module": m, "reason": lat_reason} for m in latent]
        self.skipped += [{"module": f"shorten.{r}", "reason": "compression within each group (not self-attention "
                          "over tokens)"} for r in range(o.levels)]
        if model.upsample_attn is not None:
            self.skipped += [{"module": f"upsample_attn.{r}", "reason": "tokens attending to latents (not "
                              "self-attention over tokens)"} for r in range(o.levels)]
        names = ", ".join(f"L{i} = {n}" for i, n in enumerate(self.layer_names))
        self.notes = [f"model kind 'hourglass': head scores cover the {L} attention layers over tokens ({names}): "
                      "encoder layers before the first shortening, decoder layers after the last upsampling"]
        if latent:
            self.notes.append(f"skipped {len(latent)} latent layers ({', '.join(latent)}): they attend over "
                              f"latents of {g}-token groups, where previous-token / induction offsets "
                              "(counted in tokens) have no meaning")
        self.notes.append("skipped the shortening" + (" and attention upsampling" if model.upsample_attn is not None
                                                      else "") + ": not self-attention over tokens")
        if any(t.attention == "local" for t in layers):
            self.notes.append(f"local token layers attend within windows of {g} tokens (block-diagonal patterns): "
                              f"previous-token scores are at most about {(g - 1) / g:.2f}, induction / duplicate "
                              f"scores on repeats longer than {g} tokens are 0 by construction")
        if o.skip:
            self.weights_refused = None
            self.notes.append("weight-based circuits (OV/QK, copying, skip-trigrams, composition) on the token-level "
                              "layers only: through the skip they read W_E and write to W_U directly, as in a GPT "
                              "(the upsampled latents are one more writer, ignored like MLP outputs); composition "
                              "through shortening -> latent stack -> upsampling is not a product of weight "
                              "matrices and is not scored")
            if layers[0].stage == "decoder":
                self.notes.append("skip-trigrams: layer 0 is a decoder layer, which reads the upsampled latents "
                                  "besides the embedding (not the embedding alone, as a GPT's first layer)")
            if has_decoder and self.cfg.position in ("learned", "sinusoidal"):
                self.notes.append("decoder layers read the position embedding twice (added again after upsampling); "
                                  "the positional QK score counts it once")
        else:
            self.weights_refused = ("model_options skip: false: the decoder layers read only upsampled latents and "
                                    "the encoder layers reach the logits only through the latent path, so no "
                                    "W_E -> W_U circuit is a product of weights")
            self.notes.append(f"weight-based circuits skipped: {self.weights_refused}")
            if not all(self.direct_to_logits):
                self.notes.append("copying_rank skipped for the encoder layers (no direct path to the logits)")

    # ---- the parts of nn.Module the analyses use -------------------------------------------------
    @property
    def training(self) -> bool:
        return self.model.training

    def eval(self) -> TokenLayersView:
        self.model.eval()
        return self

    def train(self, mode: bool = True) -> TokenLayersView:
        self.model.train(mode)
        return self

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.model.parameters()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def describe(self) -> list[dict]:
        """One row per view layer: ``{"layer", "module", "stage", "attention"}``."""
        return [{"layer": i, **t.describe()} for i, t in enumerate(self.layers)]

    def run_with_cache(self, idx: Tensor, names_filter: Callable[[str], bool] | list[str] | str | None = None,
                       detach: bool = True, **kwargs: Any) -> tuple[Tensor, dict[str, Tensor]]:
        """The model's ``run_with_cache`` with the token-level blocks' hooks named ``blocks.{i}.*``."""
        keep = names_predicate(names_filter)
        wanted: dict[str, tuple[str, TokenLayer | None, str]] = {}
        points = self.model.hook_points()
        for i, t in enumerate(self.layers):
            prefix = t.module + "."
            for real in points:
                if real.startswith(prefix):
                    suffix = real[len(prefix):]
                    if keep(f"blocks.{i}.{suffix}"):
                        wanted[real] = (f"blocks.{i}.{suffix}", t, suffix)
        wanted.update({n: (n, None, "") for n in PASSTHROUGH if n in points and keep(n)})
        if not wanted:
            return self.model(idx, **kwargs), {}
        logits, raw = self.model.run_with_cache(idx, names_filter=list(wanted), detach=detach, **kwargs)
        cache = {}
        for real, x in raw.items():
            name, t, suffix = wanted[real]
            local = t is not None and t.attention == "local"
            cache[name] = unfold_windows(x, suffix, idx.shape[0], idx.shape[1]) if local else x
        return logits, cache

