"""modformer.nn.MultiheadAttention against torch.nn.MultiheadAttention: same constructor, forward and state dict,
outputs and weights equal to fp32 tolerance (E = 16: sums of 16 products of O(1) terms, so 1e-5), both batch
layouts, every mask type, need_weights both ways, kdim/vdim, bias_k/v, zero attention, unbatched input, every
backend; and the kind-backed form (sliding_window) against torch with the same pattern as a boolean mask."""

import pytest
import torch

from modformer.nn import MultiheadAttention

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = dict(atol=1e-5, rtol=1e-5)
E, H, L, S, N = 16, 4, 5, 7, 3


def pair(**kw):
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(E, H, **kw).eval()
    ours = MultiheadAttention(E, H, **kw).eval()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def inputs(batch_first: bool, kdim: int = E, vdim: int = E, s: int = S):
    g = torch.Generator().manual_seed(1)
    shape = (lambda t, d: (N, t, d)) if batch_first else (lambda t, d: (t, N, d))
    return (torch.randn(shape(L, E), generator=g), torch.randn(shape(s, kdim), generator=g),
            torch.randn(shape(s, vdim), generator=g))


def masks(kind: str):
    g = torch.Generator().manual_seed(2)
    kpm = torch.zeros(N, S, dtype=torch.bool)
    kpm[0, -2:] = True
    kpm[1, :3] = True
    bool_mask = torch.rand(L, S, generator=g) < 0.3
    bool_mask[:, 3] = False                             # no fully masked row (torch gives NaN there, we give 0)
    return {
        "none": {},
        "key_padding": dict(key_padding_mask=kpm),
        "bool_attn": dict(attn_mask=bool_mask),
        "float_attn": dict(attn_mask=torch.randn(L, S, generator=g)),
        "per_head": dict(attn_mask=torch.randn(N * H, L, S, generator=g)),
        "both": dict(attn_mask=bool_mask, key_padding_mask=kpm),
        "float_kpm": dict(key_padding_mask=torch.randn(N, S, generator=g), attn_mask=torch.randn(L, S, generator=g)),
    }[kind]


def check(ref, ours, args, **kw):
    with torch.no_grad():
        a, wa = ref(*args, **kw)
        b, wb = ours(*args, **kw)
    torch.testing.assert_close(b, a, **TOL)
    if wa is None:
        assert wb is None
    else:
        torch.testing.assert_close(wb, wa, **TOL)


@pytest.mark.parametrize("mask", ["none", "key_padding", "bool_attn", "float_attn", "per_head", "both", "float_kpm"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_matches_torch_masks_and_layouts(batch_first, mask):
    ref, ours = pair(batch_first=batch_first)
    for need_weights in (True, False):
        for average in (True, False):
            check(ref, ours, inputs(batch_first), need_weights=need_weights, average_attn_weights=average,
                  **masks(mask))


@pytest.mark.parametrize("backend", ["sdpa", "eager", "flex"])
def test_backends(backend):
    ref, ours = pair(batch_first=True)
    ours.backend = backend
    for mask in ("none", "both", "float_attn"):
        check(ref, ours, inputs(True), need_weights=False, **masks(mask))


@pytest.mark.parametrize("opts", [dict(kdim=6, vdim=10), dict(bias=False), dict(add_bias_kv=True),
                                  dict(add_zero_attn=True), dict(add_bias_kv=True, add_zero_attn=True, kdim=6)])
def test_constructor_options(opts):
    ref, ours = pair(**opts)
    assert set(ours.state_dict()) == set(ref.state_dict())
    args = inputs(False, opts.get("kdim", E), opts.get("vdim", E))
    for mask in ("none", "both"):
        check(ref, ours, args, **masks(mask))


def test_unbatched_and_causal():
    ref, ours = pair()
    q = torch.randn(L, E)
    check(ref, ours, (q, q, q))
    check(ref, ours, (q, q, q), attn_mask=torch.randn(H, L, L), average_attn_weights=False)
    causal = torch.ones(L, L, dtype=torch.bool).triu(1)
    x = inputs(True, s=L)[0].transpose(0, 1)
    check(ref, ours, (x, x, x), attn_mask=causal, is_causal=True, need_weights=False)
    with torch.no_grad():                                   # ours builds the causal mask itself
        torch.testing.assert_close(ours(x, x, x, is_causal=True, need_weights=False)[0],
                                   ref(x, x, x, attn_mask=causal)[0], **TOL)


def test_gradients_match_torch():
    ref, ours = pair(batch_first=True)
    ref.train(), ours.train()
    q, k, v = inputs(True)
    ref(q, k, v, **masks("both"))[0].square().sum().backward()
    ours(q, k, v, **masks("both"))[0].square().sum().backward()
    for (name, a), b in zip(ref.named_parameters(), ours.parameters()):
        torch.testing.assert_close(b.grad, a.grad, **TOL, msg=name)


@pytest.mark.parametrize("window", [3, 16])
def test_sliding_window_kind_matches_torch_with_its_mask(window):
    """kind='sliding_window' loads torch's weights; equals torch given the window as a boolean attn_mask,
    with right padding as key_padding_mask too."""
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(E, H, batch_first=True).eval()
    ours = MultiheadAttention(E, H, batch_first=True, kind="sliding_window", window=window).eval()
    ours.load_state_dict(ref.state_dict())
    T = 9
    i = torch.arange(T)
    outside = (i[None, :] > i[:, None]) | (i[:, None] - i[None, :] >= window)   # True = not attended
    x = torch.randn(N, T, E)
    kpm = torch.zeros(N, T, dtype=torch.bool)
    kpm[1, 6:] = True
    with torch.no_grad():
        a, wa = ref(x, x, x, attn_mask=outside)
        b, wb = ours(x, x, x)
        torch.testing.assert_close(b, a, **TOL)
        torch.testing.assert_close(wb, wa, **TOL)
        a = ref(x, x, x, attn_mask=outside, key_padding_mask=kpm, need_weights=False)[0]
        b = ours(x, x, x, key_padding_mask=kpm, need_weights=False)[0]
    torch.testing.assert_close(b[1, :6], a[1, :6], **TOL)
    torch.testing.assert_close(b[0], a[0], **TOL)


def test_kind_errors():
    m = MultiheadAttention(E, H, kind="sliding_window", window=3)
    x = torch.randn(L, N, E)
    with pytest.raises(ValueError, match="self-attention"):
        m(x, x.clone(), x)
    with pytest.raises(ValueError, match="attn_mask is not supported"):
        m(x, x, x, attn_mask=torch.zeros(L, L, dtype=torch.bool))
    with pytest.raises(ValueError, match="options need kind"):
        MultiheadAttention(E, H, window=3)
