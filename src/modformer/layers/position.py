"""Position encodings (registry kind ``position``).

A position module may do any of four things, each a no-op by default:
``embed(pos)`` returns an absolute ``(T, D)`` embedding added to token embeddings;
``qk_embed(pos)`` an absolute ``(T, D)`` embedding added to every attention layer's normed query and key
inputs only (Shortformer); ``rotate(q, k, pos)`` rotates queries/keys (RoPE); ``alibi_slopes()`` gives
per-head linear biases (ALiBi) that the attention kernel applies. ``pos`` holds absolute positions ``(T,)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from modformer.config import ModelConfig
from modformer.registry import ConfigError, register
from modformer.validation import check_value


class Position(nn.Module):
    """Base class: no positional information (also registered as ``none``)."""

    max_len: int | None = None   # longest sequence supported, None = unbounded

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()

    def init_after_model(self) -> None:
        """Re-initialise own parameters after the model's generic init (GPT calls it); default: keep them."""

    def embed(self, pos: Tensor) -> Tensor | None:
        return None

    def embed_arange(self, pos: Tensor) -> Tensor | None:
        """``embed(pos)`` for ``pos = arange(len(pos))``, which a subclass may compute more cheaply."""
        return self.embed(pos)

    def qk_embed(self, pos: Tensor) -> Tensor | None:
        return None

    def rotate(self, q: Tensor, k: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
        return q, k

    def alibi_slopes(self) -> Tensor | None:
        return None


register("position", "none")(Position)


@register("position", "learned")
class LearnedPosition(Position):
    """A learned table of ``max_seq_len`` absolute position vectors (GPT-2)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.max_len = cfg.max_seq_len
        self.wpe = nn.Embedding(cfg.max_seq_len, cfg.d_model)

    def embed(self, pos: Tensor) -> Tensor:
        return self.wpe(pos)

    def embed_arange(self, pos: Tensor) -> Tensor:
        """The first rows of the table: a view, whose backward is a slice copy instead of an embedding scatter."""
        return self.wpe.weight[: pos.shape[0]]


@register("position", "shortformer")
class ShortformerPosition(LearnedPosition):
    """Position-infused attention (Press et al. 2021, Shortformer): a learned table added to the normed input
    of every attention layer's queries and keys, never to the values or the residual stream, so token
    identity and position stay in separate channels. TransformerLens's ``positional_embedding_type=
    "shortformer"`` (its attention-only models). The table is added after the norm, so it starts at the normed
    input's scale, N(0, 1) (N(0, init_std) without norms): at the usual 0.02 it is 50x smaller than the token
    signal and a 2-layer model formed no previous-token head in 2,500 steps (BENCHMARKS.md, circuits)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.init_std = 1.0 if cfg.norm != "none" else cfg.init_std

    def init_after_model(self) -> None:
        nn.init.normal_(self.wpe.weight, 0.0, self.init_std)

    def embed(self, pos: Tensor) -> None:
        return None

    def embed_arange(self, pos: Tensor) -> None:
        return None

    def qk_embed(self, pos: Tensor) -> Tensor:
        return self.wpe(pos)


@register("position", "sinusoidal")
class SinusoidalPosition(Position):
    """Fixed sin/cos absolute encodings (Vaswani et al. 2017), computed for any length."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.d_model = cfg.d_model

    def embed(self, pos: Tensor) -> Tensor:
        half = self.d_model // 2
        freq = torch.exp(-math.log(10000.0) * torch.arange(half, device=pos.device) * 2 / self.d_model)
        angles = pos.float()[..., None] * freq                            # (T, D/2); (B, T, D/2) per row
        out = torch.zeros(*pos.shape, self.d_model, device=pos.device)
        out[..., 0:2 * half:2] = angles.sin()
        out[..., 1:2 * half:2] = angles.cos()
        return out


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_inv_freq(dim: int, base: float, scaling: dict) -> Tensor:
    """RoPE inverse frequencies ``1 / base^(2i/dim)`` (``dim`` rotated dims), optionally rescaled (HF's keys):
    ``linear`` divides every frequency by ``factor`` (position interpolation, Chen et al. 2023); ``llama3``
    (Llama 3.1) divides the low frequencies (wavelength > original length / low_freq_factor) by ``factor``,
    keeps the high ones (wavelength < original length / high_freq_factor) and interpolates in between."""
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind == "default":
        return inv_freq
    if kind not in ("linear", "llama3"):
        raise ConfigError(f"model.rope_scaling: rope_type {kind!r} is not supported (allowed: linear, llama3)")
    try:
        factor = float(scaling["factor"])
        if kind == "linear":
            return inv_freq / factor
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
    except KeyError as e:
        raise ConfigError(f"model.rope_scaling: rope_type {kind!r} needs {e.args[0]!r}") from None
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    mid = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return torch.where(wavelen > old_len / low, inv_freq / factor,
                       torch.where(wavelen < old_len / high, inv_freq, mid))


@register("position", "rope")
class RotaryPosition(Position):
    """Rotary embeddings (Su et al. 2021), half-split convention (``rotate_half``, as HF Llama / GPT-NeoX
    store their q/k weights); ``rope_base`` sets the base. ``rope_fraction`` < 1 rotates only the first
    ``int(head_dim * rope_fraction)`` dims of each head and passes the rest through (GPT-NeoX's partial
    rotary); ``rope_scaling`` rescales the frequencies (``rope_inv_freq``).

    The score between positions m and n depends only on m - n (tested).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.rot_dim = int(cfg.head_dim * cfg.rope_fraction)
        if self.rot_dim % 2 or self.rot_dim == 0:
            raise ConfigError(f"model.position='rope' needs an even, positive number of rotated dims, got "
                              f"{self.rot_dim} (head_dim {cfg.head_dim} x rope_fraction {cfg.rope_fraction})")
        check_value(cfg.rope_base, "> 0", "model.rope_base")     # also when built without ModelConfig.validate
        inv_freq = rope_inv_freq(self.rot_dim, cfg.rope_base, cfg.rope_scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def cos_sin(self, pos: Tensor) -> tuple[Tensor, Tensor]:
        angles = pos.float()[..., None] * self.inv_freq.to(pos.device)         # (T | B, T, rot_dim/2)
        angles = torch.cat((angles, angles), dim=-1)                           # (T, rot_dim)
        return angles.cos(), angles.sin()

    def rotate(self, q: Tensor, k: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
        cos, sin = self.cos_sin(pos)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        if pos.dim() == 2:                                     # per-row positions (B, T): broadcast over heads
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        if self.rot_dim == q.shape[-1]:
            return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        r = self.rot_dim

        def rot(x: Tensor) -> Tensor:
            x_rot = x[..., :r]
            return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x[..., r:]), dim=-1)

        return rot(q), rot(k)


def alibi_slopes(n_head: int) -> Tensor:
    """ALiBi head slopes (Press et al. 2022): geometric 2^(-8/n); non-powers of two interleave."""
    def pow2(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_head).is_integer():
        return torch.tensor(pow2(n_head))
    m = 2 ** math.floor(math.log2(n_head))
    return torch.tensor(pow2(m) + pow2(2 * m)[0::2][: n_head - m])


@register("position", "alibi")
class AlibiPosition(Position):
    """Attention with linear biases: score -= slope_h * |i - j|; no embedding, any length."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.register_buffer("slopes", alibi_slopes(cfg.n_head), persistent=False)

    def alibi_slopes(self) -> Tensor:
        return self.slopes
