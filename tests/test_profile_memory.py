"""``train.profile_memory``: torch.profiler with profile_memory=True over a few steps -> trace + memory table."""

import json
from pathlib import Path

import torch

from modformer.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from modformer.train.profiling import cpu_peak_bytes
from modformer.train.trainer import Trainer


def cfg(tmp_path: Path, name: str, **train) -> RunConfig:
    t = dict(steps=4, batch_size=16, eval_every=4, eval_batches=1, log_every=2, progress=False, tensorboard=False,
             device="cpu", optimizer_options={})
    t.update(train)
    return RunConfig(name=name, out_dir=str(tmp_path),
                     model=ModelConfig(n_layer=1, d_model=32, n_head=2, max_seq_len=8),
                     data=DataConfig(name="modular", options={"p": 13, "train_fraction": 0.5}),
                     train=TrainConfig(**t))


def test_profile_memory_writes_trace_with_allocations_and_a_memory_table(tmp_path):
    """Without profile_steps it traces steps 1-3: three optimizer steps, [memory] events in the trace, and a
    table whose peak is at least the Adam state created in step 1 (two fp32 moments per parameter)."""
    trainer = Trainer(cfg(tmp_path, "m", profile_memory=True))
    n_params = sum(p.numel() for p in trainer.raw_model.parameters())
    trainer.fit()
    out = tmp_path / "m" / "profile"
    trace = json.loads((out / "rank0_trace.json").read_text())
    assert len([e for e in trace["traceEvents"] if e.get("name") == "Optimizer.step#AdamW.step"]) == 3
    assert any(e.get("name") == "[memory]" for e in trace["traceEvents"])
    text = (out / "rank0_memory.txt").read_text()
    assert text.startswith("train.profile_memory: steps 1-3\n")
    assert "Self CPU Mem" in text and "aten::" in text
    peak_mib = float(text.splitlines()[1].split(": ")[1].split()[0].replace(",", ""))
    assert peak_mib >= 2 * 4 * n_params / 2**20 * 0.99


def test_profile_memory_with_a_range_and_an_early_end(tmp_path):
    """An explicit range is kept; a run shorter than the default range closes the profile at its last step."""
    Trainer(cfg(tmp_path, "r", steps=6, profile_steps=(5, 6), profile_memory=True)).fit()
    assert (tmp_path / "r" / "profile" / "rank0_memory.txt").read_text().startswith("train.profile_memory: steps 5-6")
    Trainer(cfg(tmp_path, "short", steps=2, eval_every=2, profile_memory=True)).fit()
    assert (tmp_path / "short" / "profile" / "rank0_memory.txt").read_text().startswith(
        "train.profile_memory: steps 1-2")
    Trainer(cfg(tmp_path, "plain", steps=2, eval_every=2)).fit()
    assert not (tmp_path / "plain" / "profile").exists()            # off by default: nothing written


def test_cpu_peak_is_the_running_sum_of_allocation_events():
    """Two live 1 MiB tensors, one freed, then another: the running sum peaks at 2 MiB."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        a = torch.empty(2**18)                 # 1 MiB of float32
        b = torch.empty(2**18)
        del a
        c = torch.empty(2**18)
        del b, c
    assert abs(cpu_peak_bytes(prof) - 2 * 2**20) < 2**16
