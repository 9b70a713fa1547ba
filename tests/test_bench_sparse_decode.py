"""`modformer bench sparse-decode`: the tiny setting through the registry on CPU (schema, variants, the gate's
density within the asked one) and its bad input."""

from __future__ import annotations

import json

import pytest

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


def test_density_above_one_is_one_error_line(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "sparse-decode", "--tiny", "--density", "1.5"])
    assert "--density must be in (0, 1]" in capsys.readouterr().err
