"""train.deterministic: bit-identical runs and resumes; a SIGKILLed run resumes to the uninterrupted result."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch
from _helpers import Kill, kill_at

import modformer as mf
from modformer.bench.studies.reliability import final_state, kill_trial, train, write_config
from modformer.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from modformer.train import checkpoint as ckpt
from modformer.train.trainer import Trainer


def det_cfg(tmp_path: Path, name: str, **train_kw) -> RunConfig:
    t = dict(steps=8, batch_size=32, lr=3e-3, eval_every=4, eval_batches=0, log_every=2, checkpoint_every=4,
             progress=False, tensorboard=False, seed=5, device="cpu", deterministic=True, threads=2)
    t.update(train_kw)
    return RunConfig(name=name, out_dir=str(tmp_path), model=ModelConfig(n_layer=1, d_model=32, n_head=2,
                     max_seq_len=8), data=DataConfig(name="modular", options={"p": 13, "train_fraction": 0.5}),
                     train=TrainConfig(**t))


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return mf.load(ckpt.latest_checkpoint(run_dir / "checkpoints")).state_dict()


def test_deterministic_run_uses_one_thread_and_restores_the_process_settings(tmp_path):
    threads_before, det_before = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    seen = []
    Trainer(det_cfg(tmp_path, "a"), callbacks=[lambda tr, step: seen.append(
        (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()))]).fit()
    assert set(seen) == {(1, True)}
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == (threads_before, det_before)


def test_deterministic_runs_and_resumes_are_bit_identical(tmp_path):
    Trainer(det_cfg(tmp_path, "a")).fit()
    Trainer(det_cfg(tmp_path, "b")).fit()
    with pytest.raises(Kill):
        Trainer(det_cfg(tmp_path, "c"), callbacks=[kill_at(6)]).fit()
    Trainer(det_cfg(tmp_path, "c"), resume=True).fit()
    wa = weights(tmp_path / "a")
    for other in ("b", "c"):
        wb = weights(tmp_path / other)
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_sigkilled_training_resumes_to_the_uninterrupted_result(tmp_path):
    """One trial of `modformer bench reliability`: kill -9 mid-run (saving every step), check, resume, compare."""
    config = write_config(tmp_path, checkpoint_every=1)
    t0 = time.perf_counter()
    assert train(config, "reference").returncode == 0
    wall = time.perf_counter() - t0
    reference = final_state(tmp_path / "reference")
    row = kill_trial(config, "killed", 0.7 * wall, reference)
    assert row["problem"] is None and row["identical"], row
