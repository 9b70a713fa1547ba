"""`modformer bench sparse-decode`: the tiny setting through the registry on CPU (schema, variants, the gate's
density within the asked one) and its bad input."""

from __future__ import annotations

import json

import pytest
import torch

from modformer.bench import registry
from modformer.bench import sparse_decode as sd
from modformer.bench.common import RESULT_KEYS
from modformer.cli import main


def test_tiny_run_writes_every_variant_and_the_headline(tmp_path):
    assert registry.run("sparse-decode", ["--tiny", "--device", "cpu", "--repeats", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "sparse_decode.json").read_text())
    assert list(result)[:len(RESULT_KEYS)] == list(RESULT_KEYS) and result["benchmark"] == "sparse_decode"
    rows = result["rows"]
    assert [r["variant"] for r in rows] == [sd.DENSE, sd.GATE]                   # no compiled graph on CPU
    for row in rows:
        assert "error" not in row, row
        assert row["T"] == 256 and row["batch"] == 2 and row["per_token_ms"] > 0
    gate = rows[1]
    assert 0 < gate["density"] <= 0.1 and gate["top_k"] >= 1
    head = result["headline"]
    assert head["seq_len"] == 256 and head["density"] == gate["density"]
    assert head["decode_speedup_vs_dense"] == gate["speedup_vs_best_dense"]


def test_compiled_variants_run_and_the_headline_takes_the_faster_gate(tmp_path, monkeypatch):
    """``--compiled`` on CPU (torch.compile -> identity here): the six compiled decoders (dense and gate, each with
    the model's attention, the decode attention and flex decoding) run, and the headline is the fastest gate variant
    against the best dense one."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    args = ["--tiny", "--device", "cpu", "--repeats", "1", "--compiled", "--out", str(tmp_path)]
    assert registry.run("sparse-decode", args) == 0
    result = json.loads((tmp_path / "sparse_decode.json").read_text())
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {sd.DENSE, sd.GATE, *sd.COMPILED}
    assert all("error" not in r and r["per_token_ms"] >= 0 for r in rows.values()), rows
    # a compiled row is (generate - prefill) / steps: on a loaded CPU it may come out 0, and then has no ratio
    timed = [rows[v] for v in sd.GATES if rows[v].get("speedup_vs_best_dense")]
    assert timed, rows
    fastest = max(timed, key=lambda r: r["speedup_vs_best_dense"])
    best_dense = min(x for x in (rows[v]["per_token_ms"] for v in (sd.DENSE, sd.GRAPH, sd.GRAPH_DECODE, sd.GRAPH_FLEX))
                     if x)
    assert fastest["speedup_vs_best_dense"] == best_dense / fastest["per_token_ms"]
    assert result["headline"]["variant"] == fastest["variant"]
    assert result["headline"]["decode_speedup_vs_dense"] == fastest["speedup_vs_best_dense"]


def test_density_above_one_is_one_error_line(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "sparse-decode", "--tiny", "--density", "1.5"])
    assert "--density must be in (0, 1]" in capsys.readouterr().err


def test_each_case_is_handed_over_as_it_finishes():
    """``latency_rows(on_case=...)`` sees the rows after every (T, batch) case, ratios included: what ``main`` writes
    so that a run cut off by a time limit keeps its finished cases."""
    args = sd.parse(["--tiny", "--device", "cpu", "--repeats", "1"])
    args.batch = [1, 2]
    seen: list[list[tuple[int, str, bool]]] = []
    sd.latency_rows(args, torch.device("cpu"),
                    on_case=lambda rows: seen.append([(r["batch"], r["variant"], "speedup_vs_best_dense" in r)
                                                      for r in rows]))
    assert [len(s) for s in seen] == [2, 4]
    assert seen[0] == [(1, sd.DENSE, True), (1, sd.GATE, True)] and seen[1][:2] == seen[0]


def test_prefill_timed_is_the_one_generate_runs(monkeypatch):
    """The compiled rows subtract the prefill ``generate(compile=True)`` runs (the prompt into a static cache of the
    decoder's length), not the plain forward: both calls reach the model with the same input and cache shape."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    args = sd.parse(["--tiny", "--device", "cpu"])
    dense, _, _ = sd.build_pair(args, torch.device("cpu"), torch.float32)
    seen: list[tuple] = []
    real = type(dense).forward

    def spy(self, idx, *a, cache=None, **kw):
        if idx.shape[1] > 1:                                         # prefills only, not the decode steps
            seen.append((tuple(idx.shape), type(cache).__name__, getattr(cache, "max_len", None)))
        return real(self, idx, *a, cache=cache, **kw)

    monkeypatch.setattr(type(dense), "forward", spy)
    idx = torch.randint(0, args.vocab, (1, 40))
    with torch.no_grad():
        dense.generate(idx, 5, temperature=0, compile=True)
        sd.prefill_seconds(dense, idx, 5, torch.device("cpu"), 1)
    assert len(seen) >= 2 and set(seen) == {((1, 40), "StaticKVCache", 45)}


def test_kernel_time_ratio_is_against_the_fastest_compiled_dense_decoder():
    rows = [{"T": 8, "batch": 1, "variant": sd.DENSE, "per_token_ms": 5.0},
            {"T": 8, "batch": 1, "variant": sd.GRAPH, "per_token_ms": 4.0, "kernel_us_per_token": 300.0},
            {"T": 8, "batch": 1, "variant": sd.GRAPH_FLEX, "per_token_ms": 4.5, "kernel_us_per_token": 200.0},
            {"T": 8, "batch": 1, "variant": sd.GATE_GRAPH, "per_token_ms": 2.0, "kernel_us_per_token": 50.0},
            {"T": 8, "batch": 2, "variant": sd.GATE_GRAPH, "per_token_ms": 2.0, "kernel_us_per_token": 10.0}]
    sd.add_ratios(rows)
    assert rows[3]["kernel_speedup_vs_best_compiled_dense"] == 4.0          # 200 / 50, not 300 / 50
    assert rows[3]["speedup_vs_best_dense"] == 2.0                           # wall: 4.0 / 2.0
    assert "kernel_speedup_vs_best_compiled_dense" not in rows[4]           # no dense row of its own case
    assert sd.headline(rows)["kernel_speedup_vs_best_compiled_dense"] == 4.0    # the case with a ratio
