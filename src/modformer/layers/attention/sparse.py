"""Fixed sparse attention patterns, drop-in replacements for ``mha`` (same parameters and hook points).

Registered attention kinds (``model.attention_options`` in brackets; positions are absolute, causal):

- ``sliding_window`` [window]: key j is kept for query i when ``0 <= i - j < window`` (the seed's
  "last-10-tokens" toy is ``window: 10``).
- ``block_local`` [block]: causal attention inside non-overlapping blocks of ``block`` tokens.
- ``sink_window`` [sinks, window]: StreamingLLM (Xiao et al. 2023): the first ``sinks`` tokens plus a
  sliding window.
- ``strided`` [window, stride]: Sparse Transformer (Child et al. 2019): a local window plus every key at
  a distance that is a multiple of ``stride``.
- ``dilated`` [window, dilation]: Longformer's dilated window: ``window`` keys at distances 0, d, 2d, ...

Every kind also takes ``block_size`` (FlexAttention tile, default 128). Execution: with
``model.attn_backend: flex`` on CUDA the pattern becomes a cached FlexAttention ``BlockMask`` (blocks
that the pattern never touches are skipped, not masked); otherwise (CPU, eager, sdpa) a dense boolean
keep-mask goes to the eager / SDPA kernel (the reference). Padded or packed batches evaluate the pattern
on per-row positions (from each row's first real token / document start) inside the kernel's row mask
(``kernels.row_keep`` / ``row_mask_mod``), so a sequence keeps its pattern however it is batched. When the
pattern keeps every causal pair
for the current length (e.g. ``window >= T``) the call is exactly ``mha``'s dense path. ALiBi is not
supported (the pattern replaces the additive bias).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

from torch import Tensor

from modformer.config import ModelConfig
from modformer.layers.attention.kernels import AttnSpec, _positions
from modformer.layers.attention.mha import MultiHeadAttention
from modformer.layers.context import Context
from modformer.registry import ConfigError, register

# pattern name -> (keep(q_pos, k_pos, *params) -> bool tensor, dense(length, *params) -> bool)
Pattern = tuple[Callable[..., Tensor], Callable[..., bool]]
PATTERNS: dict[str, Pattern] = {
    "sliding_window": (lambda q, k, w: (q >= k) & (q - k < w), lambda n, w: w >= n),
    "block_local": (lambda q, k, b: (q >= k) & (q // b == k // b), lambda n, b: b >= n),
    "sink_window": (lambda q, k, s, w: (q >= k) & ((k < s) | (q - k < w)), lambda n, s, w: s + w >= n),
    "strided": (lambda q, k, w, s: (q >= k) & ((q - k < w) | ((q - k) % s == 0)), lambda n, w, s: w >= n or s == 1),
    "dilated": (lambda q, k, w, d: (q >= k) & ((q - k) % d == 0) & (q - k < w * d),
                lambda n, w, d: d == 1 and w >= n),
}


@lru_cache(maxsize=128)
def pattern_block_mask(name: str, params: tuple, tq: int, tk: int, q_offset: int, device: str,
                       block_size: int) -> object:
    """Cached FlexAttention BlockMask of a pattern (built blockwise and compiled on GPU)."""
    from torch.nn.attention.flex_attention import create_block_mask

    keep = PATTERNS[name][0]

    def mask_mod(b, h, q_idx, kv_idx):  # noqa: ANN001, ANN202
        return keep(q_idx + q_offset, kv_idx, *params)

    return create_block_mask(mask_mod, None, None, tq, tk, device=device, BLOCK_SIZE=block_size,
                             _compile=device.startswith("cuda"))


FLEX_TILE = 128   # compiled flex kernels tile queries/keys by up to 128 on H100: BlockMask blocks must divide by it


def flex_block_size(block_size: int) -> int:
    """BlockMask granularity for a pattern of ``block_size`` blocks: rounded up to a multiple of the flex tile
    (the mask_mod keeps the exact pattern inside partial blocks, so only the skipping gets coarser)."""
    return -(-block_size // FLEX_TILE) * FLEX_TILE


def use_flex(backend: str, q: Tensor, ctx: Context) -> bool:
    """Real block skipping: the flex backend on CUDA, a prefill with a known integer offset."""
    return backend == "flex" and q.device.type == "cuda" and ctx.q_offset is not None and q.shape[2] > 1


class SparseAttention(MultiHeadAttention):
    """``mha`` whose causal mask is replaced by a fixed pattern from ``PATTERNS``."""

    pattern = ""

    def __init__(self, cfg: ModelConfig, layer_idx: int, params: tuple[int, ...], block_size: int = 128,
                 n_kv_heads: int | None = None) -> None:
        super().__init__(cfg, layer_idx, n_kv_heads)
        if cfg.position == "alibi":
            raise ConfigError(f"model.attention={self.pattern!r} does not support model.position='alibi'")
        if not cfg.causal:
            raise ConfigError(f"model.attention={self.pattern!r} is causal; model.causal must be true")
        if any(int(p) < 1 for p in params) or block_size < 1:
            raise ConfigError(f"model.attention_options of {self.pattern!r} must be positive integers, got "
                              f"{params}, block_size={block_size}")
        self.params = tuple(int(p) for p in params)
        self.block_size = block_size

    def extra_repr(self) -> str:
        return f"pattern={self.pattern}, params={self.params}, block_size={self.block_size}"

    def keep_mask(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        """Dense boolean keep-mask ``(Tq, Tk)``."""
        return PATTERNS[self.pattern][0](q_pos[:, None], k_pos[None, :], *self.params)

    def attn_spec(self, q: Tensor, k: Tensor, ctx: Context) -> AttnSpec:
        spec = super().attn_spec(q, k, ctx)
        tq, tk = q.shape[2], k.shape[2]
        length = tk if ctx.q_offset is None else ctx.q_offset + tq
        if PATTERNS[self.pattern][1](length, *self.params):
            return spec                                      # keeps every causal pair: the dense path
        if spec.key_valid is not None:                       # padded / packed rows: the pattern on per-row
            spec.pattern = (PATTERNS[self.pattern][0], self.params)   # positions, inside the kernel's row mask
            return spec
        if use_flex(self.backend, q, ctx):
            spec.block_mask = pattern_block_mask(self.pattern, self.params, tq, tk, ctx.q_offset,
                                                 str(q.device), flex_block_size(self.block_size))
        else:
            spec.keep = self.keep_mask(*_positions(spec, tq, tk, q.device))
        return spec


def _register(name: str, *option_names: str, defaults: tuple[int, ...]) -> None:
    """Register pattern ``name`` as an attention kind taking ``option_names`` (plus block_size, n_kv_heads)."""

    class Kind(SparseAttention):
        pattern = name

        def __init__(self, cfg: ModelConfig, layer_idx: int, block_size: int = 128,
                     n_kv_heads: int | None = None, **options: int) -> None:
            unknown = set(options) - set(option_names)
            if unknown:
                raise ConfigError(f"model.attention_options: unknown {sorted(unknown)} for {name!r}; "
                                  f"allowed: {', '.join((*option_names, 'block_size', 'n_kv_heads'))}")
            params = tuple(options.get(o, d) for o, d in zip(option_names, defaults))
            super().__init__(cfg, layer_idx, params, block_size, n_kv_heads)

    Kind.__name__ = Kind.__qualname__ = "".join(p.title() for p in name.split("_")) + "Attention"
    Kind.__doc__ = f"Sparse attention pattern {name!r} (options: {', '.join(option_names)}); see the module doc."
    register("attention", name)(Kind)


_register("sliding_window", "window", defaults=(256,))
_register("block_local", "block", defaults=(256,))
_register("sink_window", "sinks", "window", defaults=(4, 256))
_register("strided", "window", "stride", defaults=(128, 128))
_register("dilated", "window", "dilation", defaults=(128, 2))
