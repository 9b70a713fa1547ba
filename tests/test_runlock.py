"""One writer per run folder, and a refused request leaves the run folder as it was."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import modformer as mf
from modformer.cli import main
from modformer.config import DataConfig, ModelConfig, RunConfig, TrainConfig, save_yaml
from modformer.train.runlock import LOCK_NAME, RunInUseError, RunLock, holder_pid
from modformer.train.trainer import Trainer

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="run locks use fcntl")


def tiny_cfg(tmp_path: Path, name: str = "r", **train) -> RunConfig:
    t = dict(steps=4, batch_size=16, lr=1e-3, eval_every=2, eval_batches=0, log_every=2, checkpoint_every=2,
             progress=False, tensorboard=False, seed=0, device="cpu")
    t.update(train)
    return RunConfig(name=name, out_dir=str(tmp_path),
                     model=ModelConfig(n_layer=1, d_model=16, n_head=2, max_seq_len=8),
                     data=DataConfig(name="modular", options={"p": 7, "train_fraction": 0.5}),
                     train=TrainConfig(**t))


def tree_digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (but the lock) mapped to a hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != LOCK_NAME}


@pytest.fixture
def holder(tmp_path):
    """A live process holding ``tmp_path/r``'s lock, as a second `modformer train` would."""
    code = ("import sys, time; from modformer.train.runlock import RunLock; "
            "lock = RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "r")], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    yield proc
    proc.kill()
    proc.wait()


def test_second_writer_overwrite_and_resume_of_a_live_run_are_refused(tmp_path, holder, capsys):
    path = tmp_path / "c.yaml"
    save_yaml(tiny_cfg(tmp_path), path)
    before = tree_digest(tmp_path / "r")
    for extra in ([], ["--overwrite"], ["--resume"]):
        assert main(["train", str(path), *extra]) == 2
        err = capsys.readouterr().err.strip()
        if extra == ["--resume"]:
            assert "cannot resume" in err          # nothing to resume: refused before the lock is even tried
        else:
            assert err.count("\n") == 0 and f"PID {holder.pid}" in err and "in use" in err
    assert tree_digest(tmp_path / "r") == before
    assert holder_pid(tmp_path / "r") == holder.pid


def test_overwrite_of_a_live_run_keeps_its_files(tmp_path):
    cfg = tiny_cfg(tmp_path)
    Trainer(cfg).fit()
    before = tree_digest(tmp_path / "r")
    lock = RunLock(tmp_path / "r").acquire()        # another writer is (still) at work
    try:
        for kw in ({"overwrite": True}, {"resume": True}):
            with pytest.raises(RunInUseError, match=f"PID {os.getpid()}"):
                Trainer(tiny_cfg(tmp_path, steps=6), **kw)
        assert tree_digest(tmp_path / "r") == before
    finally:
        lock.release()
    Trainer(tiny_cfg(tmp_path, steps=6), resume=True).fit()      # free again: resume works
    assert holder_pid(tmp_path / "r") is None


def test_lock_of_a_killed_process_is_taken_over(tmp_path):
    code = ("import sys, time; from modformer.train.runlock import RunLock; "
            "lock = RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "r")], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    assert holder_pid(tmp_path / "r") == proc.pid
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (tmp_path / "r" / LOCK_NAME).read_text().strip() == str(proc.pid)   # the stale file is still there
    assert holder_pid(tmp_path / "r") is None
    summary = Trainer(tiny_cfg(tmp_path)).fit()
    assert summary["steps"] == 4


def test_refused_resume_leaves_config_yaml_untouched(tmp_path, capsys):
    Trainer(tiny_cfg(tmp_path)).fit()
    before = tree_digest(tmp_path / "r")
    path = tmp_path / "c.yaml"
    save_yaml(tiny_cfg(tmp_path), path)
    assert main(["train", str(path), "--resume", "data.options.train_fraction=0.6"]) == 2
    err = capsys.readouterr().err
    assert "data config differs" in err and "only train.*" in err
    assert main(["train", str(path), "--resume", "model.d_model=32"]) == 2
    assert "model config differs" in capsys.readouterr().err
    assert tree_digest(tmp_path / "r") == before
    model = mf.load(tmp_path / "r" / "checkpoints" / "step_0000004")
    assert model.cfg.d_model == 16


def test_run_folder_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "r").write_text("not a folder")
    with pytest.raises(mf.ConfigError, match="not a folder"):
        Trainer(tiny_cfg(tmp_path))
    assert (tmp_path / "r").read_text() == "not a folder"
