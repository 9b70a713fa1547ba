"""``train.prune``: gradual magnitude pruning from the config / CLI (train/pruning.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _helpers import Kill, kill_at, strip

import modformer as mf
from modformer.cli import main
from modformer.compress.unstructured import polynomial_sparsity
from modformer.config import DataConfig, ModelConfig, RunConfig, TrainConfig, apply_overrides, save_yaml
from modformer.train import checkpoint as ckpt
from modformer.train.logging import read_metrics
from modformer.train.pruning import parse_prune
from modformer.train.trainer import Trainer

PRUNE = {"final": 0.8, "start": 2, "end": 10, "every": 2}


def run_cfg(tmp_path: Path, name: str, **train) -> RunConfig:
    t = dict(steps=12, batch_size=16, lr=3e-3, eval_every=4, eval_batches=1, log_every=1, checkpoint_every=4,
             progress=False, tensorboard=False, seed=5, device="cpu", prune=dict(PRUNE), optimizer_options={})
    t.update(train)
    return RunConfig(name=name, out_dir=str(tmp_path),
                     model=ModelConfig(n_layer=1, d_model=32, n_head=2, max_seq_len=8, dropout=0.1),
                     data=DataConfig(name="modular", options={"p": 13, "train_fraction": 0.5}),
                     train=TrainConfig(**t))


def test_sparsity_follows_the_schedule_and_the_run_folder_is_normal(tmp_path):
    trainer = Trainer(run_cfg(tmp_path, "p"))
    n = sum(w.numel() for w in trainer.pruner.weights)
    summary = trainer.fit()
    rows = [r for r in read_metrics(tmp_path / "p" / "metrics.jsonl") if r["split"] == "train"]
    last_due = 0
    for r in rows:                                   # a row is logged after step r["step"]'s mask update
        step = r["step"]
        last_due = step if 2 <= step <= 10 and step % 2 == 0 else last_due
        want = polynomial_sparsity(min(last_due, 10), 2, 10, 0.8) if last_due else 0.0
        assert abs(r["sparsity"] - want) <= 1 / n, (step, r["sparsity"], want)
    assert [r["sparsity"] for r in rows] == sorted(r["sparsity"] for r in rows)   # pruned weights stay pruned
    assert abs(summary["sparsity"] - 0.8) <= 1 / n
    run = tmp_path / "p"
    for f in ["config.yaml", "metrics.jsonl", "summary.json", "report.md", "plots/loss.png"]:
        assert (run / f).is_file(), f
    model = mf.load(ckpt.latest_checkpoint(run / "checkpoints"))       # an ordinary dense model with zeros
    assert not any("mask" in k or k.endswith("_orig") for k in model.state_dict())
    from modformer.compress import sparsity_of
    assert abs(sparsity_of(model) - 0.8) <= 1 / n


def test_resume_rebuilds_the_mask_and_reproduces_the_run(tmp_path):
    """Killed after step 7 (checkpoint 4 has sparsity from step 4's update), resumed: metrics and weights equal
    an uninterrupted run's."""
    Trainer(run_cfg(tmp_path, "full")).fit()
    with pytest.raises(Kill):
        Trainer(run_cfg(tmp_path, "broken"), callbacks=[kill_at(7)]).fit()
    Trainer(run_cfg(tmp_path, "broken"), resume=True).fit()
    assert strip(read_metrics(tmp_path / "full" / "metrics.jsonl")) == \
        strip(read_metrics(tmp_path / "broken" / "metrics.jsonl"))
    wa = mf.load(ckpt.latest_checkpoint(tmp_path / "full" / "checkpoints")).state_dict()
    wb = mf.load(ckpt.latest_checkpoint(tmp_path / "broken" / "checkpoints")).state_dict()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_cli_sets_prune_by_dotted_keys_and_reports_bad_ones(tmp_path, capsys):
    cfg = run_cfg(tmp_path, "cli", steps=4, eval_every=4, checkpoint_every=0, prune={})
    path = tmp_path / "c.yaml"
    save_yaml(cfg, path)
    assert main(["train", str(path), "train.prune.final=0.5", "train.prune.every=1", "train.prune.start=1"]) == 0
    capsys.readouterr()
    import json
    summary = json.loads((tmp_path / "cli" / "summary.json").read_text())
    assert abs(summary["sparsity"] - 0.5) < 1e-3
    assert main(["train", str(path), "train.prune.fina=0.5", "name=x"]) == 2
    assert "train.prune: unknown key 'fina' (did you mean 'final'?)" in capsys.readouterr().err
    assert main(["train", str(path), "train.prune.final=0.5", "train.ema_decay=0.9", "name=y"]) == 2
    assert "ema_decay" in capsys.readouterr().err


@pytest.mark.parametrize("opts,match", [
    ({"start": 3}, "needs 'final'"), ({"final": 1.0}, r"final must be in \[0, 1\)"),
    ({"final": 0.5, "start": 5, "end": 2}, "end .2. must be >= train.prune.start"),
    ({"final": 0.5, "every": 0}, "every must be >= 1"), ({"final": 0.5, "scope": "row"}, "scope: unknown"),
    ({"final": 0.5, "start": 1.5}, "start must be an integer"), ({"final": 0.5, "embeddings": "no"}, "true or false"),
    ({"final": 0.2, "initial": 0.5}, "initial .0.5. must be <="),
])
def test_bad_prune_settings_are_one_line_config_errors(opts, match):
    with pytest.raises(mf.ConfigError, match=match):
        parse_prune(opts, 100)
    with pytest.raises(mf.ConfigError, match=match):
        apply_overrides(RunConfig(), [f"train.prune={opts}"]).validate()
