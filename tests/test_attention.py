"""Attention kernels: every backend agrees with a float64 eager reference."""

import pytest
import torch

import modformer as mf
from modformer.layers.attention.kernels import AttnSpec, attend, attn_bias, causal_block_mask, eager_attention
from modformer.layers.position import alibi_slopes


def reference(q, k, v, causal, q_offset=0, slopes=None):
    """Plain float64 softmax attention, written independently of the kernels."""
    q, k, v = q.double(), k.double(), v.double()
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    tq, tk = q.shape[2], k.shape[2]
    qp = torch.arange(q_offset, q_offset + tq)[:, None]
    kp = torch.arange(tk)[None, :]
    if slopes is not None:
        scores = scores - slopes.double().view(-1, 1, 1) * (qp - kp).abs()
    if causal:
        scores = scores.masked_fill(kp > qp, float("-inf"))
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("backend", ["eager", "sdpa", "flex", "decode"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("alibi", [False, True])
def test_backends_match_float64_reference(backend, causal, kv_heads, alibi):
    B, H, T, Dh = 2, 4, 37, 16
    q, k, v = torch.randn(B, H, T, Dh), torch.randn(B, kv_heads, T, Dh), torch.randn(B, kv_heads, T, Dh)
    slopes = alibi_slopes(H) if alibi else None
    out, _ = attend(q, k, v, AttnSpec(causal=causal, alibi_slopes=slopes), backend)
    ref = reference(q, k, v, causal, slopes=slopes)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ["eager", "sdpa", "flex", "decode"])
@pytest.mark.parametrize("tq", [1, 5])
def test_backends_with_query_offset(backend, tq):
    """Decoding with a cache: queries start at position q_offset, keys at 0."""
    B, H, Tk, Dh = 1, 4, 20, 8
    off = Tk - tq
    q, k, v = torch.randn(B, H, tq, Dh), torch.randn(B, 2, Tk, Dh), torch.randn(B, 2, Tk, Dh)
    out, _ = attend(q, k, v, AttnSpec(causal=True, q_offset=off), backend)
    torch.testing.assert_close(out.double(), reference(q, k, v, True, off), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("pos", [0, 31, 32, 33, 95, 299])
@pytest.mark.parametrize("kv_heads", [4, 1])
def test_flex_decode_step_at_a_tensor_position_matches_the_reference(pos, kv_heads):
    """Compiled decoding passes the query position as a tensor over a static cache: the flex backend's decode
    BlockMask (full blocks before the query's, its own block masked, later blocks skipped) must equal causal
    attention at that position, whatever the unwritten slots hold, at and around block boundaries (32 here)."""
    from modformer.layers.attention.kernels import decode_block_mask, flex_attention_backend

    tk = 300
    q = torch.randn(2, 4, 1, 8, dtype=torch.float64)
    k, v = torch.randn(2, kv_heads, tk, 8, dtype=torch.float64), torch.randn(2, kv_heads, tk, 8, dtype=torch.float64)
    k[:, :, pos + 1:], v[:, :, pos + 1:] = 1e4, -1e4                   # stale slots past the query: no weight
    spec = AttnSpec(causal=True, q_offset=None, q_pos=torch.tensor([pos]), memo={})
    mask = decode_block_mask(spec, tk, q.device, block=32)
    assert mask.kv_num_blocks.item() == 1 and mask.full_kv_num_blocks.item() == pos // 32
    assert mask.kv_indices[0, 0, 0, 0].item() == pos // 32
    assert mask.to_dense().flatten().tolist() == [int(b <= pos // 32) for b in range(-(-tk // 32))]
    spec.memo[("decode_block_mask", tk, 128, "cpu")] = mask         # the backend reuses the forward's mask
    out, _ = flex_attention_backend(q, k, v, spec)
    ref = reference(q, k[:, :, :pos + 1], v[:, :, :pos + 1], True, pos)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)


def test_static_cache_slots_after_query_are_hidden():
    """Keys beyond the query position (unwritten static-cache slots) get zero weight."""
    q, k, v = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
    _, probs = eager_attention(q, k, v, AttnSpec(causal=True, q_offset=3), need_weights=True)
    assert torch.all(probs[..., 4:] == 0)
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, 2, 1))


def test_eager_returns_probabilities_and_gradients_match_sdpa():
    q = torch.randn(2, 4, 16, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 4, 16, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 4, 16, 8, dtype=torch.float64, requires_grad=True)
    grads = []
    for backend in ("eager", "sdpa"):
        out, probs = attend(q, k, v, AttnSpec(), backend, need_weights=backend == "eager")
        if probs is not None:
            torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 16, dtype=probs.dtype))
            assert torch.all(probs.triu(1) == 0)
        grads.append(torch.autograd.grad(out.square().sum(), (q, k, v)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_alibi_slopes_and_bias_values():
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    # 6 heads: the 4-head sequence, then every other slope of the 8-head sequence (Press et al.)
    expected6 = [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3]
    torch.testing.assert_close(alibi_slopes(6), torch.tensor(expected6))
    bias = attn_bias(AttnSpec(causal=True, alibi_slopes=alibi_slopes(4)), 4, 5, 5, torch.device("cpu"),
                     torch.float32)
    for h, m in enumerate(alibi_slopes(4).tolist()):
        for i in range(5):
            for j in range(5):
                want = float("-inf") if j > i else -m * (i - j)
                assert bias[h, i, j].item() == pytest.approx(want)


def test_flex_block_mask_is_cached_and_causal():
    bm = causal_block_mask(8, 8, 0, "cpu")
    assert bm is causal_block_mask(8, 8, 0, "cpu")
    from modformer.layers.attention.kernels import dense_from_block_mask
    dense = dense_from_block_mask(bm, 8, 8)[0, 0]
    assert torch.equal(dense, torch.ones(8, 8, dtype=torch.bool).tril())


def test_causal_mask_bias_is_built_once_per_forward(monkeypatch):
    """An eager static-cache prefill needs a mask bias (keys beyond the queries); all layers share one, via
    Context.memo."""
    from modformer.layers.attention import kernels

    calls = []
    real = kernels._positions
    monkeypatch.setattr(kernels, "_positions", lambda *a: calls.append(1) or real(*a))
    model = mf.build_model(mf.ModelConfig(vocab_size=17, n_layer=3, d_model=32, n_head=4, max_seq_len=16,
                                          attn_backend="eager")).eval()
    idx = torch.randint(0, 17, (2, 5))
    with torch.no_grad():
        out = model(idx, cache=model.new_cache(2, static=True, max_len=16))
    assert len(calls) == 1
    torch.testing.assert_close(out, model(idx))


def test_sdpa_static_cache_prefill_is_plain_causal_over_the_written_keys(monkeypatch):
    """A prefill into a static cache (keys outnumber queries, the rest unwritten) reaches SDPA as plain causal
    attention over the queries' own keys (flash-eligible, no mask), whatever the unwritten slots hold, and equals the
    uncached forward; a later chunk (query offset > 0) still gets its mask."""
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, **kw):
        seen.append((q.shape[2], k.shape[2], attn_mask is None, is_causal))
        return real(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    model = mf.build_model(mf.ModelConfig(vocab_size=17, n_layer=2, d_model=32, n_head=4, max_seq_len=16)).eval()
    idx = torch.randint(0, 17, (2, 7))
    with torch.no_grad():
        ref = model(idx)
        seen.clear()
        cache = model.new_cache(2, static=True, max_len=16)
        model(idx[:, :5], cache=cache)                              # allocates the buffers
        for layer in range(2):                                      # stale slots past the prompt
            cache.keys[layer][:, :, 5:], cache.values[layer][:, :, 5:] = 1e4, -1e4
        cache.crop(0)
        seen.clear()
        out = model(idx[:, :5], cache=cache)
        assert seen == [(5, 5, True, True)] * 2
        torch.testing.assert_close(out, ref[:, :5])
        seen.clear()
        torch.testing.assert_close(model(idx[:, 5:], cache=cache), ref[:, 5:], rtol=1e-5, atol=1e-5)
        assert [s[:3] for s in seen] == [(2, 16, False)] * 2


def test_cudnn_is_left_out_only_where_inference_shapes_keep_changing(monkeypatch):
    """cuDNN plans each new shape, so eager decoding (a query offset) and cache-less generation avoid it, while a
    plain causal inference forward keeps it (SDPA's fastest forward on Hopper); training always keeps it."""
    from types import SimpleNamespace

    from modformer.layers.attention import kernels

    monkeypatch.setattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: True)
    gpu_q = SimpleNamespace(is_cuda=True)
    with torch.no_grad():
        assert not kernels._skip_cudnn(gpu_q, plain_causal=True)
        assert kernels._skip_cudnn(gpu_q, plain_causal=False)
        with kernels.changing_shapes():
            assert kernels._skip_cudnn(gpu_q, plain_causal=True)
        assert not kernels._skip_cudnn(SimpleNamespace(is_cuda=False), plain_causal=False)
    assert not kernels._skip_cudnn(gpu_q, plain_causal=False)          # gradients on: training shapes

    seen = []
    monkeypatch.setattr(kernels, "_skip_cudnn", lambda q, plain: seen.append((plain, kernels._changing_shapes)))
    q, k, v = (torch.randn(1, 2, 6, 8) for _ in range(3))
    attend(q, k, v, AttnSpec(causal=True), "sdpa")
    out, _ = attend(q[:, :, -1:], k, v, AttnSpec(causal=True, q_offset=5), "sdpa")   # one decoding step
    torch.testing.assert_close(out, reference(q, k, v, True)[:, :, -1:].float(), atol=1e-5, rtol=1e-5)
    assert seen == [(True, 0), (False, 0)]
    model = mf.build_model(mf.ModelConfig(vocab_size=11, n_layer=1, d_model=16, n_head=2, max_seq_len=16))
    seen.clear()
    model.generate(torch.zeros(1, 3, dtype=torch.long), 2, temperature=0, use_cache=False)
    assert seen and all(depth == 1 for _, depth in seen)
    seen.clear()
    model.generate(torch.zeros(1, 3, dtype=torch.long), 2, temperature=0)
    assert seen == [(True, 0), (False, 0)]


def test_static_cache_writes_keys_and_values_into_one_buffer_at_tensor_positions():
    """At tensor positions (compiled decoding) a layer's keys and values land in one ``(2, B, Hkv, T, Dh)`` buffer
    (one scatter kernel), at the given slots only; ``keys``/``values`` are views of it. Values of another head size
    get their own buffer."""
    from modformer.layers.cache import StaticKVCache

    cache = StaticKVCache(2, batch=2, n_kv_heads=None, max_len=8, head_dim=None)
    k, v = torch.randn(2, 3, 2, 4), torch.randn(2, 3, 2, 4)
    cache.positions = torch.tensor([5, 6])
    keys, values = cache.update(0, k, v)
    assert keys.data_ptr() == cache.kv[0].data_ptr() and values.data_ptr() == cache.kv[0][1].data_ptr()
    assert torch.equal(keys[:, :, 5:7], k) and torch.equal(values[:, :, 5:7], v)
    assert not keys[:, :, :5].any() and not values[:, :, 7:].any()
    keys, values = cache.update(1, k, torch.randn(2, 3, 2, 6))
    assert cache.kv[1] is None and values.shape == (2, 3, 8, 6) and torch.equal(keys[:, :, 5:7], k)
