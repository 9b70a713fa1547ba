"""Building blocks; importing this package registers every built-in component."""

from modformer.layers import block, ffn, moe, norm, position  # noqa: F401
from modformer.layers.attention import kernels, mha, mla, moa, multichannel, talking_heads  # noqa: F401
from modformer.layers.cache import KVCache, StaticKVCache
from modformer.layers.hooks import HookPoint

__all__ = ["HookPoint", "KVCache", "StaticKVCache"]
