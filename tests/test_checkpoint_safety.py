"""Checkpoints and storage: no pickle anywhere, one atomic write path (disk full -> one line), an honest
NaN guard, fallback past corrupt checkpoints, signed config.json, one resolver for model addresses."""

import errno
import json
import os
import pickle
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers import Kill, kill_at, strip

import modformer as mf
from modformer import cli, utils
from modformer.config import DataConfig, ModelConfig, RunConfig, TrainConfig, load_config, save_yaml
from modformer.train import checkpoint as ckpt
from modformer.train.logging import read_metrics
from modformer.train.state_codec import decode, encode
from modformer.train.trainer import Trainer, TrainingError

SRC = Path(__file__).parents[1] / "src"


def run_cfg(out: Path, name: str = "r", **train) -> RunConfig:
    t = dict(steps=12, batch_size=32, lr=3e-3, eval_every=4, eval_batches=0, log_every=2, checkpoint_every=4,
             progress=False, tensorboard=False, seed=3, device="cpu", schedule="cosine", warmup_steps=2)
    t.update(train)
    return RunConfig(name=name, out_dir=str(out), model=ModelConfig(n_layer=1, d_model=32, n_head=2, max_seq_len=8),
                     data=DataConfig(name="modular", options={"p": 13, "train_fraction": 0.5}), train=TrainConfig(**t))


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory, one_thread):
    """A 12-step run killed after step 8: checkpoints step_4 and step_8, metrics up to step 8."""
    out = tmp_path_factory.mktemp("base")
    with pytest.raises(Kill):
        Trainer(run_cfg(out), callbacks=[kill_at(8)]).fit()
    return out / "r"


@pytest.fixture
def run(killed_run, tmp_path):
    """A private copy of the killed run and a CLI config file pointing at it."""
    dst = tmp_path / "runs" / "r"
    shutil.copytree(killed_run, dst, ignore=shutil.ignore_patterns(".lock"))
    cfg = load_config(dst / "config.yaml")
    cfg.out_dir, cfg.name = str(dst.parent), "r"
    save_yaml(cfg, tmp_path / "cfg.yaml")
    return dst


def main(capsys, *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    rc = cli.main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


# ---- trainer state without pickle --------------------------------------------------------------------
def test_state_codec_round_trips_exactly(tmp_path):
    random.seed(5)
    np.random.seed(5)
    state = {"step": 7, "rng": ckpt.rng_state(), "gen": torch.Generator().manual_seed(3).get_state(),
             "optimizer": {"state": {0: {"step": torch.tensor(4.0), "exp_avg": torch.randn(3, 2)}},
                           "param_groups": [{"params": [0], "betas": (0.9, 0.95), "lr": 1e-3, "foreach": None}]},
             "bf16": torch.randn(4).bfloat16(), "empty": torch.zeros(0, 3), "best": {"val_loss": float("inf")},
             "nested": [(1, "a", None), {"__tensor__": "not a tensor"}], "flag": True}
    ckpt.write_trainer_state(tmp_path, state)
    back = ckpt.load_trainer_state(tmp_path)

    def same(a, b):
        assert type(a) is type(b), (a, b)
        if isinstance(a, torch.Tensor):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        elif isinstance(a, np.ndarray):
            assert a.dtype == b.dtype and np.array_equal(a, b)
        elif isinstance(a, dict):
            assert list(a) == list(b)
            for k in a:
                same(a[k], b[k])
        elif isinstance(a, list | tuple):
            assert len(a) == len(b)
            for x, y in zip(a, b, strict=True):
                same(x, y)
        else:
            assert a == b
    same(state, back)
    ckpt.set_rng_state(back["rng"])                  # the restored RNG states are accepted and replay exactly
    draws = (torch.rand(2), np.random.rand(), random.random())
    ckpt.set_rng_state(back["rng"])
    assert torch.equal(draws[0], torch.rand(2)) and draws[1:] == (np.random.rand(), random.random())
    with pytest.raises(TypeError, match="without pickle"):
        encode({"x": object()})
    with pytest.raises(ckpt.CheckpointError, match="dtype object"):
        decode({"__ndarray__": [1], "dtype": "|O"}, {})


def test_checkpoint_folders_hold_no_pickle(killed_run):
    for path in ckpt.checkpoint_candidates(killed_run / "checkpoints"):
        names = sorted(p.name for p in path.iterdir())
        assert names == ["config.json", "model.safetensors", "trainer_state.json", "trainer_state.safetensors"]
        for f in path.iterdir():
            head = f.read_bytes()[:2]
            assert head[:1] != b"\x80" and head != b"PK", f      # neither a pickle nor a torch.save zip
        assert ckpt.read_checkpoint(path).state["step"] in (4, 8)


class Payload:
    """Unpickling this creates ``marker``: the proof that a loader executed code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(file: Path, marker: Path) -> None:
    if file.suffix == ".pt":
        torch.save({"step": 8, "rng": Payload(marker)}, file)
    else:
        file.write_bytes(pickle.dumps({"step": 8, "payload": Payload(marker)}))


@pytest.mark.parametrize("target", ["model.safetensors", "config.json", "trainer_state.json",
                                    "trainer_state.safetensors", "latest", "everything"])
def test_planted_pickle_payload_never_runs(run, tmp_path, capsys, target):
    marker = tmp_path / "PWNED"
    pickle.loads(pickle.dumps(Payload(marker)))               # the payload is live ...
    assert marker.exists()
    marker.unlink()
    root = run / "checkpoints"
    if target == "everything":
        files = [root / "latest"] + [f for d in root.glob("step_*") for f in d.iterdir()]
    else:
        files = [root / target if target == "latest" else root / "step_0000008" / target]
    for f in files + [root / "step_0000008" / "trainer_state.pt", root / "step_0000004" / "trainer_state.pt"]:
        plant(f, marker)
    outcomes = [main(capsys, "eval", run),
                main(capsys, "generate", run, "--prompt", "3 5 =", "--max-new-tokens", "1"),
                main(capsys, "circuits", run, "--out", tmp_path / "circuits")]
    try:
        mf.load(run)
    except (mf.ConfigError, ckpt.CheckpointError) as e:
        assert target == "everything" and "\n" not in str(e)
    outcomes.append(main(capsys, "train", tmp_path / "cfg.yaml", "--resume"))     # last: it rewrites the run
    assert not marker.exists()                                # ... and nothing we load ever ran it
    for i, (rc, err) in enumerate(outcomes):
        assert "Traceback" not in err
        if target == "everything":
            assert rc == 2 and "no usable checkpoint" in one_error_line(err)
        else:
            assert rc == 0, err
            if i == 3 or "trainer_state" not in target:        # (eval & co. read no trainer state)
                assert "warning: skipped" in err and "using" in err   # fell back, saying which and why


def test_old_pickled_trainer_state_is_refused_in_one_line(run, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    for d in (run / "checkpoints").glob("step_*"):
        for name in (ckpt.STATE_JSON, ckpt.STATE_TENSORS):
            (d / name).unlink()
        plant(d / ckpt.LEGACY_STATE, marker)
    rc, err = main(capsys, "train", tmp_path / "cfg.yaml", "--resume")
    assert rc == 2 and not marker.exists()
    assert "pickled trainer state from an older modformer; it is not loaded" in one_error_line(err)
    assert main(capsys, "eval", run)[0] == 0              # the weights themselves are safetensors: still usable


# ---- resume / load fall back past corrupt checkpoints -----------------------------------------------
@pytest.mark.parametrize("damage", ["truncated_weights", "empty_weights", "garbage_state", "state_misfit"])
def test_resume_falls_back_to_the_newest_checkpoint_that_verifies(run, tmp_path, capsys, damage):
    step8 = run / "checkpoints" / "step_0000008"
    if damage == "truncated_weights":
        data = (step8 / "model.safetensors").read_bytes()
        (step8 / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "empty_weights":
        (step8 / "model.safetensors").write_bytes(b"")
    elif damage == "garbage_state":
        (step8 / ckpt.STATE_JSON).write_text("{not json")
    else:                                                # parses, but its optimizer is not this run's
        doc = json.loads((step8 / ckpt.STATE_JSON).read_text())
        doc["state"]["optimizer"]["param_groups"] = doc["state"]["optimizer"]["param_groups"][:1]
        (step8 / ckpt.STATE_JSON).write_text(json.dumps(doc))
    rc, err = main(capsys, "train", tmp_path / "cfg.yaml", "--resume")
    assert rc == 0 and "Traceback" not in err
    skipped = [ln for ln in err.splitlines() if ln.startswith("warning: skipped")]
    assert len(skipped) == 1 and "step_0000008" in skipped[0] and skipped[0].endswith("step_0000004"), err
    full = Trainer(run_cfg(tmp_path / "ref")).fit()      # resuming from step 4 reproduces the unbroken run
    assert full["steps"] == 12
    assert strip(read_metrics(run / "metrics.jsonl")) == strip(read_metrics(tmp_path / "ref" / "r" / "metrics.jsonl"))
    a, b = mf.load(run).state_dict(), mf.load(tmp_path / "ref" / "r").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_corrupt_latest_pointer_falls_back(run, capsys):
    (run / "checkpoints" / "latest").write_bytes(b"\xff\xfe../../etc")
    model = mf.load(run / "checkpoints" / "latest")
    err = capsys.readouterr().err
    assert "warning: skipped latest (" in err and "is unreadable or names no checkpoint folder); using" in err
    assert err.rstrip().endswith("step_0000008")
    want = mf.load(run / "checkpoints" / "step_0000008").state_dict()
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())


def test_bad_saved_model_folders_give_one_line(tmp_path):
    model = mf.build_model(ModelConfig(vocab_size=16, n_layer=1, d_model=32, n_head=2, max_seq_len=8))
    good = mf.save(model, tmp_path / "good")

    def broken(name, edit):
        d = tmp_path / name
        shutil.copytree(good, d)
        edit(d)
        return d

    def unsign_and(change):
        def edit(d):
            cfg = json.loads((d / "config.json").read_text())
            del cfg["_signature"]
            (d / "config.json").write_text(json.dumps(change(cfg)))
        return edit

    cases = {
        "list": (lambda d: (d / "config.json").write_text("[1, 2]"), mf.ConfigError, "holds a JSON list"),
        "not_json": (lambda d: (d / "config.json").write_text("{"), mf.ConfigError, "not valid JSON"),
        "truncated": (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:300]),
                      ckpt.CheckpointError, "truncated or not a safetensors file"),
        "empty": (lambda d: (d / "model.safetensors").write_bytes(b""), ckpt.CheckpointError, "truncated"),
        "no_weights": (lambda d: (d / "model.safetensors").unlink(), FileNotFoundError, "no model.safetensors"),
        "shapes": (unsign_and(lambda c: {**c, "d_model": 64}), ckpt.CheckpointError, "does not fit the model"),
        "unknown_key": (unsign_and(lambda c: {**c, "d_modle": 64}), mf.ConfigError, "did you mean 'd_model'"),
    }
    for name, (edit, error, text) in cases.items():
        with pytest.raises(error, match=text) as e:
            mf.load(broken(name, edit))
        assert "\n" not in str(e.value), name


# ---- signed config.json --------------------------------------------------------------------------------
def test_config_edited_after_saving_is_refused_and_unsigned_folders_still_load(tmp_path):
    model = mf.build_model(ModelConfig(vocab_size=16, n_layer=1, d_model=32, n_head=2, max_seq_len=8))
    path = mf.save(model, tmp_path / "m")
    saved = json.loads((path / "config.json").read_text())
    assert saved["_signature"].startswith("sha256:")
    for key, value in (("ffn", "relu"), ("dropout", 0.3), ("norm_eps", 1e-3)):   # shapes still fit
        assert saved[key] != value
        (path / "config.json").write_text(json.dumps({**saved, key: value}))
        with pytest.raises(mf.ConfigError, match="does not match its signature: it was edited after saving"):
            mf.load(path)
    other = mf.build_model(ModelConfig(vocab_size=16, n_layer=1, d_model=32, n_head=2, max_seq_len=8, ffn="relu"))
    mf.save(other, tmp_path / "o")                            # weights from elsewhere, same names and shapes:
    (path / "config.json").write_text(json.dumps(saved))     # the config is the saved one, so it loads
    shutil.copy(tmp_path / "o" / "model.safetensors", path / "model.safetensors")
    assert torch.equal(mf.load(path).tok_emb.weight, other.tok_emb.weight)
    (path / "config.json").write_text(json.dumps({k: v for k, v in saved.items() if k != "_signature"}))
    assert mf.load(path).cfg == model.cfg                    # a folder saved before signatures existed


# ---- the NaN guard -------------------------------------------------------------------------------------
def test_nan_guard_never_calls_diverged_weights_good(tmp_path, capsys):
    """The issue's scenario (checkpoint every step, log every step, huge lr): the old guard checked the
    training loss, measured before the update, so it saved the diverged weights as the last good checkpoint."""
    trainer = Trainer(run_cfg(tmp_path, steps=60, lr=1e3, checkpoint_every=1, log_every=1, eval_every=1000,
                              warmup_steps=0, schedule="constant"))
    with pytest.raises(TrainingError, match=r"^step (\d+): the loss of the weights on a fixed validation batch is "
                                            r"not finite; checkpoint not written, .*last good checkpoint kept: ") as e:
        trainer.fit()
    bad_step = trainer.step
    kept = ckpt.latest_checkpoint(tmp_path / "r" / "checkpoints")
    assert f"kept: {kept}" in str(e.value) and kept.name == f"step_{bad_step - 1:07d}"
    rows = [r for r in read_metrics(tmp_path / "r" / "metrics.jsonl") if r["split"] == "train"]
    assert rows[-1]["step"] == bad_step and np.isfinite(rows[-1]["loss"])   # the old guard would have saved it
    assert not np.isfinite(trainer._probe_loss(trainer.raw_model))
    capsys.readouterr()
    assert cli.main(["eval", str(tmp_path / "r"), "--json"]) == 0                      # the kept one evaluates finite
    assert np.isfinite(json.loads(capsys.readouterr().out)["loss"])


def test_eval_and_generate_on_non_finite_weights_say_so(run, capsys):
    model = mf.load(run)
    with torch.no_grad():
        model.blocks[0].mlp.up.weight[0, 0] = float("nan")
    for d in (run / "checkpoints").glob("step_*"):
        mf.save(model, d)                                     # properly signed, just diverged
    step8 = run / "checkpoints" / "step_0000008"
    for argv in (["eval", step8], ["generate", step8, "--prompt", "3 5 ="], ["eval", run]):
        rc, err = main(capsys, *argv)
        line = one_error_line(err)
        assert rc == 2 and "holds non-finite weights (NaN/inf in 1 of" in line and "blocks.0.mlp.up.weight" in line
    assert torch.isnan(mf.load(step8).blocks[0].mlp.up.weight).any()   # the library still loads what is there


# ---- addressing ------------------------------------------------------------------------------------------
def test_every_model_address_resolves(run, tmp_path, capsys):
    want = mf.load(run / "checkpoints" / "step_0000008").state_dict()
    for address in (run, run / "checkpoints", run / "checkpoints" / "latest"):
        got = mf.load(address).state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want), address
    inside = mf.save(mf.load(run), run / "pruned_heads_0.5")          # a saved model kept in its run folder
    for argv in (["eval", inside, "--max-batches", "1"], ["generate", inside, "--prompt", "3 5 =",
                                                          "--max-new-tokens", "1"]):
        assert main(capsys, *argv)[0] == 0
    outside = shutil.copytree(inside, tmp_path / "elsewhere")
    errors = [main(capsys, "eval", outside), main(capsys, "generate", outside, "--prompt", "3 5 =")]
    assert {rc for rc, _ in errors} == {2}
    assert one_error_line(errors[0][1]) == one_error_line(errors[1][1])
    assert "saved model outside any run folder" in errors[0][1]


# ---- disk full: one line, nothing partial, the earlier checkpoint intact -----------------------------
def fail_nth_write(monkeypatch, name: str, nth: int) -> None:
    """The ``nth`` write of a file called ``name`` writes half its bytes, then the disk is full."""
    real, seen = utils._produce, {"n": 0}

    def produce(write, tmp):
        if Path(tmp).name.startswith(f".{name}."):
            seen["n"] += 1
            if seen["n"] == nth:
                write(tmp)
                data = Path(tmp).read_bytes()
                Path(tmp).write_bytes(data[: len(data) // 2])
                raise OSError(errno.ENOSPC, "No space left on device")
        real(write, tmp)

    monkeypatch.setattr(utils, "_produce", produce)


SITES = {   # file -> (which write fails, overrides, checkpoint left newest)
    "model.safetensors": (2, [], 4), "config.json": (2, [], 4), "trainer_state.safetensors": (2, [], 4),
    "trainer_state.json": (2, [], 4), "raw_model.safetensors": (2, ["train.ema_decay=0.9"], 4),
    "latest": (2, [], 4), "config.yaml": (1, [], None), "summary.json": (1, [], 12), "report.md": (1, [], 12),
    "loss.png": (1, [], 12), "metrics.jsonl": (4, [], 4), "tb": (6, ["train.tensorboard=true"], 4),
}


@pytest.mark.parametrize("site", list(SITES))
def test_disk_full_at_each_write_site(tmp_path, monkeypatch, capsys, site):
    nth, overrides, newest = SITES[site]
    if site == "metrics.jsonl":                         # appended rows: the 4th append writes half a row
        real, seen = utils._append_bytes, {"n": 0}

        def append(fd, data):
            seen["n"] += 1
            if seen["n"] == nth:
                os.write(fd, data[: len(data) // 2])
                raise OSError(errno.ENOSPC, "No space left on device")
            real(fd, data)
        monkeypatch.setattr(utils, "_append_bytes", append)
    elif site == "tb":
        from torch.utils.tensorboard import SummaryWriter

        def add_scalar(self, tag, value, step):
            if step >= nth:
                raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(SummaryWriter, "add_scalar", add_scalar)
    else:
        fail_nth_write(monkeypatch, site, nth)
    save_yaml(run_cfg(tmp_path / "runs"), tmp_path / "cfg.yaml")
    rc, err = main(capsys, "train", tmp_path / "cfg.yaml", *overrides)
    line = one_error_line(err)
    assert rc == 2 and line.startswith("error: no space left on device while writing ") and site in line, err
    run = tmp_path / "runs" / "r"
    assert not [p for p in run.rglob("*") if "tmp" in p.name], "partial files left behind"
    if newest is None:
        assert not (run / "checkpoints").exists()
    else:
        if site in ("model.safetensors", "config.json", "trainer_state.safetensors", "trainer_state.json",
                    "raw_model.safetensors", "latest"):
            where = run / "checkpoints" / (site if site == "latest" else f"step_0000008/{site}")
            assert line == (f"error: no space left on device while writing {where}; checkpoint of step 8 not saved, "
                            f"last good checkpoint kept: {run / 'checkpoints' / 'step_0000004'}")
        assert ckpt.read_checkpoint(ckpt.latest_checkpoint(run / "checkpoints")).state["step"] == newest
    for row in read_metrics(run / "metrics.jsonl") if (run / "metrics.jsonl").exists() else []:
        assert row["step"] <= 12                        # every line parses: no half-written row


def test_real_small_disk(tmp_path, killed_run):
    """A tmpfs with room for one checkpoint only, in a private mount namespace (skipped where not allowed)."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare not available")
    size = sum(f.stat().st_size for f in (killed_run / "checkpoints" / "step_0000004").iterdir())
    disk = tmp_path / "disk"
    disk.mkdir()
    probe = subprocess.run(["unshare", "-Urm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {disk}"],
                           capture_output=True, text=True)
    if probe.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {probe.stderr.strip()}")
    save_yaml(run_cfg(disk, steps=8), tmp_path / "cfg.yaml")
    script = (f"mount -t tmpfs -o size={int(size * 1.5) // 1024 + 16}k tmpfs {disk} && "
              f"{sys.executable} -m modformer.cli train {tmp_path / 'cfg.yaml'} 2> {tmp_path / 'err'}; "
              f"echo $? > {tmp_path / 'rc'}; cp -a {disk}/r {tmp_path}/after")   # the tmpfs ends with the namespace
    subprocess.run(["unshare", "-Urm", "sh", "-c", script], env={**os.environ, "PYTHONPATH": str(SRC)},
                   timeout=300, check=True)
    err = (tmp_path / "err").read_text()
    assert (tmp_path / "rc").read_text().strip() == "2", err
    assert one_error_line(err).startswith("error: no space left on device while writing ")
    after = tmp_path / "after"
    assert not [p for p in after.rglob("*") if "tmp" in p.name]
    assert ckpt.newest_checkpoint(after / "checkpoints").state["step"] == 4      # intact and verified


# ---- files: umask, durability, TensorBoard trouble --------------------------------------------------------
@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_written_files_follow_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        model = mf.build_model(ModelConfig(vocab_size=16, n_layer=1, d_model=32, n_head=2, max_seq_len=8))
        path = ckpt.save_checkpoint(tmp_path, 1, model, {"step": 1})
        utils.append_text(tmp_path / "metrics.jsonl", "{}\n")
    finally:
        os.umask(old)
    files = [tmp_path / "latest", tmp_path / "metrics.jsonl", *path.iterdir()]
    assert {f.stat().st_mode & 0o777 for f in files} == {0o666 & ~mask}


def test_checkpoint_commit_fsyncs_files_and_folders(tmp_path, monkeypatch):
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name file descriptors")
    synced, real = [], os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    model = mf.build_model(ModelConfig(vocab_size=16, n_layer=1, d_model=32, n_head=2, max_seq_len=8))
    ckpt.save_checkpoint(tmp_path, 3, model, {"step": 3})
    tmp = str(tmp_path / ".tmp_step_0000003")
    assert {str(tmp_path), tmp} <= set(synced)                                   # both folders
    files = {re.sub(r"/\.([^/]+)\.[0-9a-f]{8}\.tmp$", r"/\1", s) for s in synced}   # (their temporary names)
    assert {f"{tmp}/{n}" for n in ("model.safetensors", "config.json", ckpt.STATE_JSON)} <= files


def test_tensorboard_failure_other_than_a_full_disk_only_disables_it(tmp_path, monkeypatch, capsys):
    from torch.utils.tensorboard import SummaryWriter

    def add_scalar(self, tag, value, step):
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(SummaryWriter, "add_scalar", add_scalar)
    save_yaml(run_cfg(tmp_path, steps=4, tensorboard=True), tmp_path / "cfg.yaml")
    rc, err = main(capsys, "train", tmp_path / "cfg.yaml")
    assert rc == 0 and "Traceback" not in err
    assert err.count("warning: TensorBoard disabled (input/output error while writing") == 1
    assert read_metrics(tmp_path / "r" / "metrics.jsonl")[-1]["step"] == 4


# ---- Ctrl-C ---------------------------------------------------------------------------------------------
def test_ctrl_c_names_the_newest_verified_checkpoint_or_none(run, tmp_path, monkeypatch, capsys):
    def interrupted(self):
        raise KeyboardInterrupt
    monkeypatch.setattr(Trainer, "fit", interrupted)
    rc, err = main(capsys, "train", tmp_path / "cfg.yaml", "--resume")
    assert rc == 130 and f"newest verified checkpoint: {run / 'checkpoints' / 'step_0000008'}" in err
    (run / "checkpoints" / "step_0000008" / "model.safetensors").write_bytes(b"")
    assert "step_0000004" in main(capsys, "train", tmp_path / "cfg.yaml", "--resume")[1]
    save_yaml(run_cfg(tmp_path / "fresh"), tmp_path / "fresh.yaml")
    rc, err = main(capsys, "train", tmp_path / "fresh.yaml")
    assert rc == 130 and "no verified checkpoint exists" in err


# ---- kill -9 while saving ----------------------------------------------------------------------------------
SAVER = """
import sys, torch
import modformer as mf
from modformer.config import ModelConfig
from modformer.train import checkpoint as ckpt
torch.manual_seed(0)
model = mf.build_model(ModelConfig(vocab_size=64, n_layer=2, d_model=64, n_head=2, max_seq_len=16))
state = {"step": 0, "optimizer": {"exp_avg": [torch.randn(64, 64) for _ in range(8)]}, "rng": ckpt.rng_state()}
print("ready", flush=True)
for step in range(1, 100000):
    state["step"] = step
    ckpt.save_checkpoint(ckpt.Path(sys.argv[1]), step, model, state, keep=2)
"""


@pytest.mark.parametrize("trial", range(2))
def test_kill_9_while_saving_leaves_a_verified_checkpoint(tmp_path, trial):
    """SIGKILL at a random moment of back-to-back checkpoint saves: the newest checkpoint still verifies."""
    root = tmp_path / "checkpoints"
    child = subprocess.Popen([sys.executable, "-c", SAVER, str(root)], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(SRC)})
    assert child.stdout.readline().strip() == "ready"
    rng = random.Random(trial)
    deadline = 0.3 + rng.random()
    while not list(root.glob("step_*")):          # let it commit a first checkpoint, then a random while
        assert child.poll() is None
        subprocess.run(["sleep", "0.05"], check=True)
    subprocess.run(["sleep", f"{deadline:.3f}"], check=True)
    child.kill()
    child.wait()
    found = ckpt.newest_checkpoint(root, warn=lambda line: None)
    assert found.state["step"] >= 1 and ckpt.latest_checkpoint(root) == found.path     # latest names it
    model = mf.load(root / "latest")
    ckpt.save_checkpoint(root, 10**6, model, found.state)      # the next save clears what the killed one left
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")]
