"""Cross-attention: queries from one stream, keys / values from another aligned stream (CALM's bridge).

``CrossAttention(x (B, T, D), memory (B, T, D_mem)) -> (B, T, D)``. The two streams are the same tokens
seen by two models, so with ``causal=True`` query t sees memory positions <= t only (the shared kernel
dispatcher's causal mask): composing two causal LMs stays a causal LM. ``zero_init`` zeroes the output
projection, so a freshly added block changes nothing.
"""

from __future__ import annotations

from torch import Tensor, nn

from modformer.layers.attention.kernels import AttnSpec, attend


class CrossAttention(nn.Module):
    """Pre-norm multi-head cross-attention with its own Q, K/V and output projections."""

    def __init__(self, d_model: int, n_head: int, d_memory: int | None = None, causal: bool = True,
                 zero_init: bool = True, backend: str = "sdpa") -> None:
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_head ({n_head})")
        d_memory = d_memory or d_model
        self.n_head, self.causal, self.backend = n_head, causal, backend
        self.ln_q, self.ln_kv = nn.LayerNorm(d_model), nn.LayerNorm(d_memory)
        self.q = nn.Linear(d_model, d_model)
        self.kv = nn.Linear(d_memory, 2 * d_model)
        self.out = nn.Linear(d_model, d_model)
        if zero_init:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, memory: Tensor, key_valid: Tensor | None = None) -> Tensor:
        """``key_valid`` ``(B, S)`` bool: False for padding positions of ``memory`` (never attended)."""
        B, T, D = x.shape
        S, H = memory.shape[1], self.n_head
        q = self.q(self.ln_q(x)).view(B, T, H, D // H).transpose(1, 2)                    # (B, H, T, Dh)
        k, v = self.kv(self.ln_kv(memory)).view(B, S, 2, H, D // H).permute(2, 0, 3, 1, 4)  # (B, H, S, Dh) each
        z, _ = attend(q, k, v, AttnSpec(causal=self.causal, key_valid=key_valid), self.backend)
        return self.out(z.transpose(1, 2).reshape(B, T, D))
