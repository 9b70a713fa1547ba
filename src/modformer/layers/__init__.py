"""Building blocks; importing this package registers every built-in component."""

from modformer.layers import block, ffn, moe, norm, position  # noqa: F401
from modformer.layers.attention import (  # noqa: F401
    gate,
    kernels,
    mha,
    mla,
    moa,
    multichannel,
    performer,
    sparse,
    talking_heads,
)
from modformer.layers.cache import KVCache, StaticKVCache
from modformer.layers.hooks import HookPoint

__all__ = ["HookPoint", "KVCache", "StaticKVCache"]
