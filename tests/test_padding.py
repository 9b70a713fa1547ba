"""Padding masks and packed documents (issue 23): a sequence's logits do not depend on how it is batched.

Every attention kind x backend x position: logits of a sequence alone equal its rows in a left- and a
right-padded batch (fp32: the same sums in another order, |diff| ~1e-7 on logits of size ~1, so 1e-5);
padding queries give no NaN; documents packed into one row equal the documents run separately; causality
holds with a mask; the unmasked path still calls SDPA with ``is_causal=True``; hook points still work.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import modformer as mf
from modformer.layers.attention.masks import document_ids, row_positions
from modformer.registry import ConfigError

V = 29
pytestmark = pytest.mark.usefixtures("one_thread")

# attention kind -> (config overrides); patterns are short so that they are sparse at these lengths
KINDS = {
    "mha": {},
    "gqa": dict(n_kv_heads=2),
    "mqa": {},
    "mla": dict(attention_options={"kv_lora_rank": 12}),
    "moa": {},
    "talking_heads": dict(n_kv_heads=2),
    "multichannel": dict(attn_only=True),
    "sliding_window": dict(attention_options={"window": 3}),
    "block_local": dict(attention_options={"block": 4}),
    "sink_window": dict(attention_options={"sinks": 2, "window": 3}),
    "strided": dict(attention_options={"window": 2, "stride": 3}),
    "dilated": dict(attention_options={"window": 2, "dilation": 2}),
    "learned_gate": dict(attention_options={"block_size": 2, "top_k": 2}),
    "performer": dict(attention_options={"n_features": 16, "chunk": 4}),
}
BACKENDS = ["sdpa", "eager", "flex"]
POSITIONS = ["learned", "rope", "alibi", "sinusoidal", "none", "shortformer"]
TOL = dict(atol=1e-5, rtol=1e-5)


def build(kind: str, backend: str = "sdpa", position: str = "rope", **kw) -> torch.nn.Module:
    cfg = dict(vocab_size=V, n_layer=2, d_model=32, n_head=4, max_seq_len=32, attention=kind,
               attn_backend=backend, position=position)
    cfg.update(KINDS[kind])
    cfg.update(kw)
    try:
        model = mf.build_model(mf.ModelConfig(**cfg)).eval()
    except ConfigError as e:
        pytest.skip(f"combination not supported by design: {e}")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():                     # move identity-initialised maps (talking heads) off their init
        for name, p in model.named_parameters():
            if "mix_" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model


def seqs(*lengths: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (n,), generator=g) for n in lengths]


def pad(rows: list[torch.Tensor], side: str, value: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and 0/1 attention mask, padded on ``side``."""
    T = max(len(r) for r in rows)
    idx = torch.full((len(rows), T), value, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(T - len(r), T) if side == "left" else slice(0, len(r))
        idx[i, sl], mask[i, sl] = r, 1
    return idx, mask


def real(out: torch.Tensor, i: int, n: int, side: str) -> torch.Tensor:
    T = out.shape[1]
    return out[i, T - n:] if side == "left" else out[i, :n]


# every kind x backend with learned (absolute) positions; every position x backend with mha and with
# sink_window (whose sinks are absolute positions)
CASES = [(k, b, "learned") for k in KINDS for b in BACKENDS] + \
        [(k, b, p) for k in ("mha", "sink_window") for b in BACKENDS for p in POSITIONS if p != "learned"]


@pytest.mark.parametrize("kind,backend,position", CASES)
def test_padding_invariance(kind, backend, position):
    model = build(kind, backend, position)
    rows = seqs(5, 11, 8)
    with torch.no_grad():
        alone = [model(r[None])[0] for r in rows]
        for side in ("left", "right"):
            idx, mask = pad(rows, side, value=3)
            out = model(idx, attention_mask=mask)
            assert torch.isfinite(out).all()
            for i, r in enumerate(rows):
                torch.testing.assert_close(real(out, i, len(r), side), alone[i], **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", list(KINDS))
def test_documents_equal_separate_runs(kind, backend):
    """Three documents packed in one row (and a padded second row) = each document run alone."""
    model = build(kind, backend, "learned")
    eos = 0
    docs = [torch.cat([torch.tensor([eos]), d.clamp_min(1)]) for d in seqs(4, 6, 5, seed=2)]
    row = torch.cat(docs)
    other = torch.cat([docs[2], docs[0]])
    idx, mask = pad([row, other], "right", value=eos)
    doc = document_ids(idx, eos)
    with torch.no_grad():
        out = model(idx, attention_mask=mask, document_ids=doc)
        start = 0
        for d in docs:
            torch.testing.assert_close(out[0, start:start + len(d)], model(d[None])[0], **TOL)
            start += len(d)
        torch.testing.assert_close(out[1, len(docs[2]):len(other)], model(docs[0][None])[0], **TOL)


def test_row_positions_and_document_ids():
    valid = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    assert row_positions(valid).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]
    idx = torch.tensor([[5, 0, 3, 4, 0, 7]])
    doc = document_ids(idx, 0)
    assert doc.tolist() == [[0, 1, 1, 1, 2, 2]]
    assert row_positions(torch.ones_like(idx, dtype=torch.bool), doc).tolist() == [[0, 0, 1, 2, 0, 1]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_causality_with_mask(backend):
    model = build("mha", backend, "rope")
    idx, mask = pad(seqs(6, 10), "left")
    changed = idx.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % V
    with torch.no_grad():
        a, b = model(idx, attention_mask=mask), model(changed, attention_mask=mask)
    torch.testing.assert_close(a[:, :7], b[:, :7], atol=0, rtol=0)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_unmasked_path_calls_sdpa_causal(monkeypatch):
    """No attention_mask: every layer still calls SDPA with is_causal=True and no mask (the fast path)."""
    calls = []
    real_sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, **kw):
        calls.append((attn_mask is None, is_causal))
        return real_sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = build("mha", "sdpa", "rope")
    with torch.no_grad():
        model(torch.randint(0, V, (2, 9)))
    assert calls == [(True, True)] * 2
    calls.clear()
    idx, mask = pad(seqs(4, 9), "left")
    with torch.no_grad():
        model(idx, attention_mask=mask)
    assert calls == [(False, False)] * 2                                # padded: an explicit mask instead


def test_hooks_with_mask():
    """run_with_cache under a mask: the pattern gives padding keys 0 and the logits do not change."""
    model = build("mha", "sdpa", "rope")
    idx, mask = pad(seqs(4, 9), "left")
    with torch.no_grad():
        plain = model(idx, attention_mask=mask)
        logits, cache = model.run_with_cache(idx, attention_mask=mask)
    torch.testing.assert_close(logits, plain, **TOL)
    pattern = cache["blocks.0.attn.hook_pattern"]                       # (B, H, T, T)
    assert pattern[0, :, 5:, :5].abs().max() == 0                        # row 0 has 5 padding slots
    torch.testing.assert_close(pattern[0, :, 5:].sum(-1), torch.ones(4, 4))
    alone = model.run_with_cache(idx[:1, 5:])[1]["blocks.0.attn.hook_pattern"]
    torch.testing.assert_close(pattern[0, :, 5:, 5:], alone[0], **TOL)


def test_loss_ignores_padding():
    model = build("mha", "sdpa", "learned")
    rows = seqs(5, 9)
    idx, mask = pad(rows, "right")
    targets = torch.roll(idx, -1, 1)
    loss = model.loss(idx, targets, attention_mask=mask)
    logits = model(idx, attention_mask=mask)
    keep = mask.bool()
    ref = F.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(loss, ref)
    model.train()
    idx, mask = pad(rows, "left")                       # padding queries in front: gradients stay finite
    model.loss(idx, torch.roll(idx, -1, 1), attention_mask=mask).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_hf_style_full_length_mask_with_cache():
    """attention_mask may also cover the cached tokens (B, cached + T), as HF's generate passes it."""
    model = build("mha", "sdpa", "rope")
    idx, mask = pad(seqs(3, 6, seed=9), "left")
    nxt = torch.randint(0, V, (2, 1))
    with torch.no_grad():
        ref = model(torch.cat([idx, nxt], 1), attention_mask=F.pad(mask, (0, 1), value=1))[:, -1]
        cache = model.new_cache(2)
        model(idx, cache=cache, attention_mask=mask)
        out = model(nxt, cache=cache, attention_mask=F.pad(mask, (0, 1), value=1))[:, -1]
    torch.testing.assert_close(out, ref, **TOL)
    with pytest.raises(ValueError, match="attention_mask must be"):
        model(idx, attention_mask=mask[:, :3])
    with pytest.raises(ValueError, match="not with a KV cache"):
        model(idx, cache=model.new_cache(2), document_ids=torch.zeros_like(idx))


GEN_MODES = {"no_cache": dict(use_cache=False), "dynamic": {}, "static": dict(static_cache=True),
             "compile": dict(compile=True)}


@pytest.mark.parametrize("mode", list(GEN_MODES))
@pytest.mark.parametrize("position", ["learned", "rope"])
def test_left_padded_generation_equals_per_row(mode, position):
    """Greedy batched generation of left-padded prompts = each prompt generated alone (no padding)."""
    if mode == "compile" and position == "learned":
        pytest.skip("one compiled case is enough (compiling costs seconds)")
    model = build("gqa", "sdpa", position)
    prompts = seqs(3, 7, 5, seed=4)
    idx, mask = pad(prompts, "left", value=0)
    out = model.generate(idx, 6, temperature=0, attention_mask=mask, **GEN_MODES[mode])
    for i, p in enumerate(prompts):
        alone = model.generate(p[None], 6, temperature=0, use_cache=False)
        assert torch.equal(out[i, idx.shape[1]:], alone[0, len(p):]), (mode, i)


def test_generation_stops_per_row_at_eos():
    """Each row stops at its own EOS and is padded after it; decoding ends when all rows have stopped."""
    model = build("mha", "sdpa", "rope")
    prompts = seqs(3, 6, seed=5)
    idx, mask = pad(prompts, "left")
    free = model.generate(idx, 8, temperature=0, attention_mask=mask)[:, idx.shape[1]:]
    eos = int(free[0, 2])                               # row 0 emits it at step 2 (or earlier)
    pad_id = (eos + 1) % V
    for kw in ({}, dict(static_cache=True), dict(use_cache=False)):
        out = model.generate(idx, 8, temperature=0, attention_mask=mask, eos_token_id=eos, pad_token_id=pad_id,
                             **kw)[:, idx.shape[1]:]
        for row, ref in zip(out, free):
            stop = int((ref == eos).nonzero()[0]) if (ref == eos).any() else len(ref)
            assert torch.equal(row[:stop + 1], ref[:stop + 1][: len(row)])
            assert (row[stop + 1:] == pad_id).all()


@pytest.mark.parametrize("kind", ["mha", "mla", "moa", "talking_heads", "multichannel", "sink_window",
                                  "learned_gate", "performer"])
@pytest.mark.parametrize("backend", ["sdpa", "decode"])
def test_padded_cache_equals_no_cache(kind, backend):
    """Prefill a left-padded batch into a cache, decode token by token: the logits equal one masked forward
    (``decode``: the single-token steps take its multiply-and-sum path, the prefill the eager one)."""
    model = build(kind, backend, "rope")
    idx, mask = pad(seqs(6, 10, seed=6), "left")
    more = torch.randint(0, V, (2, 4))
    full_mask = torch.cat([mask, torch.ones(2, 4, dtype=torch.long)], 1)
    with torch.no_grad():
        full = model(torch.cat([idx, more], 1), attention_mask=full_mask)
        for static in (False, True):
            cache = model.new_cache(2, static=static, max_len=20)
            outs = [model(idx, cache=cache, attention_mask=mask)]
            outs += [model(more[:, t:t + 1], cache=cache) for t in range(4)]
            torch.testing.assert_close(torch.cat(outs, 1), full, **TOL)


@pytest.mark.parametrize("group_len", [2, 3])
def test_hourglass_left_and_right_padding(group_len):
    """Hourglass: a padded row (either side) equals the sequence alone; left-padded greedy generation equals each
    prompt generated alone; a mask row with a hole is refused, and so is padding with an incremental cache."""
    cfg = mf.ModelConfig(vocab_size=V, n_layer=1, d_model=16, n_head=2, max_seq_len=40, model="hourglass",
                         position="rope", model_options={"group_len": group_len})
    model = mf.build_model(cfg).eval()
    rows = seqs(5, 9, 7, seed=7)
    with torch.no_grad():
        for side in ("right", "left"):
            idx, mask = pad(rows, side)
            out = model(idx, attention_mask=mask)
            for i, r in enumerate(rows):
                torch.testing.assert_close(real(out, i, len(r), side), model(r[None])[0], **TOL)
        idx, mask = pad(rows, "left")
        got = model.generate(idx, 4, temperature=0, attention_mask=mask)
        for i, r in enumerate(rows):
            alone = model.generate(r[None], 4, temperature=0)[0]
            assert torch.equal(got[i, -4:], alone[-4:])
        holed = torch.ones_like(mask)
        holed[0, 3] = 0
        with pytest.raises(ValueError, match="contiguously"):
            model(idx, attention_mask=holed)
        with pytest.raises(ValueError, match="continues a cache only for unpadded"):
            model(idx, attention_mask=mask, cache=model.new_cache(len(rows)))


@pytest.mark.parametrize("side", ["left", "right"])
def test_calm_padding_invariance(side):
    """CALM: the mask reaches both frozen models and the bridges' cross-attention."""
    from modformer.models.composed import CALM

    def gpt(seed):
        torch.manual_seed(seed)
        return mf.build_model(mf.ModelConfig(vocab_size=V, n_layer=2, d_model=32, n_head=4, max_seq_len=16,
                                             position="rope"))

    calm = CALM(gpt(0), gpt(1), every=1, n_head=4, zero_init=False).eval()
    rows = seqs(5, 9, seed=8)
    idx, mask = pad(rows, side)
    with torch.no_grad():
        out = calm(idx, attention_mask=mask)
        for i, r in enumerate(rows):
            torch.testing.assert_close(real(out, i, len(r), side), calm(r[None])[0], **TOL)


def test_data_pack_document_ids_and_trainer(tmp_path):
    """data.pack: wikitext2 batches carry document_ids (one document per line, opened by its <eos>) and the
    trainer passes them to the model; a corpus without a separator is refused with one line."""
    from modformer.config import DataConfig
    from modformer.data import build_dataset

    data = DataConfig(name="wikitext2", seq_len=24, pack=True, options={"cache_dir": str(tmp_path / "cache")})
    ds = build_dataset(data)
    x, _ = ds.get_batch("train", 4, torch.Generator().manual_seed(0))
    doc = ds.batch_kwargs(x)["document_ids"]
    assert torch.equal(doc, (x == ds.eos_id).long().cumsum(-1)) and doc.max() > 0
    with pytest.raises(ConfigError, match="data.pack needs a corpus"):
        build_dataset(DataConfig(name="shakespeare_char", seq_len=8, pack=True,
                                 options={"cache_dir": str(tmp_path / "cache")}))
    assert _forwards_with(tmp_path, data, "document_ids") >= 2   # the training step and the evaluation batch


def _forwards_with(tmp_path, data, key: str) -> int:
    """Train one step (and evaluate once) on ``data`` with a tiny RoPE GPT; how many forwards got ``key``
    (a NaN probe may run plain)."""
    from modformer.config import RunConfig, TrainConfig
    from modformer.train.trainer import Trainer

    seen = []
    cfg = RunConfig(name="fw", out_dir=str(tmp_path), data=data,
                    model=mf.ModelConfig(n_layer=1, d_model=16, n_head=2, max_seq_len=24, position="rope"),
                    train=TrainConfig(steps=1, batch_size=4, eval_every=1, eval_batches=1, progress=False,
                                      tensorboard=False, device="cpu", sample_tokens=0))
    trainer = Trainer(cfg)
    trainer.raw_model.register_forward_pre_hook(lambda m, a, kw: seen.append(key in kw), with_kwargs=True)
    trainer.fit()
    return sum(seen)


def test_cli_generate_batches_prompts(tmp_path, capsys):
    """`modformer generate RUN --prompt A --prompt B` and `--prompts FILE` batch the prompts (left-padded):
    each greedy continuation equals that prompt generated alone."""
    from modformer.cli import main
    from modformer.config import DataConfig, RunConfig, TrainConfig
    from modformer.train.trainer import Trainer

    cfg = RunConfig(name="gen", out_dir=str(tmp_path),
                    data=DataConfig(name="shakespeare_char", seq_len=16,
                                    options={"cache_dir": str(tmp_path / "cache")}),
                    model=mf.ModelConfig(n_layer=1, d_model=16, n_head=2, max_seq_len=32, position="rope"),
                    train=TrainConfig(steps=2, batch_size=4, eval_every=2, eval_batches=1, progress=False,
                                      tensorboard=False, device="cpu", sample_tokens=0))
    Trainer(cfg).fit()
    run = str(tmp_path / "gen")
    greedy = ["--temperature", "0", "--max-new-tokens", "5"]

    def gen(*args: str) -> str:
        assert main(["generate", run, *args, *greedy]) == 0
        return capsys.readouterr().out

    prompts = ["ROMEO:", "To be", "A"]
    alone = [gen("--prompt", p).rstrip("\n") for p in prompts]
    batched = gen(*[a for p in prompts for a in ("--prompt", p)])
    assert batched == "\n".join(f"### {i}\n{t}" for i, t in enumerate(alone)) + "\n"
    (tmp_path / "prompts.txt").write_text("ROMEO:\n\nTo be\n")
    order = [alone[2], alone[0], alone[1]]                  # --prompt values first, then the file's lines
    assert gen("--prompts", str(tmp_path / "prompts.txt"), "--prompt", "A") == \
        "\n".join(f"### {i}\n{t}" for i, t in enumerate(order)) + "\n"
    assert main(["generate", run]) == 2
    assert "--prompts FILE" in capsys.readouterr().err


def _doc_stream(seq_len: int = 4):
    """A stream with EOS = 0: an empty document, one longer than seq_len, and a last one without a closing EOS."""
    from modformer.data.base import StreamDataset

    s = np.array([0, 5, 6, 0, 7, 8, 9, 10, 11, 12, 0, 0, 3, 4], dtype=np.int64)
    ds = StreamDataset({"train": s, "val": s}, vocab_size=V, seq_len=seq_len)
    ds.eos_id, ds.pad_documents = 0, True
    return ds, s


def test_pad_documents_rows_cover_every_target_once():
    """data.pad_documents: each row is (a piece of) one document opened by its EOS; inputs and targets are the
    stream's, padding is 0 / -100, and the rows' targets read in order are exactly the stream after its first
    token. attention_mask marks the real inputs."""
    ds, s = _doc_stream()
    batches = list(ds.iter_eval("val", 3))
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    assert len(x) == ds.eval_rows("val") == 5            # inputs [0 5 6] [0 7 8 9] [10 11 12] [0] [0 3]
    real = y != -100
    assert torch.equal(y[real], torch.from_numpy(s[1:]))
    for row_x, row_y, m in zip(x, y, real):
        n = int(m.sum())
        assert n >= 1 and bool(m[:n].all()) and not bool(m[n:].any())     # right padding only
        assert (row_x[n:] == 0).all()
        assert torch.equal(row_x[1:n], row_y[:n - 1])                      # next-token targets inside the row
    assert (x[real][x[real] == 0].numel()) == int((x[:, 0] == 0).sum())  # EOS only as a row's opening token
    mask = ds.batch_kwargs(x, y)["attention_mask"]
    assert torch.equal(mask.bool(), real)
    xb, yb = ds.get_batch("train", 16, torch.Generator().manual_seed(0))
    rows = {tuple(r.tolist()) for r in torch.cat([x, y], 1)}
    assert all(tuple(r.tolist()) in rows for r in torch.cat([xb, yb], 1))


def test_pad_documents_loss_equals_each_document_alone():
    """A padded row's loss equals its document run alone (the mask hides the padding from every position)."""
    ds, _ = _doc_stream(seq_len=5)
    torch.manual_seed(0)
    model = build("mha", causal=False)        # not causal: without the mask the padding would leak into rows
    x, y = next(iter(ds.iter_eval("val", 0)))
    logits = model(x, **ds.batch_kwargs(x, y))
    for i in range(len(x)):
        n = int((y[i] != -100).sum())
        alone = model(x[i:i + 1, :n])
        torch.testing.assert_close(logits[i:i + 1, :n], alone, **TOL)


def test_pad_documents_errors_and_trainer(tmp_path):
    from modformer.config import DataConfig
    from modformer.data import build_dataset

    cache = {"cache_dir": str(tmp_path / "cache")}
    with pytest.raises(ConfigError, match="data.pad_documents needs a corpus"):
        build_dataset(DataConfig(name="shakespeare_char", seq_len=8, pad_documents=True, options=cache))
    with pytest.raises(ConfigError, match="exclude each other"):
        build_dataset(DataConfig(name="wikitext2", seq_len=8, pad_documents=True, pack=True, options=cache))
    ds, _ = _doc_stream()
    with pytest.raises(ConfigError, match="eval_stride=0"):
        next(ds.iter_eval("val", 2, stride=2))
    data = DataConfig(name="wikitext2", seq_len=24, pad_documents=True, options=cache)
    assert _forwards_with(tmp_path, data, "attention_mask") >= 2
