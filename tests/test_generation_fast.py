"""The compiled decoder's loop (GraphDecoder): multi-step graphs, options, kernel counting, and the generation bench.

torch.compile is replaced by the identity here: what is tested is the decoder's bookkeeping (static cache written
in place at tensor positions, chunks of ``graph_steps`` steps, EOS checks between chunks), which is the same code
with or without Inductor; ``tests/test_model.py`` covers the compiled forward itself.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

import modformer as mf
from modformer.models.generation import COMPILE_PRESETS, GraphDecoder


def tiny_gpt(std: float = 0.5, **kw: object) -> torch.nn.Module:
    """A small GPT-2-like model whose weights are wide enough that greedy text varies (not one repeated token)."""
    torch.manual_seed(0)
    cfg = dict(vocab_size=37, n_layer=2, d_model=32, n_head=4, max_seq_len=64, position="learned", bias=True,
               ffn="gelu_tanh")
    model = mf.build_model(mf.ModelConfig(**{**cfg, **kw})).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, std)
    return model


@pytest.fixture
def no_inductor(monkeypatch):
    """torch.compile -> identity (seconds instead of minutes on a shared CPU)."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)


@pytest.mark.parametrize("graph_steps", [1, 3, 7])
def test_fast_path_greedy_tokens_equal_the_uncached_path(no_inductor, graph_steps):
    """The decoder's tokens equal the uncached path's (which re-runs the whole context per token) for every chunk
    size, including ones that do not divide the step count (19 steps after the prefill's token)."""
    model = tiny_gpt()
    prompt = torch.randint(0, 37, (2, 5), generator=torch.Generator().manual_seed(1))
    slow = model.generate(prompt, 20, temperature=0, use_cache=False)
    assert len(set(slow[0, 5:].tolist())) > 3                       # the text varies: positions matter
    fast = model.generate(prompt, 20, temperature=0, compile=True, graph_steps=graph_steps)
    assert torch.equal(fast, slow)
    assert model._decoder.graph_steps == graph_steps


def test_decode_step_logits_equal_the_full_forward(no_inductor):
    """Cache consistency: each step's logits (static cache, position as a tensor) equal the uncached forward's
    last-position logits on the same context, within float32 rounding of a 2-layer model."""
    model = tiny_gpt()
    ids = torch.randint(0, 37, (1, 12), generator=torch.Generator().manual_seed(2))
    dec = GraphDecoder(model, 1, 12, torch.device("cpu"))
    dec.run(ids[:, :4], 1, dict(temperature=0, top_k=None, top_p=None), None, None)   # prefill 4 tokens
    for t in range(4, 12):
        dec.tok.copy_(ids[:, t:t + 1])
        dec.pos.fill_(t)
        step = dec.logits_fn(dec.tok, dec.pos)
        full = model(ids[:, :t + 1])[:, -1]
        torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-5)


def test_multi_step_graph_stops_at_eos_like_the_eager_loop(no_inductor, monkeypatch):
    """With EOS and chunks of 3 steps (checks every 4 steps fall inside chunks) the output equals the eager loop's."""
    monkeypatch.setattr(GraphDecoder, "check_every", 4)
    model = tiny_gpt()
    prompt = torch.randint(0, 37, (3, 4), generator=torch.Generator().manual_seed(3))
    eos = int(model.generate(prompt, 9, temperature=0)[0, -1])
    eager = model.generate(prompt, 40, temperature=0, eos_token_id=eos)
    assert torch.equal(model.generate(prompt, 40, temperature=0, eos_token_id=eos, compile=True, graph_steps=3),
                       eager)


@pytest.mark.parametrize("n", [1, 2])
def test_shortest_generations(no_inductor, n):
    """One or two new tokens: no step (or one) after the prefill; nothing is written past the buffers."""
    model = tiny_gpt()
    prompt = torch.randint(0, 37, (1, 3), generator=torch.Generator().manual_seed(4))
    assert torch.equal(model.generate(prompt, n, temperature=0, compile=True, graph_steps=4),
                       model.generate(prompt, n, temperature=0, use_cache=False))


def test_compile_preset_is_passed_to_torch_compile_and_keys_the_decoder(monkeypatch):
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(kw.get("options")) or fn)
    model = tiny_gpt()
    prompt = torch.randint(0, 37, (1, 3))
    model.generate(prompt, 4, temperature=0, compile=True)
    model.generate(prompt, 4, temperature=0, compile=True)              # same key: the decoder is reused
    model.generate(prompt, 4, temperature=0, compile="max-autotune")   # another preset: rebuilt
    assert seen == [None, COMPILE_PRESETS["max-autotune"]]
    for name in ("max-autotune", "coordinate-descent"):                     # our own graph wraps the step
        assert COMPILE_PRESETS[name]["triton.cudagraphs"] is False


@pytest.mark.parametrize("kw, match", [
    (dict(compile="fast"), "compile must be True, False or one of default, max-autotune"),
    (dict(compile=True, graph_steps=0), "graph_steps must be an integer >= 1"),
    (dict(compile=True, graph_steps=True), "graph_steps must be an integer >= 1"),
    (dict(compile=1.5), "compile must be"),
])
def test_bad_decoder_options_are_one_clear_error(kw, match):
    model = tiny_gpt()
    with pytest.raises(ValueError, match=match):
        model.generate(torch.zeros(1, 2, dtype=torch.long), 3, temperature=0, **kw)


def test_kernel_count_is_none_off_cuda(no_inductor):
    model = tiny_gpt()
    model.generate(torch.zeros(1, 2, dtype=torch.long), 3, temperature=0, compile=True)
    assert model._decoder.kernels_per_step() is None


def test_generation_bench_runs_end_to_end_on_cpu(tmp_path, capsys):
    """`modformer bench generation --preset tiny`: the issue's headline keys, the fp32 identity check on both
    weight sets, and agreement with the uncached path (CPU: no compile, no kernel count)."""
    from modformer.bench import generation

    assert generation.main(["--preset", "tiny", "--new-tokens", "12", "--prompt-len", "4", "--repeats", "1",
                            "--decoders", "graph", "graph16", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "generation.json").read_text())
    head = result["headline"]
    for key in ("tokens_per_s_batch1", "speedup_vs_hf_static", "kernels_per_token", "kernel_us_per_token",
                "greedy_match"):
        assert key in head
    assert head["greedy_match"] == 1.0 and head["kernels_per_token"] is None and head["goal_met"] is None
    assert head["tokens_per_s_batch1"] > 0 and head["speedup_vs_hf_static"] > 0
    assert result["fp32_check"]["diverse_weights"]["distinct_tokens"] > 1
    rows = {r["variant"]: r for r in result["rows"]}
    assert all(r["agreement_vs_no_cache"] == 1.0 for r in rows.values())
    assert "HF generate (static cache)" in rows and "tokens_per_s_batch1" in capsys.readouterr().out


def test_decode_backend_runs_the_decode_steps_only_and_keeps_the_tokens(no_inductor, monkeypatch):
    """``decode_backend="eager"``: every decode step's attention goes through the eager backend, the prefill
    keeps the model's sdpa, and a left-padded batch gives the same greedy tokens as the default decoder."""
    from modformer import registry
    from modformer.layers.attention import kernels
    from modformer.models.generation import left_pad

    model = tiny_gpt()
    idx, mask = left_pad([[3, 4, 5, 6, 7, 8], [9, 10], [11, 12, 13]], pad_id=0)
    default = model.generate(idx, 12, temperature=0, compile=True, attention_mask=mask)
    calls: list[int] = []
    eager = registry.get("attn_backend", "eager")
    monkeypatch.setitem(registry._REGISTRIES["attn_backend"], "eager",
                        lambda q, *a, **k: (calls.append(q.shape[2]), eager(q, *a, **k))[1])
    out = model.generate(idx, 12, temperature=0, compile=True, attention_mask=mask, decode_backend="eager")
    assert torch.equal(out, default)
    assert calls and set(calls) == {1}                               # single-query decode steps only
    assert len(calls) >= 11 * model.cfg.n_layer
    assert kernels._backend_override is None                         # nothing leaks out of the decoder
    with pytest.raises(Exception, match="nope"):
        model.generate(idx, 2, temperature=0, compile=True, decode_backend="nope")
    with pytest.raises(ValueError, match="pass compile=True"):
        model.generate(idx, 2, temperature=0, decode_backend="eager")


def test_decode_backend_decode_takes_the_single_query_steps_and_keeps_the_tokens(no_inductor, monkeypatch):
    """``decode_backend="decode"``: every decode step's attention goes through its multiply-and-sum path (single
    queries only) and the greedy tokens of a left-padded batch equal the uncached path's."""
    from modformer import registry
    from modformer.models.generation import left_pad

    model = tiny_gpt()
    idx, mask = left_pad([[3, 4, 5, 6, 7, 8], [9, 10], [11, 12, 13]], pad_id=0)
    calls: list[int] = []
    real = registry.get("attn_backend", "decode")
    monkeypatch.setitem(registry._REGISTRIES["attn_backend"], "decode",
                        lambda q, *a, **k: (calls.append(q.shape[2]), real(q, *a, **k))[1])
    out = model.generate(idx, 8, temperature=0, compile=True, attention_mask=mask, decode_backend="decode")
    assert torch.equal(out, model.generate(idx, 8, temperature=0, use_cache=False, attention_mask=mask))
    assert set(calls) == {1} and len(calls) >= 7 * model.cfg.n_layer


def test_decode_backend_flex_builds_one_decode_mask_per_step_and_keeps_the_tokens(no_inductor, monkeypatch):
    """``decode_backend="flex"``: each unpadded decode step builds one position-tensor BlockMask shared by every
    layer (``decode_block_mask``) and decodes the uncached path's greedy tokens; a left-padded batch (a per-row
    mask) keeps the dense path and its tokens too."""
    from modformer.layers.attention import kernels
    from modformer.models.generation import left_pad

    model = tiny_gpt()
    built: list[int] = []
    real = kernels.decode_block_mask
    monkeypatch.setattr(kernels, "decode_block_mask", lambda spec, tk, *a, **k: (built.append(tk),
                                                                                 real(spec, tk, *a, **k))[1])
    idx = torch.tensor([[3, 4, 5, 6, 7, 8]])
    out = model.generate(idx, 12, temperature=0, compile=True, decode_backend="flex")
    assert torch.equal(out, model.generate(idx, 12, temperature=0, use_cache=False))
    assert len(built) >= 11 and set(built) == {18}                 # one per step (not per layer), whole cache
    built.clear()
    idx, mask = left_pad([[3, 4, 5, 6, 7, 8], [9, 10], [11, 12, 13]], pad_id=0)
    out = model.generate(idx, 8, temperature=0, compile=True, attention_mask=mask, decode_backend="flex")
    assert torch.equal(out, model.generate(idx, 8, temperature=0, use_cache=False, attention_mask=mask))
    assert not built


def test_decode_backend_flex_compiled_by_inductor_keeps_the_tokens():
    """The flex decode step through real Inductor (CPU): the BlockMask built from the position tensor inside the
    compiled graph gives the uncached path's greedy tokens at every step, across a 128-slot key block."""
    model = tiny_gpt(max_seq_len=160)
    prompt = torch.randint(0, 37, (1, 120), generator=torch.Generator().manual_seed(4))
    slow = model.generate(prompt, 20, temperature=0, use_cache=False)
    assert torch.equal(model.generate(prompt, 20, temperature=0, compile=True, decode_backend="flex"), slow)


def test_decode_linear_matvec_takes_the_step_linears_and_keeps_the_tokens(no_inductor, monkeypatch):
    """``decode_linear="matvec"``: the decode steps' linears (one row each) run as ``matvec``, the prefill's
    (several rows) as F.linear, and the greedy tokens equal the uncached path's; bad values fail with one line."""
    from modformer.layers import matvec as mv

    model = tiny_gpt()
    idx = torch.tensor([[3, 4, 5, 6, 7, 8]])
    rows: list[int] = []
    real = mv.matvec
    monkeypatch.setattr(mv, "matvec", lambda x, *a: (rows.append(x.numel() // x.shape[-1]), real(x, *a))[1])
    out = model.generate(idx, 10, temperature=0, compile=True, decode_linear="matvec")
    assert torch.equal(out, model.generate(idx, 10, temperature=0, use_cache=False))
    per_step = 4 * model.cfg.n_layer + 1                                # qkv, out, fc, proj per block + head
    assert set(rows) == {1} and len(rows) >= 9 * per_step
    with pytest.raises(ValueError, match="decode_linear must be one of"):
        model.generate(idx, 2, temperature=0, compile=True, decode_linear="gemv")
    with pytest.raises(ValueError, match="pass compile=True"):
        model.generate(idx, 2, temperature=0, decode_linear="matvec")


@pytest.mark.parametrize("buckets", [2, 3, 5])
def test_bucketed_prefill_fills_the_cache_as_the_whole_batch_and_keeps_the_tokens(no_inductor, buckets):
    """``prefill_buckets``: groups of rows prefilled at their own width give the whole-batch prefill's cache (keys,
    values at every real slot, padding mask, length) and logits to float32 rounding, and the same greedy tokens."""
    from modformer.models.generation import bucketed_prefill, left_pad

    model = tiny_gpt()
    prompts = [[3, 4, 5, 6, 7, 8, 9, 10, 11], [9, 10], [11, 12, 13], [5] * 7, [1, 2, 3, 4], [30]]
    idx, mask = left_pad(prompts, pad_id=0)
    B, P = idx.shape
    whole = model.new_cache(B, static=True, max_len=P + 4)
    ref = model(idx, cache=whole, last_only=True, attention_mask=mask)[:, -1]
    parts = model.new_cache(B, static=True, max_len=P + 4)
    got = bucketed_prefill(model, parts, idx, mask, buckets)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    real = mask.bool()
    for layer in range(model.cfg.n_layer):
        for a, b in ((whole.keys[layer], parts.keys[layer]), (whole.values[layer], parts.values[layer])):
            torch.testing.assert_close(b.transpose(1, 2)[:, :P][real], a.transpose(1, 2)[:, :P][real],
                                       rtol=1e-5, atol=1e-5)
    assert torch.equal(parts.masks["valid"][:, :P], whole.masks["valid"][:, :P]) and parts.length == whole.length
    default = model.generate(idx, 10, temperature=0, compile=True, attention_mask=mask)
    out = model.generate(idx, 10, temperature=0, compile=True, attention_mask=mask, prefill_buckets=buckets)
    assert torch.equal(out, default)


def test_bucketed_prefill_refuses_what_it_cannot_do(no_inductor):
    from modformer.models.generation import left_pad

    idx, mask = left_pad([[3, 4, 5], [6]], pad_id=0)
    with pytest.raises(ValueError, match="pass compile=True"):
        tiny_gpt().generate(idx, 2, temperature=0, attention_mask=mask, prefill_buckets=2)
    with pytest.raises(ValueError, match="prefill_buckets must be an integer >= 1"):
        tiny_gpt().generate(idx, 2, temperature=0, compile=True, attention_mask=mask, prefill_buckets=0)
    with pytest.raises(ValueError, match="needs left padding"):
        tiny_gpt().generate(idx, 2, temperature=0, compile=True, attention_mask=mask.flip(1), prefill_buckets=2)
    mla = tiny_gpt(attention="mla")
    with pytest.raises(ValueError, match="caches keys and values only"):
        mla.generate(idx, 2, temperature=0, compile=True, attention_mask=mask, prefill_buckets=2)


@pytest.mark.parametrize("decode_linear", [None, "matvec"])
def test_uncaptured_steps_reuse_the_compiled_step_outside_no_grad(decode_linear):
    """What ``profile_step`` times: direct steps of the warm compiled forward, called outside ``no_grad`` (as the
    bench does), run the same compiled code without a retrace and put ``pos`` back."""
    model = tiny_gpt()
    prompt = torch.randint(0, 37, (1, 3), generator=torch.Generator().manual_seed(5))
    model.generate(prompt, 8, temperature=0, compile=True, decode_linear=decode_linear)
    decoder = model._decoder
    pos = int(decoder.pos)
    with torch._dynamo.config.patch(error_on_recompile=True):
        decoder.uncaptured_steps(3)
    assert int(decoder.pos) == pos


def test_compiled_step_writes_the_kv_cache_in_place():
    """The compiled step writes a layer's K/V buffer in place: Inductor's code allocates nothing of the buffer's
    size (a step that copied the whole cache each token made compiled decoding at batch 64 x 16k 3x slower than
    eager). Aliased inputs caused it: the cache must hand the step only the one buffer, not its views too."""
    from torch._inductor.utils import run_and_get_code

    model = tiny_gpt(n_layer=1)
    prompt = torch.randint(0, 37, (1, 3), generator=torch.Generator().manual_seed(6))
    model.generate(prompt, 4, temperature=0, compile=True)
    decoder = model._decoder
    torch._dynamo.reset()
    with torch.no_grad():                                                   # as generate runs it
        _, code = run_and_get_code(decoder.logits_fn, decoder.tok, decoder.pos)
    shape = str(tuple(decoder.cache.kv[0].shape))
    assert code and any(shape in c for c in code)                          # the buffer is an input of the step
    assert not any(re.search(r"empty_strided_\w+\(" + re.escape(shape), c) for c in code)
