"""Diagonal dominance of local attention (seed 003's test recommendation), made precise by ``band_mass``.

``band_mass(patterns, w)[l, h]`` = the mean over queries i (and batch rows) of sum_{0 <= i - j < w} A[i, j].
On constructed models the expected value is derived in closed form:

* zero query/key weights make every score 0, so a head attends uniformly over the keys its mask allows:
  full causal attention gives min(i + 1, w) / (i + 1) per row, a sliding window of W keys gives
  min(i + 1, w, W) / min(i + 1, W) (1 for w >= W), a block-local pattern of B keys gives
  min(i % B + 1, w) / (i % B + 1);
* ALiBi with zero query/key weights gives A[i, j] proportional to exp(-m (i - j)), so a row holds
  (1 - exp(-m min(i + 1, w))) / (1 - exp(-m (i + 1))) of its mass in the band (a geometric series).
Random (trained-like) weights: a sliding window of W keys still holds all its mass in the band of width W,
while full attention with the same weights does not.
"""

from __future__ import annotations

import math

import pytest
import torch
from _helpers import randomized

from modformer.interp.heads import attention_patterns, band_mass, stack_patterns

T = 24


def patterns(model: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    idx = torch.randint(0, 37, (3, T), generator=torch.Generator().manual_seed(seed))
    return stack_patterns(attention_patterns(model, idx), model.cfg.n_layer).double()


def zero_qk(model: torch.nn.Module) -> torch.nn.Module:
    """Every attention score 0: the first (H + Hkv) * Dh rows of each fused QKV projection (and bias) zeroed."""
    with torch.no_grad():
        for block in model.blocks:
            attn = block.attn
            rows = (attn.n_head + attn.n_kv_heads) * attn.head_dim
            attn.qkv.weight[:rows] = 0
            if attn.qkv.bias is not None:
                attn.qkv.bias[:rows] = 0
    return model


def expected(row_mass) -> float:
    """Mean over query positions 0..T-1 of a per-row band mass."""
    return sum(row_mass(i) for i in range(T)) / T


@pytest.mark.parametrize("width", [1, 3, 8, T])
def test_uniform_causal_attention_band_mass_is_derived(width):
    model = zero_qk(randomized(position="none"))
    got = band_mass(patterns(model), width)
    want = expected(lambda i: min(i + 1, width) / (i + 1))
    torch.testing.assert_close(got, torch.full_like(got, want), atol=1e-6, rtol=0)


@pytest.mark.parametrize("window,width", [(4, 1), (4, 3), (4, 4), (4, 9), (8, 5)])
def test_uniform_sliding_window_band_mass_is_derived(window, width):
    model = zero_qk(randomized(position="none", attention="sliding_window", attention_options={"window": window}))
    got = band_mass(patterns(model), width)
    want = expected(lambda i: min(i + 1, width, window) / min(i + 1, window))
    torch.testing.assert_close(got, torch.full_like(got, want), atol=1e-6, rtol=0)


def test_uniform_block_local_band_mass_is_derived():
    block, width = 6, 2
    model = zero_qk(randomized(position="none", attention="block_local", attention_options={"block": block}))
    got = band_mass(patterns(model), width)
    want = expected(lambda i: min(i % block + 1, width) / (i % block + 1))
    torch.testing.assert_close(got, torch.full_like(got, want), atol=1e-6, rtol=0)


@pytest.mark.parametrize("width", [1, 2, 5])
def test_alibi_band_mass_is_a_geometric_series(width):
    model = zero_qk(randomized(position="alibi"))
    slopes = model.position.alibi_slopes().double()
    got = band_mass(patterns(model), width)                       # (L, H)

    def row(i: int, m: float) -> float:
        return (1 - math.exp(-m * min(i + 1, width))) / (1 - math.exp(-m * (i + 1)))
    want = torch.tensor([expected(lambda i, m=float(m): row(i, m)) for m in slopes], dtype=torch.float64)
    torch.testing.assert_close(got, want.expand_as(got), atol=1e-5, rtol=0)
    assert (got[:, :-1] >= got[:, 1:] - 1e-9).all()               # steeper slope (earlier head) = more local


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_sliding_window_keeps_all_mass_on_the_band_with_random_weights(position):
    window = 5
    local = randomized(position=position, attention="sliding_window", attention_options={"window": window})
    full = randomized(position=position)
    full.load_state_dict(local.state_dict())                      # the same weights, full causal attention
    p_local, p_full = patterns(local), patterns(full)
    torch.testing.assert_close(band_mass(p_local, window), torch.ones(2, 4, dtype=torch.float64),
                               atol=1e-6, rtol=0)
    assert (band_mass(p_full, window) < 1 - 1e-3).all()          # full attention spends mass off the band
    # narrower bands: each row's mass is monotone in the width and reaches 1 exactly at the window
    masses = torch.stack([band_mass(p_local, w) for w in range(1, window + 2)])
    assert (masses[1:] >= masses[:-1] - 1e-12).all()
    torch.testing.assert_close(masses[-1], masses[-2])


def test_band_mass_rejects_a_bad_width():
    with pytest.raises(ValueError, match="width must be >= 1"):
        band_mass(torch.ones(1, 1, 1, 2, 2), 0)
