"""`modformer bench generation-batched`: the tiny preset through the registry on CPU (schema, tokens equal HF
generate's in fp32), and the helpers that count generated tokens and locate disagreements."""

from __future__ import annotations

import json

import pytest
import torch

import modformer as mf
from modformer.bench import generation_batched as gb
from modformer.bench import registry
from modformer.bench.common import RESULT_KEYS
from modformer.bench.throughput import gpt2_config
from modformer.cli import main

HEADLINE = ("tokens_per_s", "hf_tokens_per_s", "speedup_vs_hf", "speedup_vs_hf_best", "dynamic_tokens_per_s",
            "identical_rows", "divergent_rows", "divergences_at_near_ties", "fp32_identical_rows",
            "fp32_identical_rows_diverse")


def test_tiny_preset_runs_through_the_registry_and_matches_hf_in_fp32(tmp_path, capsys):
    assert registry.run("generation-batched", ["--tiny", "--device", "cpu", "--repeats", "1",
                                               "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "generation-batched.json").read_text())
    assert list(result)[:len(RESULT_KEYS)] == list(RESULT_KEYS) and result["benchmark"] == "generation-batched"
    head = result["headline"]
    assert list(head) == list(HEADLINE)
    variants = [r["variant"] for r in result["rows"]]
    assert variants == [gb.OURS, "modformer dynamic cache", gb.HF_STATIC, "HF generate (dynamic cache)"]
    setup = result["setup"]
    assert setup["prompts"] == 4 and setup["new_tokens"] == 8 and setup["dtype"] == "torch.float32"
    assert setup["prompt_len_min"] < setup["prompt_len_max"]                 # a padded batch, not equal lengths
    for row in result["rows"]:
        assert "error" not in row, row
        assert 0 < row["tokens"] <= 4 * 8 and row["tokens_per_s"] > 0 and row["compiled"] is False
        assert row["identical_rows_vs_hf"] == 1.0                          # CPU runs fp32: exact greedy identity
    assert head["identical_rows"] == 1.0 and head["divergent_rows"] == 0
    assert head["fp32_identical_rows"] == 1.0 and head["fp32_identical_rows_diverse"] == 1.0
    assert head["speedup_vs_hf"] == pytest.approx(head["tokens_per_s"] / head["hf_tokens_per_s"])
    assert result["fp32_check"]["diverse_weights"]["distinct_tokens_per_row"] > 1   # not a repeated token


def test_fp32_run_times_the_wide_weight_model_and_writes_its_own_file(tmp_path):
    """--dtype fp32: the timed variants decode the N(0, std) copy (not one repeated token) and every row equals HF's."""
    assert registry.run("generation-batched", ["--tiny", "--dtype", "fp32", "--device", "cpu", "--repeats", "1",
                                               "--out", str(tmp_path)]) == 0
    assert not (tmp_path / "generation-batched.json").exists()
    result = json.loads((tmp_path / "generation-batched-fp32.json").read_text())
    assert result["setup"]["dtype"] == "torch.float32" and result["headline"]["identical_rows"] == 1.0
    ours = next(r for r in result["rows"] if r["variant"] == gb.OURS)
    assert ours["tokens"] > 0 and ours["identical_rows_vs_hf"] == 1.0


def test_bad_lengths_are_refused_before_any_model_is_built(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "generation-batched", "--tiny", "--min-len", "9", "--max-len", "5"])
    assert exc.value.code == 2
    assert "error: --min-len (9) is above --max-len (5)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["bench", "generation-batched", "--tiny", "--max-len", "60"])          # 60 + 8 > 64 positions
    assert exc.value.code == 2
    assert "exceeds the model's 64 positions" in capsys.readouterr().err


def test_prompts_are_seeded_in_range_and_free_of_eos():
    prompts = gb.make_prompts(32, 3, 9, vocab=11, eos=10, seed=1)
    assert prompts == gb.make_prompts(32, 3, 9, vocab=11, eos=10, seed=1)
    assert {len(p) for p in prompts} <= set(range(3, 10)) and len({len(p) for p in prompts}) > 1
    ids = {t for p in prompts for t in p}
    assert 10 not in ids and ids <= set(range(10))


def test_generated_tokens_count_through_each_rows_eos():
    eos = 7
    out = torch.tensor([[1, 2, 3, 7, 7],      # prompt of 2, then 3 and EOS: 2 tokens
                        [1, 2, 4, 5, 6]])     # no EOS: all 3
    new = gb.new_tokens(out, 2, width=4, pad=eos)
    assert new.tolist() == [[3, 7, 7, 7], [4, 5, 6, 7]]                   # padded to width with the pad id
    assert gb.count_generated(new[:, :3], eos) == 2 + 3


def test_first_divergence_and_spread():
    a = torch.tensor([[1, 2, 3], [1, 2, 3], [4, 4, 4]])
    b = torch.tensor([[1, 2, 3], [1, 9, 3], [5, 4, 4]])
    assert gb.first_divergence(a, b) == [None, 1, 0]
    prompts = [[0] * n for n in (5, 1, 9, 3, 7)]
    assert [len(p) for p in gb.spread(prompts, 3)] == [5, 1, 9]              # shortest, middle, longest (order kept)
    assert len(gb.spread(prompts, 10)) == 5


def test_divergence_gap_is_the_fp32_logit_difference_of_the_two_tokens():
    torch.manual_seed(0)
    model = mf.build_model(gpt2_config(dict(vocab_size=32, n_layer=1, d_model=16, n_head=2, max_seq_len=16))).eval()
    prompts = [[1, 2, 3], [4, 5]]
    ours = torch.tensor([[6, 7, 8], [9, 10, 11]])
    theirs = torch.tensor([[6, 12, 8], [9, 10, 11]])                        # row 0 differs at column 1
    gaps = gb.divergence_gaps(model, prompts, ours, theirs, eos=31, device=torch.device("cpu"))
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 6]]))[0, -1]
    assert gaps == [pytest.approx(abs(float(logits[7] - logits[12])), abs=1e-6)]


def test_compiled_variants_include_the_decode_backends_and_the_bucketed_prefill(monkeypatch):
    """The GPU-only rows (compiled decoder: eager / decode attention, 4 prefill buckets) decode the same greedy
    tokens as the default compiled row (torch.compile replaced by the identity: the decoder's bookkeeping)."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    torch.manual_seed(0)
    model = mf.build_model(gpt2_config(gb.PRESETS["tiny"]["model"])).eval()
    prompts = gb.make_prompts(6, 2, 12, vocab=256, eos=255, seed=0)
    idx, mask = gb.left_pad(prompts, 255)
    fns = gb.variants(model, mf.hf.to_hf(model).eval(), idx, mask, 6, 255, compile_ours=True)
    assert {gb.BUCKETED, *gb.DECODE_BACKENDS.values()} <= set(fns)
    with torch.no_grad():
        ref = fns[gb.OURS]()
        for name in (gb.BUCKETED, *gb.DECODE_BACKENDS.values()):
            assert torch.equal(fns[name](), ref), name
