"""Sparse attention kinds, the distillation engine and the fidelity metrics (issue 7)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import yaml

import modformer as mf
from modformer.bench import fidelity
from modformer.compress.distill import DistillConfig, Distiller, build_student
from modformer.config import DataConfig
from modformer.layers.attention.gate import sparsemax
from modformer.layers.attention.kernels import AttnSpec, eager_attention
from modformer.layers.attention.performer import causal_linear_attention, orthogonal_features, positive_features
from modformer.layers.attention.sparse import PATTERNS

V, T = 37, 45           # T is not a multiple of the block sizes used below

FIXED = {"sliding_window": {"window": 7}, "block_local": {"block": 8}, "sink_window": {"sinks": 2, "window": 5},
         "strided": {"window": 3, "stride": 4}, "dilated": {"window": 4, "dilation": 3}}
DENSE = {"sliding_window": {"window": T}, "block_local": {"block": 64}, "sink_window": {"sinks": 1, "window": T},
         "strided": {"window": 2, "stride": 1}, "dilated": {"window": T, "dilation": 1},
         "learned_gate": {"block_size": 8, "top_k": 6}}


def _teacher(backend: str = "eager", **kw: object) -> torch.nn.Module:
    cfg = mf.ModelConfig(vocab_size=V, n_layer=2, d_model=32, n_head=4, max_seq_len=64, attn_backend=backend, **kw)
    return mf.build_model(cfg).eval()


def _student(teacher: torch.nn.Module, attention: str, options: dict) -> torch.nn.Module:
    return build_student(teacher, {"attention": attention, "attention_options": options}).eval()


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", sorted(DENSE))
def test_sparsity_zero_is_dense_attention_exactly(kind: str, backend: str) -> None:
    teacher = _teacher(backend)
    student = _student(teacher, kind, DENSE[kind])
    x = torch.randint(0, V, (2, T))
    with torch.no_grad():
        assert torch.equal(student(x), teacher(x))


def test_threshold_zero_gate_is_dense() -> None:
    teacher = _teacher()
    student = _student(teacher, "learned_gate", {"block_size": 8, "select": "threshold", "threshold": 0.0})
    x = torch.randint(0, V, (2, T))
    with torch.no_grad():
        assert torch.equal(student(x), teacher(x))


@pytest.mark.parametrize("kind", sorted(FIXED))
def test_fixed_pattern_attends_exactly_the_kept_pairs(kind: str) -> None:
    student = _student(_teacher(), kind, FIXED[kind])
    x = torch.randint(0, V, (1, T))
    probs = fidelity.attention_patterns(student, x)["blocks.0.attn.hook_pattern"][0]       # (H, T, T)
    pos = torch.arange(T)
    keep = PATTERNS[kind][0](pos[:, None], pos[None, :], *student.blocks[0].attn.params)
    assert torch.equal(probs > 0, keep.expand_as(probs))             # every kept pair attended, nothing else
    assert not keep.triu(1).any() and keep.diagonal().all()
    assert torch.allclose(probs.sum(-1), torch.ones(4, T))


@pytest.mark.parametrize("kind,options", [*FIXED.items(), ("learned_gate", {"block_size": 8, "top_k": 2}),
                                          ("learned_gate", {"block_size": 8, "select": "sparsemax"}),
                                          ("learned_gate", {"block_size": 8, "select": "threshold",
                                                            "threshold": 0.3}),
                                          ("performer", {"n_features": 32, "chunk": 8})])
def test_no_future_leakage(kind: str, options: dict) -> None:
    student = _student(_teacher(), kind, options)
    x = torch.randint(0, V, (2, T))
    for cut in (1, 8, 20, 33):
        y = x.clone()
        y[:, cut:] = torch.randint(0, V, (2, T - cut))
        with torch.no_grad():
            a, b = student(x)[:, :cut], student(y)[:, :cut]
        assert torch.allclose(a, b, atol=1e-6, rtol=0), (kind, cut)


def test_learned_gate_respects_top_k_and_keeps_the_diagonal() -> None:
    bs, k = 8, 3
    student = _student(_teacher(), "learned_gate", {"block_size": bs, "top_k": k})
    x = torch.randint(0, V, (2, T))
    probs = fidelity.attention_patterns(student, x)
    for layer in student.blocks:
        keep = layer.attn.last_keep                                    # (B, H, nq, nk)
        nq = keep.shape[2]
        assert nq == math.ceil(T / bs) == keep.shape[3]
        counts = keep.sum(-1)
        assert torch.equal(counts, torch.arange(nq).add(1).clamp_max(k).expand_as(counts))
        assert keep.diagonal(dim1=-2, dim2=-1).all() and not keep.triu(1).any()
    p = probs["blocks.1.attn.hook_pattern"]
    blocks = student.blocks[1].attn.last_keep
    pos = torch.arange(T)
    dense = blocks[:, :, pos // bs][..., pos // bs] & (pos[:, None] >= pos[None, :])
    assert torch.equal(p > 0, dense)                                   # kept blocks are attended, no others


@pytest.mark.parametrize(("length", "offset"), [(45, 0), (48, 0), (45, 21), (45, 44)])
def test_learned_gate_scores_equal_a_float64_reference(length: int, offset: int) -> None:
    """Gate scores from the module doc's definition, block by block in float64: the query summary is the mean
    query over the ``bs`` positions ending at the block's first token, a key block is [mean; max] of its keys,
    the scored blocks are the strictly past ones; prefill (offset 0) and cached steps (offset > 0)."""
    from modformer.layers.attention.gate import LearnedGateAttention

    bs, H, Dh = 8, 2, 6
    cfg = mf.ModelConfig(vocab_size=V, n_layer=1, n_head=H, d_model=H * Dh, max_seq_len=64)
    layer = LearnedGateAttention(cfg, 0, block_size=bs, top_k=3, d_gate=5).double()
    torch.nn.init.normal_(layer.gate_q.weight)
    torch.nn.init.normal_(layer.gate_k.weight)
    q, k = torch.randn(2, H, length, Dh, dtype=torch.float64), torch.randn(2, H, length, Dh, dtype=torch.float64)
    scores, keep, qb, past = layer.gate(q, k, offset, length - offset)
    nk = math.ceil(length / bs)
    assert qb.tolist() == list(range(offset // bs, (length - 1) // bs + 1))
    for i, j in enumerate(qb.tolist()):
        start = j * bs
        q_sum = q[:, :, max(0, start - bs + 1):start + 1].mean(2)
        for b in range(nk):
            if b >= j:
                assert scores[:, :, i, b].isneginf().all() and not past[i, b]
                continue
            kb = k[:, :, b * bs:(b + 1) * bs]
            gk = layer.gate_k(torch.cat([kb.mean(2), kb.amax(2)], -1))
            ref = (layer.gate_q(q_sum) * gk).sum(-1) / math.sqrt(5)
            torch.testing.assert_close(scores[:, :, i, b], ref.float(), rtol=1e-6, atol=1e-6)
        assert keep[:, :, i, j].all() and keep[:, :, i].sum(-1).max() <= 3


def test_learned_gate_cached_generation_matches_recompute() -> None:
    student = _student(_teacher(), "learned_gate", {"block_size": 4, "top_k": 2})
    idx = torch.randint(0, V, (2, 9))
    a = student.generate(idx, 20, temperature=0.0, use_cache=True)
    b = student.generate(idx, 20, temperature=0.0, use_cache=False)
    assert torch.equal(a, b)


GATE_DECODING = [({}, {"block_size": 4, "top_k": 2}),
                 ({"n_kv_heads": 2, "position": "rope"}, {"block_size": 4, "top_k": 3}),
                 ({}, {"block_size": 4, "select": "threshold", "threshold": 0.2}),
                 ({}, {"block_size": 4, "select": "sparsemax"})]


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize(("model", "options"), GATE_DECODING)
def test_learned_gate_decoding_steps_equal_the_full_forward(model: dict, options: dict, static: bool) -> None:
    """Cached one-token steps (the KV-block-skipping path: gathered kept blocks, choice kept per query block) give
    the uncached forward's logits at every position, from a prompt that ends inside a block."""
    student = _student(_teacher(**model), "learned_gate", options)
    x = torch.randint(0, V, (2, 30))
    prompt = 7
    with torch.no_grad():
        full = student(x)
        cache = student.new_cache(2, static=static, max_len=30)
        steps = [student(x[:, :prompt], cache=cache)[:, -1]]
        steps += [student(x[:, t:t + 1], cache=cache)[:, -1] for t in range(prompt, 29)]
    # float32 logits of two layers: the gathered keys change only the summation order of the softmax
    torch.testing.assert_close(torch.stack(steps, 1), full[:, prompt - 1:29], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("model", "options"), [c for c in GATE_DECODING if c[1].get("select", "topk") == "topk"])
def test_learned_gate_graph_steps_equal_the_full_forward(model: dict, options: dict) -> None:
    """Steps at tensor positions over a static cache (what the compiled CUDA-graph decoder runs: fixed shapes, the
    choice recomputed each step from the pooled-summary buffer) give the uncached forward's logits at every position,
    from a prompt that ends inside a block and one shorter than top_k blocks (the pool then comes from the dense
    prefill)."""
    student = _student(_teacher(**model), "learned_gate", options)
    x = torch.randint(0, V, (2, 30))
    with torch.no_grad():
        full = student(x)
        for prompt in (3, 7):
            cache = student.new_cache(2, static=True, max_len=30)
            steps = [student(x[:, :prompt], cache=cache)[:, -1]]
            steps += [student(x[:, t:t + 1], cache=cache, pos=torch.tensor([t]))[:, -1] for t in range(prompt, 29)]
            torch.testing.assert_close(torch.stack(steps, 1), full[:, prompt - 1:29], rtol=1e-5, atol=1e-5)


def test_learned_gate_pool_lives_in_the_per_block_store_and_survives_a_crop() -> None:
    """The pooled key summaries sit in the static cache's per-block store: ``bytes_per_token`` counts one
    ``(B, Hkv, block, 2 Dh)`` row per ``block_size`` slots (not per slot), and after a crop back into the prompt the
    graph steps still give the uncached forward's logits (the crop keeps the summaries; steps rewrite their block)."""
    bs = 4
    student = _student(_teacher(), "learned_gate", {"block_size": bs, "top_k": 2})
    x = torch.randint(0, V, (2, 30))
    with torch.no_grad():
        full = student(x)
        cache = student.new_cache(2, static=True, max_len=32)
        student(x[:, :20], cache=cache)
        n_layer, hkv, dh = len(cache.keys), cache.keys[0].shape[1], cache.keys[0].shape[-1]
        assert {name for _, name in cache.blocks} == {"gate_pool"} and len(cache.blocks) == n_layer
        assert all(name != "gate_pool" for _, name in cache.tensors)
        per_slot = sum(t[0].numel() / 32 for t in cache.tensors.values()) + n_layer * 2 * hkv * dh   # one row
        assert cache.bytes_per_token() == pytest.approx((per_slot + n_layer * hkv * 2 * dh / bs) * 4, rel=1e-12)
        cache.crop(9)
        steps = [student(x[:, t:t + 1], cache=cache, pos=torch.tensor([t]))[:, -1] for t in range(9, 29)]
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 9:29], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", [None, "decode", "flex"])
def test_learned_gate_graph_steps_read_only_chosen_blocks(backend) -> None:
    """At a tensor position the step reads only the chosen blocks: poison in every other block of the static cache
    leaves its logits unchanged, and they equal the uncached forward's, with the model's attention over the gathered
    blocks, the decode attention (``use_backend``, as ``generate(decode_backend="decode")``) or FlexAttention over the
    cache with the chosen blocks as its BlockMask (poison 1e4 there, not NaN: eager flex on the CPU is a dense
    reference, 0 x NaN = NaN); padding, other selections and a growing cache fail with one line."""
    from modformer.layers.attention.kernels import use_backend

    bs = 4
    student = _student(_teacher(), "learned_gate", {"block_size": bs, "top_k": 2})
    x = torch.randint(0, V, (1, 27))
    outs = []
    for poison in (False, True):
        cache = student.new_cache(1, static=True, max_len=27)
        with torch.no_grad():
            student(x[:, :25], cache=cache)
            ref = student(x[:, :26])                                   # which blocks the dense path keeps at 25
            if poison:
                for i, block in enumerate(student.blocks):
                    kept = block.attn.last_keep[0, :, 6].any(0)              # query block 6, (nk,) kept by a head
                    for b in range(6):
                        if not kept[b]:
                            cache.keys[i][:, :, b * bs:(b + 1) * bs] = 1e4 if backend == "flex" else float("nan")
                            cache.values[i][:, :, b * bs:(b + 1) * bs] = -1e4 if backend == "flex" else float("nan")
            with use_backend(backend):
                outs.append(student(x[:, 25:26], cache=cache, pos=torch.tensor([25])))
    assert outs[1].isfinite().all()
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    torch.testing.assert_close(outs[0][:, -1], ref[:, -1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="static cache"):
        student(x[:, :1], cache=student.new_cache(1), pos=torch.tensor([0]))


@pytest.mark.parametrize("decode_backend", [None, "decode", "flex"])
def test_learned_gate_compiled_generation_equals_the_uncached_tokens(monkeypatch, decode_backend) -> None:
    """``generate(compile=True)`` (the GraphDecoder: eager prefill, then steps at tensor positions) decodes a
    learned-gate model to the uncached path's greedy tokens, with the model's attention over the gathered blocks and
    with the decode attention's multiply-and-sum (torch.compile -> identity: seconds on a CPU)."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    student = _student(_teacher(), "learned_gate", {"block_size": 4, "top_k": 2})
    prompt = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(3))
    slow = student.generate(prompt, 20, temperature=0, use_cache=False)
    fast = student.generate(prompt, 20, temperature=0, compile=True, decode_backend=decode_backend)
    assert torch.equal(fast, slow)


def test_step_block_mask_visits_the_valid_chosen_blocks_and_the_current_one() -> None:
    """The step's BlockMask, as compiled kernels read it (block counts and indices, ``to_dense``): per head the valid
    top-k picks (full) and the current block (partial, up to the position), nothing else; its mask_mod agrees."""
    from modformer.layers.attention.gate import step_block_mask
    from modformer.layers.attention.kernels import dense_from_block_mask

    blocks = torch.tensor([[[2, 0, 7], [1, 6, 5]]])                    # top-k order: invalid picks (>= j) last
    ok = torch.tensor([[[True, True, False], [True, False, False]]])
    mask = step_block_mask(blocks, ok, torch.tensor(5), torch.tensor(22), cap=32, block_size=4)
    want = torch.zeros(1, 2, 1, 8, dtype=torch.int32)
    want[0, 0, 0, [0, 2, 5]] = 1
    want[0, 1, 0, [1, 5]] = 1
    assert torch.equal(mask.to_dense(), want)
    assert mask.full_kv_num_blocks.flatten().tolist() == [2, 1] and mask.kv_num_blocks.flatten().tolist() == [1, 1]
    keys = dense_from_block_mask(mask, 1, 32)[0, :, 0]                 # (H, 32) slots
    assert keys[0].nonzero().flatten().tolist() == [0, 1, 2, 3, 8, 9, 10, 11, 20, 21, 22]
    assert keys[1].nonzero().flatten().tolist() == [4, 5, 6, 7, 20, 21, 22]


def test_learned_gate_flex_decoding_compiled_by_inductor_equals_the_uncached_tokens() -> None:
    """``decode_backend="flex"`` through real Inductor (CPU): the step's BlockMask, built in the graph from the gate's
    top-k blocks and the position tensor, gives the uncached path's greedy tokens."""
    student = _student(_teacher("sdpa"), "learned_gate", {"block_size": 4, "top_k": 2})
    prompt = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(3))
    slow = student.generate(prompt, 20, temperature=0, use_cache=False)
    assert torch.equal(student.generate(prompt, 20, temperature=0, compile=True, decode_backend="flex"), slow)


def test_learned_gate_compiled_step_writes_its_cache_and_pool_in_place() -> None:
    """The gate's compiled step (real Inductor on the CPU) writes the K/V buffer and the pooled-summary store in
    place: its code allocates nothing of either's size (a whole-buffer copy per token is what made the compiled
    decoders slower than eager at batch 64 x 16k; ``test_compiled_step_writes_the_kv_cache_in_place`` for mha)."""
    import re

    from torch._inductor.utils import run_and_get_code

    student = _student(_teacher("sdpa"), "learned_gate", {"block_size": 4, "top_k": 2})
    prompt = torch.randint(0, V, (1, 9), generator=torch.Generator().manual_seed(6))
    student.generate(prompt, 4, temperature=0, compile=True)
    decoder = student._decoder
    torch._dynamo.reset()
    with torch.no_grad():                                                   # as generate runs it
        _, code = run_and_get_code(decoder.logits_fn, decoder.tok, decoder.pos)
    pool, _ = decoder.cache.blocks[(0, "gate_pool")]
    shapes = [str(tuple(decoder.cache.kv[0].shape)), str(tuple(pool.shape))]
    assert code and all(any(s in c for c in code) for s in shapes)          # both are inputs of the step
    for s in shapes:
        assert not any(re.search(r"empty_strided_\w+\(" + re.escape(s), c) for c in code), s


def test_learned_gate_decoding_never_reads_dropped_blocks() -> None:
    """After the block's first decoded token chose the kept blocks, the cache's dropped blocks are poisoned with NaN:
    the next step's logits do not change (the dense keep-mask path would multiply the NaN values by zero)."""
    bs = 4
    student = _student(_teacher(), "learned_gate", {"block_size": bs, "top_k": 2})
    x = torch.randint(0, V, (1, 27))
    outs = []
    for poison in (False, True):
        cache = student.new_cache(1)
        with torch.no_grad():
            student(x[:, :24], cache=cache)
            student(x[:, 24:25], cache=cache)                         # block 6's first token: the gate chooses
            for i, block in enumerate(student.blocks if poison else []):
                kept = block.attn.last_keep[0, :, 0].any(0)                  # (nk,) kept by some head
                dropped = [b for b in range(6) if not kept[b]]
                assert dropped, "top_k=2 of 6 past blocks must drop some"
                for b in dropped:
                    cache.keys[i][:, :, b * bs:(b + 1) * bs] = float("nan")
                    cache.values[i][:, :, b * bs:(b + 1) * bs] = float("nan")
            outs.append(student(x[:, 25:26], cache=cache))
    assert outs[1].isfinite().all()
    assert torch.equal(outs[0], outs[1])


def test_gate_loss_and_ste_give_gate_gradients() -> None:
    teacher = _teacher()
    for opts in ({"gate_loss": 1.0, "grad": "none"}, {"gate_loss": 0.0, "grad": "ste"}):
        student = _student(teacher, "learned_gate", {"block_size": 8, "top_k": 2, **opts}).train()
        logits = student(torch.randint(0, V, (2, T)))
        loss = logits.logsumexp(-1).mean() + (student.aux_loss if student.aux_loss is not None else 0)
        loss.backward()
        g = student.blocks[0].attn.gate_q.weight.grad
        assert g is not None and g.abs().sum() > 0, opts


@pytest.mark.parametrize("chunk", [None, 3 * 8 * 30])
def test_gate_target_block_mass_equals_a_float64_reference(chunk: int | None, monkeypatch) -> None:
    """The gate's training target, computed a few query blocks at a time (``chunk``: 24 rows of 30 keys per chunk,
    the last chunk short, T not a multiple of the block), equals the pooled float64 causal attention map."""
    from modformer.layers.attention import gate as gate_mod

    if chunk is not None:
        monkeypatch.setattr(gate_mod, "TARGET_CHUNK", chunk)
    student = _student(_teacher(), "learned_gate", {"block_size": 8, "top_k": 2})
    attn = student.blocks[0].attn
    B, H, T, Dh, bs = 2, 4, 30, 8, 8
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(B, H, T, Dh, generator=g), torch.randn(B, H, T, Dh, generator=g)
    s = (q.double() @ k.double().transpose(-2, -1)) / Dh ** 0.5
    probs = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    nb = -(-T // bs)
    block = torch.arange(T) // bs
    onehot = torch.nn.functional.one_hot(block, nb).double()                   # (T, nb)
    want = onehot.T @ probs @ onehot                                          # (B, H, nq, nk)
    torch.testing.assert_close(attn._block_mass(q, k).double(), want, atol=1e-5, rtol=1e-5)


def test_gate_loss_trains_only_the_gate() -> None:
    """The gate's own loss must not reach q/k/v (it would reshape the attention the student is distilled for)."""
    student = _student(_teacher(), "learned_gate", {"block_size": 8, "top_k": 2, "gate_loss": 1.0}).train()
    student(torch.randint(0, V, (2, T)))
    student.aux_loss.backward()
    attn = student.blocks[0].attn
    assert attn.gate_q.weight.grad.abs().sum() > 0
    assert attn.qkv.weight.grad is None or attn.qkv.weight.grad.abs().sum() == 0


def test_performer_approximates_softmax_attention() -> None:
    torch.manual_seed(0)
    B, H, L, Dh, m = 1, 2, 24, 8, 8192
    q, k, v = (torch.randn(B, H, L, Dh) * 0.5 for _ in range(3))
    w = orthogonal_features(m, Dh, torch.Generator().manual_seed(1))
    s = Dh ** -0.25
    approx = causal_linear_attention(positive_features(q * s, w, True), positive_features(k * s, w, False), v, 0, 5)
    exact, _ = eager_attention(q, k, v, AttnSpec(causal=True))
    assert (approx - exact).abs().max() < 0.1 and (approx - exact).abs().mean() < 0.01
    few = causal_linear_attention(positive_features(q * s, w[:16], True), positive_features(k * s, w[:16], False), v)
    assert (few - exact).abs().mean() > (approx - exact).abs().mean()   # more features, better estimate


def test_causal_linear_attention_chunking_and_offset() -> None:
    qf, kf = torch.rand(1, 2, 10, 6), torch.rand(1, 2, 10, 6)
    v = torch.randn(1, 2, 10, 3)
    naive = torch.einsum("bhim,bhjm->bhij", qf, kf).tril()
    ref = (naive @ v) / naive.sum(-1, keepdim=True)
    for chunk in (1, 3, 10):
        assert torch.allclose(causal_linear_attention(qf, kf, v, 0, chunk), ref, atol=1e-6)
    assert torch.allclose(causal_linear_attention(qf[:, :, 7:], kf, v, 7, 2), ref[:, :, 7:], atol=1e-6)


def test_sparsemax() -> None:
    z = torch.tensor([[1.0, 0.5, -2.0, float("-inf")], [float("-inf")] * 4])
    p = sparsemax(z)
    assert torch.allclose(p[0], torch.tensor([0.75, 0.25, 0.0, 0.0]))
    assert torch.equal(p[1], torch.zeros(4))


def test_metric_functions_on_hand_computed_cases() -> None:
    t = torch.tensor([[0.5, 0.5], [0.9, 0.1]]).log()
    s = torch.tensor([[0.25, 0.75], [0.9, 0.1]]).log()
    want = (0.5 * math.log(2) + 0.5 * math.log(0.5 / 0.75)) / 2
    assert fidelity.next_token_kl(t, s).item() == pytest.approx(want, rel=1e-5)
    assert fidelity.next_token_kl(t, s, mask=torch.tensor([False, True])).item() == pytest.approx(0.0, abs=1e-7)
    assert fidelity.next_token_kl(t, t).item() == pytest.approx(0.0, abs=1e-7)
    assert fidelity.top1_agreement(t, s) == 0.5                         # argmax ties resolve to index 0
    logits = torch.tensor([[[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]]])
    assert fidelity.accuracy(logits, torch.tensor([[0, 0, -100]])) == 0.5
    assert fidelity.ppl_retention(10.0, 20.0) == 0.5
    pt = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    ps = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert fidelity.attn_prob_mse(pt, ps) == pytest.approx(0.125)      # kept: (0,0) err 0, (1,0) err 0.25
    a = torch.nn.Linear(2, 2)
    assert fidelity.peak_memory(lambda: a(torch.ones(2)), torch.device("cpu")) is None


def test_grad_cosine_is_one_for_identical_models_and_edge_cases_are_finite() -> None:
    teacher = _teacher()
    student = _student(teacher, "sliding_window", {"window": 4})
    x = torch.randint(0, V, (2, T))
    assert fidelity.grad_cosine(teacher, _student(teacher, "mha", {}), x, x) == pytest.approx(1.0, abs=1e-5)
    assert fidelity.grad_cosine(teacher, student, x, x) < 1.0
    rows = fidelity.edge_cases(teacher, _student(teacher, "learned_gate", {"block_size": 8, "top_k": 2}), V, 40, 8)
    assert len(rows) == 3 and all(r["finite"] for r in rows)
    assert any(r["T"] % 8 for r in rows)


@pytest.fixture(scope="module")
def shakespeare() -> object:
    from modformer.data import build_dataset

    return build_dataset(DataConfig(name="shakespeare_char", seq_len=32))


def test_distill_freezes_other_params_and_lowers_kl(tmp_path: object, shakespeare: object) -> None:
    torch.manual_seed(0)
    teacher = mf.build_model(mf.ModelConfig(vocab_size=shakespeare.vocab_size, n_layer=2, d_model=32, n_head=4,
                                            max_seq_len=32, init_std=0.3)).eval()
    cfg = DistillConfig(name="d", out_dir=str(tmp_path), student={"attention": "sliding_window",
                                                                    "attention_options": {"window": 3}},
                        trainable=["blocks.*.attn", "blocks.1.mlp"], steps=30, batch_size=16, lr=3e-3,
                        eval_every=30, eval_batches=2, device="cpu", progress=False)
    d = Distiller(cfg, teacher=teacher, data=shakespeare)
    before = {n: p.detach().clone() for n, p in d.student.named_parameters()}
    summary = d.fit()
    changed = {n for n, p in d.student.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".attn." in n or n.startswith("blocks.1.mlp.") for n in changed)
    assert "blocks.1.mlp.up.weight" in changed and "blocks.0.mlp.up.weight" not in changed
    assert summary["final_val_kl"] < 0.7 * summary["before_kl"]
    rows = [json.loads(line) for line in (tmp_path / "d" / "metrics.jsonl").read_text().splitlines()]
    assert {"kl", "top1_agree", "ppl_retention"} <= set(rows[-1]) and rows[-1]["split"] == "val"


def test_distill_lr_schedule_warms_up_then_decays_to_min_lr(tmp_path: object, shakespeare: object) -> None:
    teacher = mf.build_model(mf.ModelConfig(vocab_size=shakespeare.vocab_size, n_layer=1, d_model=16, n_head=2,
                                            max_seq_len=32)).eval()
    cfg = DistillConfig(name="s", out_dir=str(tmp_path), student={"attention": "sliding_window",
                                                                    "attention_options": {"window": 3}},
                        steps=10, lr=1e-3, min_lr=1e-4, warmup_steps=2, schedule="cosine", device="cpu")
    d = Distiller(cfg, teacher=teacher, data=shakespeare)
    assert [d.lr_at(0), d.lr_at(1), d.lr_at(2)] == pytest.approx([5e-4, 1e-3, 1e-3])
    assert d.lr_at(6) == pytest.approx(1e-4 + 0.5 * 9e-4)           # half way through the decay
    assert d.lr_at(10) == pytest.approx(1e-4)
    const = Distiller(dataclasses.replace(cfg, name="c", schedule="constant"), teacher=teacher, data=shakespeare)
    assert const.lr_at(9) == pytest.approx(1e-3)


def test_cli_distill_on_a_tiny_config(tmp_path: object) -> None:
    from modformer.cli import main
    from modformer.runs import run_model

    teacher = mf.build_model(mf.ModelConfig(vocab_size=65, n_layer=1, d_model=16, n_head=2, max_seq_len=32))
    mf.save(teacher, tmp_path / "teacher")
    cfg = {"name": "gate", "out_dir": str(tmp_path / "runs"), "teacher": str(tmp_path / "teacher"),
           "student": {"attention": "learned_gate", "attention_options": {"block_size": 8, "top_k": 2}},
           "data": {"name": "shakespeare_char", "seq_len": 32}, "steps": 4, "batch_size": 4, "eval_every": 2,
           "eval_batches": 1, "device": "cpu", "progress": False}
    (tmp_path / "gate.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["distill", str(tmp_path / "gate.yaml"), "steps=3", "student.attention_options.top_k=3"]) == 0
    run = tmp_path / "runs" / "gate"
    student = run_model(run)
    assert student.cfg.attention == "learned_gate" and student.cfg.attention_options["top_k"] == 3
    assert json.loads((run / "summary.json").read_text())["steps"] == 3
    assert main(["distill", str(tmp_path / "gate.yaml"), "steps=oops"]) == 2


def test_gqa_student_and_fixed_kind_options_are_checked() -> None:
    teacher = _teacher(n_kv_heads=2)
    x = torch.randint(0, V, (1, T))
    for kind, opts in (("sliding_window", {"window": 5}), ("learned_gate", {"block_size": 8, "top_k": 2}),
                       ("performer", {"n_features": 16})):
        assert torch.isfinite(_student(teacher, kind, opts)(x)).all()
    with pytest.raises(mf.ConfigError):
        _student(teacher, "sliding_window", {"width": 5})
    with pytest.raises(mf.ConfigError):
        build_student(teacher, {"attention": "sliding_window", "attention_options": {"window": 0}})
    cfg = dataclasses.replace(teacher.cfg, attention="performer", position="alibi")
    with pytest.raises(mf.ConfigError):
        mf.build_model(cfg)


def test_flex_block_masks_match_the_dense_reference() -> None:
    """The BlockMasks the GPU path runs (fixed patterns, learned gate) keep exactly the dense reference's pairs."""
    from modformer.layers.attention.gate import block_mask_from_blocks
    from modformer.layers.attention.kernels import attend, dense_from_block_mask
    from modformer.layers.attention.sparse import pattern_block_mask

    pos = torch.arange(T)
    for kind, opts in FIXED.items():
        params = tuple(opts.values())
        bm = pattern_block_mask(kind, params, T, T, 0, "cpu", 16)
        want = PATTERNS[kind][0](pos[:, None], pos[None, :], *params)
        assert torch.equal(dense_from_block_mask(bm, T, T)[0, 0], want)
    student = _student(_teacher(), "learned_gate", {"block_size": 16, "top_k": 2})
    attn = student.blocks[0].attn
    student(torch.randint(0, V, (2, T)))
    keep, qb = attn.last_keep, torch.arange(attn.last_keep.shape[2])
    bm = block_mask_from_blocks(keep, qb, T, T, 16)
    want = attn._dense_keep(keep, qb, 0, T, T)
    assert torch.equal(dense_from_block_mask(bm, T, T), want)
    q, k, v = (torch.randn(2, 4, T, 8) for _ in range(3))
    flex, _ = attend(q, k, v, AttnSpec(block_mask=bm), "flex")
    ref, _ = eager_attention(q, k, v, AttnSpec(keep=want))
    assert torch.allclose(flex, ref, atol=1e-5)


@pytest.mark.parametrize("offset_blocks", [0, 3])
def test_gate_block_mask_backward_indices_equal_torchs_transpose(offset_blocks: int) -> None:
    """The gate's BlockMask builds its backward (query-block) indices itself: they equal the ones
    BlockMask.from_kv_blocks derives from the same forward indices, for a prefill and a later chunk of queries."""
    from torch.nn.attention.flex_attention import BlockMask

    from modformer.layers.attention.gate import block_mask_from_blocks, block_mask_tensors

    nq, nk = 5, 5 + offset_blocks
    qb = torch.arange(offset_blocks, nk)
    g = torch.Generator().manual_seed(offset_blocks)
    causal = torch.arange(nk)[None, :] <= qb[:, None]
    keep = (torch.rand(2, 3, nq, nk, generator=g) < 0.5) & causal
    keep |= torch.arange(nk)[None, :] == qb[:, None]
    parts = block_mask_tensors(keep, qb)
    ref = BlockMask.from_kv_blocks(parts["kv_num_blocks"], parts["kv_indices"], parts["full_kv_num_blocks"],
                                   parts["full_kv_indices"], BLOCK_SIZE=16)
    for name in ("q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"):
        assert torch.equal(parts[name], getattr(ref, name)), name
    bm = block_mask_from_blocks(keep, qb, nq * 16, nk * 16, 16, first_block=offset_blocks)
    assert torch.equal(bm.q_indices, ref.q_indices) and torch.equal(bm.full_kv_indices, ref.full_kv_indices)


def test_timing_masks_keep_their_layouts() -> None:
    """The attention-speed masks: the student layout (4 sinks + window) keeps exactly its pairs, and the
    synthetic ~10% layouts keep every diagonal block and no future block."""
    from modformer.layers.attention.kernels import dense_from_block_mask

    t, block = 1024, 16
    masks = fidelity.sparse_block_masks(t, 0.1, block, "cpu", student_windows=(40,))
    pos = torch.arange(t)
    want = PATTERNS["sink_window"][0](pos[:, None], pos[None, :], 4, 40)
    assert torch.equal(dense_from_block_mask(masks["sink4_window40"], t, t)[0, 0], want)
    for name in ("sink_window", "learned_gate_topk"):
        blocks = masks[name].to_dense()[0, 0].bool()
        nb = blocks.shape[-1]
        assert blocks.diagonal().all() and not blocks.triu(1).any()
        assert 0.05 < blocks.sum().item() / (nb * (nb + 1) / 2) < 0.2
