"""The nanoGPT peer (bench/nanogpt_peer.py) with a stand-in checkout: data files, line parsing, the timed
process, the time-to-loss headline; and the throughput bench's peer rows with a stand-in model.py."""

from __future__ import annotations

import os
import pickletools
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from modformer.bench import throughput
from modformer.bench.nanogpt_peer import (
    PeerTrainProcess,
    load_model_module,
    parse_eval_line,
    run_peer_time_to_loss,
    write_char_data,
)
from modformer.bench.time_to_loss import headline

FAKE_TRAIN = textwrap.dedent("""\
    import sys, time, numpy as np
    train = np.fromfile("data/shakespeare_char/train.bin", dtype=np.uint16)
    val = np.fromfile("data/shakespeare_char/val.bin", dtype=np.uint16)
    print(f"config {sys.argv[1:]} tokens {len(train)} {len(val)} max {int(train.max())}")
    for step, loss in [(0, 4.17), (250, 1.62), (500, 1.4612), (750, 1.41)]:
        print(f"step {step}: train loss {loss + 0.01:.4f}, val loss {loss:.4f}", flush=True)
        print(f"iter {step}: loss {loss:.4f}, time 10.00ms, mfu 1.00%", flush=True)
        time.sleep(0.05)
    time.sleep(60)                              # still running: the bench stops it at the target
""")


def test_parse_eval_line():
    assert parse_eval_line("step 1750: train loss 1.3452, val loss 1.4695\n") == (1750, 1.3452, 1.4695)
    assert parse_eval_line("iter 1750: loss 1.3452, time 10.00ms, mfu 1.00%") is None
    assert parse_eval_line("step 0: train loss nan, val loss nan")[0] == 0


def test_write_char_data_split_and_vocabulary(tmp_path):
    text = "hello world\nto be or not to be\n" * 10
    sizes = write_char_data(tmp_path, text)
    train = np.fromfile(tmp_path / "train.bin", dtype=np.uint16)
    val = np.fromfile(tmp_path / "val.bin", dtype=np.uint16)
    chars = sorted(set(text))
    assert sizes == {"vocab_size": len(chars), "train_tokens": len(train), "val_tokens": len(val)}
    assert len(train) == int(len(text) * 0.9) and len(train) + len(val) == len(text)
    assert "".join(chars[i] for i in np.concatenate([train, val])) == text
    ops = [arg for op, arg, _ in pickletools.genops((tmp_path / "meta.pkl").read_bytes())]   # read, never loaded
    assert "vocab_size" in ops and "stoi" in ops and "itos" in ops and len(chars) in ops


def test_peer_process_times_to_the_first_val_below_target_and_stops_it(tmp_path):
    peer = tmp_path / "nanoGPT"
    (peer / "config").mkdir(parents=True)
    (peer / "train.py").write_text(FAKE_TRAIN)
    (peer / "config" / "train_shakespeare_char.py").write_text("")
    (peer / ".git").mkdir()
    row = run_peer_time_to_loss(peer, "abcdefgh" * 100, 1.47, ["config/train_shakespeare_char.py"],
                                dict(os.environ), max_seconds=30, log=tmp_path / "nanogpt.log")
    assert row["steps_to_target"] == 500 and row["returncode"] == 0
    assert 0 < row["seconds_to_target"] <= row["process_seconds"]
    assert [e["step"] for e in row["evals"]] == [0, 250, 500]          # stopped at the target, not at 750
    assert row["data"] == {"vocab_size": 8, "train_tokens": 720, "val_tokens": 80}
    assert "tokens 720 80 max 7" in (tmp_path / "nanogpt.log").read_text()
    assert not (peer / "data").exists()                                 # the user's checkout is untouched
    rows = [{"name": "muon", "seconds_to_target": 20.0, "steps_to_target": 700},
            {"name": "nanogpt", "seconds_to_target": 100.0, "steps_to_target": 1750, "best_val_loss": 1.46}]
    head = headline(rows, 1.47, "muon")
    assert head["speedup_vs_nanogpt"] == 5.0 and head["seconds_to_target_cold"] == 20.0
    assert head["nanogpt_seconds_to_target"] == 100.0 and head["best_run"] == "muon"
    assert headline(rows, 1.47, "muon", cold=False)["seconds_to_target_cold"] is None


def test_headline_takes_the_median_over_the_headline_runs_seed_repeats():
    """``NAME``, ``NAME_seed1``, ``NAME_seed2`` make the median and its ratio to nanoGPT; other runs (a longer name
    sharing the prefix) stay out, and a repeat that missed the target leaves no median."""
    rows = [{"name": "fast", "seconds_to_target": 30.0}, {"name": "fast_seed1", "seconds_to_target": 40.0},
            {"name": "fast_seed2", "seconds_to_target": 34.0}, {"name": "fast_seedless", "seconds_to_target": 1.0},
            {"name": "fast_grouped_seed1", "seconds_to_target": 2.0},
            {"name": "nanogpt", "seconds_to_target": 68.0, "steps_to_target": 1750, "best_val_loss": 1.46}]
    head = headline(rows, 1.47, "fast")
    assert head["seed_runs"] == ["fast", "fast_seed1", "fast_seed2"]
    assert head["median_seconds_to_target"] == 34.0 and head["median_speedup_vs_nanogpt"] == 2.0
    assert head["seconds_to_target"] == 30.0                          # the headline run itself, as before
    rows[1]["seconds_to_target"] = None
    assert headline(rows, 1.47, "fast")["median_seconds_to_target"] is None
    assert "median_seconds_to_target" not in headline(rows[-1:] + rows[:1], 1.47, "fast")


def test_peer_process_that_never_reaches_the_target(tmp_path):
    (tmp_path / "train.py").write_text("print('step 0: train loss 4.0, val loss 4.1')\n")
    run = PeerTrainProcess(tmp_path, [], 1.47, dict(os.environ), max_seconds=30).run()
    assert run.t_target is None and run.row()["best_val_loss"] == 4.1 and run.row()["returncode"] == 0


FAKE_MODEL = textwrap.dedent("""\
    from dataclasses import dataclass
    import torch, torch.nn as nn, torch.nn.functional as F

    @dataclass
    class GPTConfig:
        block_size: int = 1024
        vocab_size: int = 50304
        n_layer: int = 12
        n_head: int = 12
        n_embd: int = 768
        dropout: float = 0.0
        bias: bool = True

    class GPT(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.emb = nn.Embedding(config.vocab_size, config.n_embd)
            self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)

        def forward(self, idx, targets=None):
            logits = self.head(self.emb(idx))
            loss = None if targets is None else F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
            return logits, loss

        def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
            return torch.optim.AdamW(self.parameters(), lr=learning_rate, betas=betas, weight_decay=weight_decay)
""")


def test_throughput_peer_rows_and_no_cpu_speedups(tmp_path, monkeypatch):
    (tmp_path / "model.py").write_text(FAKE_MODEL)
    module = load_model_module(tmp_path)
    assert module.GPTConfig().n_embd == 768
    assert sys.modules[module.__name__] is module       # torch.compile imports a traced function's module by name
    with pytest.raises(SystemExit, match="no model.py"):
        load_model_module(tmp_path / "missing")
    monkeypatch.chdir(tmp_path)
    common = ["--preset", "tiny", "--steps", "1", "--no-compile", "--peer-nanogpt", str(tmp_path)]
    with pytest.raises(SystemExit, match="matches none"):
        throughput.main([*common, "--variant", "no such variant"])
    assert throughput.main([*common, "--variant", "FP32", "--variant", "nanogpt", "--out", str(tmp_path / "out")]) == 0
    import json

    result = json.loads((tmp_path / "out" / "throughput.json").read_text())
    variants = [r["variant"] for r in result["rows"]]
    assert variants == ["modformer fp32", "nanoGPT GPT (bench.py setting)"]
    head = result["headline"]
    assert head["nanogpt_tokens_per_s"] > 0
    assert head["speedup_vs_nanogpt"] is None and head["speedup_vs_hf"] is None   # CPU: no speed-up claimed
    assert head["fp8_loss_gap"] is None


def test_fp8_loss_gap_runs_both_precisions_on_the_same_batches(monkeypatch, tmp_path):
    from modformer.bench.fp8_gap import fp8_loss_gap

    monkeypatch.setenv("MODFORMER_FP8_CPU", "1")            # _scaled_mm's CPU kernel (toy scale)
    config = str(Path(__file__).resolve().parents[1] / "configs" / "shakespeare_char.yaml")
    gap, rows = fp8_loss_gap(config, 4, ["model.n_layer=1", "model.d_model=32", "model.n_head=2",
                                         "train.batch_size=8", "data.seq_len=32", "train.compile=false"], "cpu",
                             log_every=1, precisions=("fp8", "fp8_rowwise"))
    assert [r["variant"] for r in rows] == ["loss curve bf16", "loss curve fp8", "loss curve fp8_rowwise"]
    assert gap == rows[1]["relative_gap"] and rows[2]["relative_gap"] is not None
    assert [c["step"] for c in rows[1]["curve"]] == [1, 2, 3, 4]
    # step 1's loss is measured before any update: same weights and batch, so the runs differ only by FP8 matmuls
    # in the MLP (the 65-way head stays bf16); a few percent at most at this size
    assert abs(rows[1]["first_loss"] - rows[0]["first_loss"]) < 0.05 * rows[0]["first_loss"]
    assert gap is not None and abs(gap) < 0.1
