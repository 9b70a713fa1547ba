"""Tests of modformer.data: task correctness, splits, determinism, corpora on the shipped files, BPE cache."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from modformer.config import DataConfig
from modformer.data import IGNORE_INDEX, DataFileNotFoundError, StreamDataset, build_dataset, default_root
from modformer.data import text as text_mod
from modformer.data.tasks import MODULAR_OPS
from modformer.registry import ConfigError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"shipped corpora not found at {SHARED}")


def build(name: str, seq_len: int = 256, root: str | None = None, **options):
    return build_dataset(DataConfig(name=name, seq_len=seq_len, root=root, options=options))


def whole(ds, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    return ds.get_batch(split, 0, torch.Generator())


# ------------------------------------------------------------------------------------------ modular

def _modular_ok(op: str, a: int, b: int, c: int, p: int) -> bool:
    """Reference check with plain Python integers (division checked as c * b == a)."""
    ref = {
        "+": lambda: (a + b) % p, "-": lambda: (a - b) % p, "*": lambda: (a * b) % p,
        "x2+y2": lambda: (a ** 2 + b ** 2) % p, "x2+xy+y2": lambda: (a ** 2 + a * b + b ** 2) % p,
        "x2+xy+y2+x": lambda: (a ** 2 + a * b + b ** 2 + a) % p, "x3+xy": lambda: (a ** 3 + a * b) % p,
        "x3+xy2+y": lambda: (a ** 3 + a * b ** 2 + b) % p,
    }
    if op == "/" or (op == "x/y_or_x-y" and b % 2 == 1):
        return b != 0 and (c * b) % p == a
    if op == "x/y_or_x-y":
        return c == (a - b) % p
    return c == ref[op]()


@pytest.mark.parametrize("op", MODULAR_OPS)
def test_modular_answers_every_op(op: str) -> None:
    p = 31
    ds = build("modular", p=p, op=op, train_fraction=0.5)
    assert ds.vocab_size == p + 1 and ds.seq_len == 3 and ds.kind == "task"
    for split in ("train", "val"):
        x, y = whole(ds, split)
        assert x.dtype == y.dtype == torch.int64
        assert (x[:, 2] == p).all()                       # '=' token
        assert (y[:, :2] == IGNORE_INDEX).all()           # loss only on the answer
        assert ((y[:, 2] >= 0) & (y[:, 2] < p)).all()
        for a, b, c in zip(x[:, 0].tolist(), x[:, 1].tolist(), y[:, 2].tolist()):
            assert _modular_ok(op, a, b, c, p), (op, a, b, c)


def test_modular_splits_and_determinism() -> None:
    ds = build("modular")                                 # p=113, "+", train_fraction 0.3
    n = 113 * 113
    assert ds.split_size("train") == int(0.3 * n) and ds.split_size("val") == n - int(0.3 * n)
    xt, _ = whole(ds, "train")
    xv, _ = whole(ds, "val")
    pairs_t, pairs_v = set(map(tuple, xt[:, :2].tolist())), set(map(tuple, xv[:, :2].tolist()))
    assert not pairs_t & pairs_v and len(pairs_t | pairs_v) == n
    again, other = build("modular"), build("modular", seed=1)
    assert torch.equal(whole(again, "train")[0], xt)
    assert not torch.equal(whole(other, "train")[0], xt)
    div = build("modular", op="/")
    assert div.split_size("train") + div.split_size("val") == 113 * 112   # b != 0
    assert div.decode([3, 5, 113]) == "3 / 5 =" and div.encode("3 5 =") == div.encode("3 / 5 =") == [3, 5, 113]


def test_modular_bad_options() -> None:
    with pytest.raises(ConfigError, match="data.options.op"):
        build("modular", op="^")
    with pytest.raises(ConfigError, match="prime"):
        build("modular", p=100, op="/")


# ------------------------------------------------------------------------------------------ generative

@pytest.mark.parametrize("name,fn", [("copy", lambda v: v), ("reverse", lambda v: v[::-1]),
                                     ("sort", sorted)])
def test_transform_tasks(name: str, fn) -> None:
    L, k = 6, 7
    ds = build(name, length=L, n_symbols=k, n_examples=500, train_fraction=0.8, seed=3)
    assert ds.vocab_size == k + 1 and ds.seq_len == 2 * L
    assert ds.split_size("train") == 400 and ds.split_size("val") == 100
    inputs = {}
    for split in ("train", "val"):
        x, y = whole(ds, split)
        assert (x[:, L] == k).all()                                  # separator
        assert (y[:, :L] == IGNORE_INDEX).all()
        for row_x, row_y in zip(x.tolist(), y.tolist()):
            assert row_y[L:] == list(fn(row_x[:L]))                  # targets are f(input)
            assert row_x[L + 1:] == row_y[L:-1]                      # teacher forcing: x is y shifted
        inputs[split] = {tuple(r[:L]) for r in x.tolist()}
    assert not inputs["train"] & inputs["val"]                       # distinct examples, no leakage
    assert torch.equal(whole(build(name, length=L, n_symbols=k, n_examples=500, train_fraction=0.8, seed=3),
                             "val")[0], whole(ds, "val")[0])


def test_small_space_is_enumerated() -> None:
    ds = build("copy", length=2, n_symbols=3, n_examples=9, train_fraction=0.5)
    rows = {tuple(r[:2]) for s in ("train", "val") for r in whole(ds, s)[0].tolist()}
    assert len(rows) == 9
    with pytest.raises(ConfigError, match="n_examples"):
        build("copy", length=2, n_symbols=3, n_examples=10)


@pytest.mark.parametrize("reverse", [True, False])
def test_addition(reverse: bool) -> None:
    n = 3
    ds = build("addition", n_digits=n, n_examples=300, reverse_answer=reverse)
    x, y = whole(ds, "train")
    assert ds.seq_len == 3 * n + 2 and ds.vocab_size == 12
    assert (y[:, : 2 * n + 1] == IGNORE_INDEX).all()
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        a = int("".join(map(str, row_x[:n])))
        b = int("".join(map(str, row_x[n + 1:2 * n + 1])))
        assert row_x[n] == 10 and row_x[2 * n + 1] == 11
        digits = row_y[2 * n + 1:]
        assert len(digits) == n + 1
        assert int("".join(map(str, digits[::-1] if reverse else digits))) == a + b


def test_induction() -> None:
    L = 10
    ds = build("induction", length=L, n_symbols=20, n_examples=200)
    x, y = whole(ds, "train")
    assert ds.seq_len == 2 * L - 1
    seq = torch.cat([x, y[:, -1:]], 1)                                 # full sequence (N, 2L)
    assert torch.equal(seq[:, :L], seq[:, L:])                         # second half repeats the first
    assert all(len(set(r)) == L for r in seq[:, :L].tolist())         # distinct tokens by default
    assert (y[:, : L - 1] == IGNORE_INDEX).all() and (y[:, L - 1:] != IGNORE_INDEX).all()
    assert torch.equal(build("induction", length=L, n_symbols=20, n_examples=200).get_batch(
        "train", 0, torch.Generator())[0], x)


def test_lookup() -> None:
    n_pairs, n_keys = 4, 8
    ds = build("lookup", n_pairs=n_pairs, n_keys=n_keys, n_values=5, n_examples=300)
    x, y = whole(ds, "train")
    assert ds.vocab_size == n_keys + 5 + 1 and ds.seq_len == 2 * n_pairs + 2
    assert (y[:, :-1] == IGNORE_INDEX).all()
    for row_x, target in zip(x.tolist(), y[:, -1].tolist()):
        table = dict(zip(row_x[0:2 * n_pairs:2], row_x[1:2 * n_pairs:2]))
        assert len(table) == n_pairs and row_x[-2] == n_keys + 5        # distinct keys, then '?'
        assert table[row_x[-1]] == target
    assert ds.decode(x[0, -2:].tolist()).startswith("? k")


def test_task_batches_and_eval() -> None:
    ds = build("reverse", length=5, n_examples=300)
    g = torch.Generator().manual_seed(7)
    state = g.get_state()
    x1, y1 = ds.get_batch("train", 32, g)
    g.set_state(state)
    x2, y2 = ds.get_batch("train", 32, g)
    assert x1.shape == (32, 10) and torch.equal(x1, x2) and torch.equal(y1, y2)
    assert len({tuple(r) for r in x1.tolist()}) == 32                   # no repeats within a batch
    xs, ys = zip(*ds.iter_eval("val", 7))
    xv, yv = whole(ds, "val")
    assert torch.equal(torch.cat(xs), xv) and torch.equal(torch.cat(ys), yv)
    assert len(list(ds.iter_eval("val", 7, max_batches=2))) == 2
    m = ds.metrics(loss_sum=10.0, n_targets=20, n_correct=5)
    assert m["loss"] == 0.5 and m["acc"] == 0.25
    with pytest.raises(ConfigError, match="split"):
        ds.get_batch("test", 4, g)


# ------------------------------------------------------------------------------------------ streams

def test_stream_windows_and_eval() -> None:
    s = np.arange(1000, dtype=np.uint16)
    ds = StreamDataset({"train": s, "val": s[:95]}, vocab_size=1000, seq_len=16, words={"val": 47})
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    x, y = ds.get_batch("train", 8, g)
    assert x.shape == y.shape == (8, 16) and x.dtype == torch.int64
    assert torch.equal(y, x + 1)                                       # y is x shifted by one
    assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(8, 15, dtype=torch.int64))   # real windows
    g.set_state(state)
    assert torch.equal(ds.get_batch("train", 8, g)[0], x)
    batches = list(ds.iter_eval("val", 2))
    ys = torch.cat([b[1] for b in batches]).flatten()
    assert torch.equal(ys[ys != IGNORE_INDEX], torch.arange(1, 95))    # every target exactly once, in order
    assert all(b[0].shape[1] == 16 for b in batches)
    m = ds.metrics(loss_sum=94 * 2.0, n_targets=94, n_correct=47)
    assert m["ppl"] == pytest.approx(math.exp(2.0)) and m["acc"] == 0.5
    assert m["word_ppl"] == pytest.approx(math.exp(94 * 2.0 / 47))
    with pytest.raises(ConfigError):
        ds.get_batch("train", 0, g)


@pytest.mark.parametrize("seq_len", [16, 15])
def test_repeat_fraction_writes_one_span_twice(seq_len: int) -> None:
    s = np.arange(5000, dtype=np.uint16)
    plain = StreamDataset({"train": s, "val": s}, vocab_size=5000, seq_len=seq_len)
    ds = StreamDataset({"train": s, "val": s}, vocab_size=5000, seq_len=seq_len, repeat_fraction=0.5)
    x, y = ds.get_batch("train", 400, torch.Generator().manual_seed(0))
    row = torch.cat([x, y[:, -1:]], 1)                                   # the T+1 tokens of each window
    m = (seq_len + 2) // 2
    repeated = (row[:, 1:] - row[:, :-1] != 1).any(1)
    assert 0.4 < repeated.float().mean() < 0.6
    r = row[repeated]
    assert torch.equal(r[:, m:], r[:, : seq_len + 1 - m])                # second half = the first again
    assert torch.equal(r[:, 1:m] - r[:, : m - 1], torch.ones(len(r), m - 1, dtype=torch.int64))  # real text
    assert torch.equal(row[~repeated][:, 1:] - row[~repeated][:, :-1], torch.ones(int((~repeated).sum()), seq_len,
                                                                           dtype=torch.int64))
    # validation windows are never repeated
    xv, _ = ds.get_batch("val", 400, torch.Generator().manual_seed(0))
    assert torch.equal(xv, plain.get_batch("val", 400, torch.Generator().manual_seed(0))[0])
    assert not (xv[:, 1:] - xv[:, :-1] != 1).any()
    with pytest.raises(ConfigError, match="repeat_fraction"):
        StreamDataset({"train": s}, vocab_size=5000, seq_len=16, repeat_fraction=1.0)


def test_random_repeat_span_copies_a_span_of_varying_length_and_distance() -> None:
    """repeat_span='random': one span [a, a+m) of the natural window is written again at [b, b+m), b >= a+m,
    with m and the distance b-a varying (no fixed offset for a position-only head); the rest is untouched."""
    s = np.arange(5000, dtype=np.uint16)
    ds = StreamDataset({"train": s, "val": s}, vocab_size=5000, seq_len=64, repeat_fraction=0.5,
                       repeat_span="random")
    x, y = ds.get_batch("train", 400, torch.Generator().manual_seed(0))
    row = torch.cat([x, y[:, -1:]], 1).numpy()                            # (B, 65); text is s itself: +1 steps
    lengths, distances = set(), set()
    n_rep = 0
    for r in row:
        breaks = np.flatnonzero(np.diff(r) != 1) + 1                      # where the natural run is interrupted
        if len(breaks) == 0:
            continue
        n_rep += 1
        b = breaks[0]
        a = int(np.flatnonzero(r[:b] == r[b])[0])                          # the copy's source
        m = next((j for j in range(65 - b) if r[b + j] != r[a + j]), 65 - b)
        assert m >= 8 and m <= 32 and b >= a + m
        assert np.array_equal(np.diff(r[b + m:]), np.ones(len(r) - b - m - 1)) if b + m < 65 else True
        assert r[b + m - 1] - r[0] == a + m - 1 and (b + m == 65 or r[b + m] - r[0] == b + m)   # natural after
        lengths.add(m)
        distances.add(b - a)
    assert 0.4 < n_rep / len(row) < 0.6
    assert len(lengths) > 10 and len(distances) > 10
    with pytest.raises(ConfigError, match="repeat_span"):
        StreamDataset({"train": s}, vocab_size=5000, seq_len=16, repeat_fraction=0.5, repeat_span="twice")


@pytest.mark.parametrize("n,stride", [(2, 3), (95, 1), (95, 5), (96, 7), (17, 16), (300, 4)])
def test_strided_eval_scores_every_target_once_with_long_context(n: int, stride: int) -> None:
    t = 16
    ds = StreamDataset({"val": np.arange(n, dtype=np.uint16)}, vocab_size=1000, seq_len=t)
    scored = []
    for x, y in ds.iter_eval("val", 3, stride=stride):
        for xr, yr in zip(x, y):
            keep = (yr != IGNORE_INDEX).nonzero().flatten()
            assert torch.equal(yr[keep], xr[keep] + 1)                # the target follows its input token
            if int(xr[0]) > 0:                                         # past the first window: long context
                assert int(keep.min()) >= t - stride
            scored += yr[keep].tolist()
    assert scored == list(range(1, n))                                 # every target once, in order
    with pytest.raises(ConfigError, match="stride"):
        next(ds.iter_eval("val", 3, stride=-1))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("cache"))


@needs_shared
def test_default_root_finds_shared_data(monkeypatch) -> None:
    monkeypatch.delenv("MODFORMER_DATA", raising=False)
    assert default_root().resolve() == SHARED.resolve()
    monkeypatch.setenv("MODFORMER_DATA", "/somewhere/else")
    assert default_root() == Path("/somewhere/else")


@needs_shared
def test_wikitext2(cache: str) -> None:
    ds = build("wikitext2", seq_len=64, cache_dir=cache)
    assert ds.kind == "corpus" and ds.vocab_size == 33278
    assert ds.split_size("train") == 2088628
    assert ds.split_size("val") > 200_000 and ds.split_size("test") > 200_000
    assert isinstance(ds.stream("train"), np.memmap) and ds.stream("train").dtype == np.uint16
    with open(SHARED / "wikitext-2" / "valid.txt", encoding="utf-8") as f:
        lines = [f.readline() for _ in range(5)]
    assert ds.decode(ds.stream("val")[: len(ds.encode("".join(lines)))].tolist()) == "\n".join(
        " ".join(line.split()) for line in lines) + "\n"
    x, y = ds.get_batch("test", 4, torch.Generator().manual_seed(0))
    assert torch.equal(x[:, 1:], y[:, :-1]) and int(x.max()) < ds.vocab_size
    list(ds.iter_eval("val", 4, max_batches=1))
    m = ds.metrics(100.0, 50, 10)
    assert m["ppl"] == pytest.approx(math.exp(2.0)) and m["word_ppl"] == pytest.approx(m["ppl"])
    again = build("wikitext2", seq_len=64, cache_dir=cache)              # from the cache
    assert np.array_equal(again.stream("val"), ds.stream("val"))


@needs_shared
def test_shakespeare_char(cache: str) -> None:
    ds = build("shakespeare_char", seq_len=32, cache_dir=cache)
    text = (SHARED / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    assert ds.vocab_size == 65
    n_train = int(len(text) * 0.9)
    assert ds.split_size("train") == n_train and ds.split_size("val") == len(text) - n_train
    assert ds.decode(ds.stream("val").tolist()) == text[n_train:]
    sample = "First Citizen:\nBefore we proceed any further, hear me speak."
    assert ds.decode(ds.encode(sample)) == sample
    g = torch.Generator().manual_seed(1)
    x, y = ds.get_batch("train", 3, g)
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert ds.decode(x[0].tolist()) in text


# ------------------------------------------------------------------------------------------ BPE

def test_bpe_roundtrip_and_cache(tmp_path: Path) -> None:
    words = ["alpha", "beta", "gamma", "delta", "épsilon", "zeta", "eta", "theta", "naïve", "token"]
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(words, size=12)) + ("." if i % 3 else "  ") for i in range(150)]
    src = tmp_path / "small.txt"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    opts = dict(source=str(src), vocab_size=300, cache_dir=str(tmp_path / "cache"))
    before = text_mod.BPE_TRAININGS
    ds = build("bpe", seq_len=16, **opts)
    assert text_mod.BPE_TRAININGS == before + 1 and 256 < ds.vocab_size <= 300
    sample = "gamma naïve  théta\n\nunseen WORDS 123 ✓\n"
    assert ds.decode(ds.encode(sample)) == sample
    full = src.read_text(encoding="utf-8")
    cut = int(len(full) * 0.9)
    assert ds.decode(ds.stream("train").tolist()) == full[:cut]
    assert ds.decode(ds.stream("val").tolist()) == full[cut:]
    assert ds.stream("train").dtype == np.uint16
    tok_file = ds.cache_folder / "tokenizer.json"
    mtime = os.stat(tok_file).st_mtime_ns
    again = build("bpe", seq_len=16, **opts)                            # second build reuses the cache
    assert text_mod.BPE_TRAININGS == before + 1 and os.stat(tok_file).st_mtime_ns == mtime
    assert np.array_equal(again.stream("train"), ds.stream("train"))
    n_val = ds.split_size("val") - 1
    m = ds.metrics(2.0 * n_val, n_val, 0, split="val")
    assert m["word_ppl"] == pytest.approx(math.exp(2.0 * n_val / len(full[cut:].split())))
    build("bpe", seq_len=16, **{**opts, "vocab_size": 280})               # new settings -> new tokenizer
    assert text_mod.BPE_TRAININGS == before + 2


# ------------------------------------------------------------------------------------------ bad input

def test_unknown_name_and_option() -> None:
    with pytest.raises(ConfigError, match="data.name.*modulr.*did you mean 'modular'") as e:
        build("modulr")
    assert "wikitext2" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"data\.options\.prime.*allowed: p, op, train_fraction, seed"):
        build("modular", prime=7)
    with pytest.raises(ConfigError, match=r"data\.options\.vocab"):
        build("bpe", vocab=100)


def test_missing_files(tmp_path: Path) -> None:
    for name in ("wikitext2", "shakespeare_char"):
        with pytest.raises(DataFileNotFoundError) as e:
            build(name, root=str(tmp_path))
        msg = str(e.value)
        assert str(tmp_path) in msg and "data.root" in msg and "MODFORMER_DATA" in msg and "\n" not in msg
        assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, ConfigError)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        build("bpe", source=str(tmp_path / "nope.txt"))


def test_download_path_without_network(tmp_path: Path, monkeypatch, capsys) -> None:
    """download=True fetches missing files from the canonical URL (urlopen faked: no network in tests), shows
    progress, checks the published SHA-256 before writing, and verifies local files of that name when read."""
    import hashlib
    import io
    import urllib.request

    from modformer.data import files

    payload = b"To be, or not to be: that is the question.\n" * 50
    fetched = []

    def fake_urlopen(url: str, timeout: float = 0) -> io.BytesIO:
        fetched.append(url)
        return io.BytesIO(payload)

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    kw = dict(seq_len=8, root=str(tmp_path / "data"), download=True, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(files.DataChecksumError, match="is not the published 86c4e6aa9db7c042") as e:
        build("shakespeare_char", **kw)                 # the real digest: the fake payload is refused
    assert "\n" not in str(e.value) and not (tmp_path / "data" / "tinyshakespeare" / "input.txt").exists()
    monkeypatch.setitem(files.SHA256, "tinyshakespeare", {"input.txt": hashlib.sha256(payload).hexdigest()})
    ds = build("shakespeare_char", **kw)
    assert fetched == ["https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"] * 2
    assert (tmp_path / "data" / "tinyshakespeare" / "input.txt").read_bytes() == payload
    assert ds.decode(ds.encode("not to be")) == "not to be"
    assert "download tinyshakespeare/input.txt" in capsys.readouterr().err       # progress (plain lines here)
    (tmp_path / "data" / "tinyshakespeare" / "input.txt").write_bytes(payload + b"!")   # damaged afterwards
    with pytest.raises(files.DataChecksumError, match="data.options.verify=false"):
        build("shakespeare_char", **kw)
    assert build("shakespeare_char", **{**kw, "verify": False}).vocab_size == ds.vocab_size + 1


@needs_shared
def test_shipped_corpora_match_their_published_sha256() -> None:
    """The digests in files.SHA256 are the ones shared/data/README.md publishes, and the shipped files match."""
    from modformer.data import files

    readme = (SHARED / "README.md").read_text(encoding="utf-8")
    for folder, names in files.SHA256.items():
        for name, digest in names.items():
            assert f"{folder}/{name}" in readme and digest in readme
            files.verify_file(SHARED / folder / name, folder)


@pytest.mark.parametrize("corpus", ["wikitext2", "shakespeare_char", "bpe"])
def test_every_text_corpus_accepts_repeat_fraction(corpus: str) -> None:
    """data.options.repeat_fraction reaches the training windows of each text corpus."""
    opts = {"vocab_size": 300} if corpus == "bpe" else {}
    ds = build_dataset(DataConfig(name=corpus, seq_len=16, options={**opts, "repeat_fraction": 0.5}))
    x, y = ds.get_batch("train", 256, torch.Generator().manual_seed(0))
    row = torch.cat([x, y[:, -1:]], 1)
    doubled = (row[:, 9:] == row[:, :8]).all(1)                      # T=16: the 9-token span written twice
    assert ds.repeat_fraction == 0.5 and 0.35 < doubled.float().mean() < 0.65
