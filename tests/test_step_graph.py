"""train.cuda_graph (train/step_graph.py): the whole training step captured as one CUDA graph and replayed.

The CPU tests check the settings it refuses; the CUDA tests (run on a GPU host) train
the same run eagerly and through the graph and compare the losses and weights."""

from pathlib import Path

import pytest
import torch
from _helpers import strip

import modformer as mf
from modformer.config import ConfigError, DataConfig, ModelConfig, RunConfig, TrainConfig
from modformer.train import checkpoint as ckpt
from modformer.train.logging import read_metrics
from modformer.train.step_graph import check_graphable
from modformer.train.trainer import Trainer

GROUPED = {"muon_grouped": True}
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


def run_cfg(tmp_path: Path, name: str, dropout: float = 0.0, **train) -> RunConfig:
    t = dict(steps=10, batch_size=32, lr=3e-3, eval_every=5, eval_batches=0, log_every=1, checkpoint_every=5,
             progress=False, tensorboard=False, seed=3, device="cuda" if torch.cuda.is_available() else "cpu",
             dtype="float32", schedule="cosine", warmup_steps=3)
    t.update(train)
    return RunConfig(name=name, out_dir=str(tmp_path),
                     model=ModelConfig(n_layer=2, d_model=32, n_head=2, max_seq_len=8, dropout=dropout),
                     data=DataConfig(name="modular", options={"p": 13, "train_fraction": 0.5}),
                     train=TrainConfig(**t))


@pytest.mark.parametrize("settings, names", [
    ({"optimizer": "muon"}, "muon with optimizer_options.muon_grouped"),
    ({"optimizer": "sgd"}, "adamw, or muon"),
    ({"compile": True, "compile_mode": "reduce-overhead"}, "compile_mode default or max-autotune-no-cudagraphs"),
    ({"dtype": "float16"}, "float16 loss scaling"),
    ({"precision": "fp8"}, "precision fp8"),
    ({"prune": {"final": 0.5}}, "train.prune"),
    ({"optimizer_options": {"grokfast": "ema"}}, "grokfast"),
])
def test_settings_the_graph_cannot_capture_are_refused_by_name(settings, names):
    t = TrainConfig(cuda_graph=True, **settings)
    with pytest.raises(ConfigError, match=names):
        check_graphable(t, world_size=1)
    with pytest.raises(ConfigError, match="one process"):
        check_graphable(TrainConfig(cuda_graph=True), world_size=2)
    check_graphable(TrainConfig(cuda_graph=True, optimizer="muon", optimizer_options=GROUPED), 1)
    check_graphable(TrainConfig(cuda_graph=False, **settings), 1)   # off: nothing checked


def test_without_cuda_the_step_runs_eagerly_and_says_so(tmp_path, capsys):
    """A shipped GPU config (cuda_graph: true) still trains on a CPU: the trainer prints one line and runs the
    eager step, with the same metrics as the same run without the setting; config.yaml records what ran."""
    graphed = Trainer(run_cfg(tmp_path, "graphed", cuda_graph=True, device="cpu", steps=4))
    assert "train.cuda_graph: no CUDA device (cpu); the training step runs eagerly" in capsys.readouterr().err
    graphed.fit()
    Trainer(run_cfg(tmp_path, "eager", device="cpu", steps=4)).fit()
    assert graphed.step_graph is None and graphed.cfg.train.cuda_graph is False
    assert "cuda_graph: false" in (tmp_path / "graphed" / "config.yaml").read_text()
    assert strip(read_metrics(tmp_path / "graphed" / "metrics.jsonl")) == \
        strip(read_metrics(tmp_path / "eager" / "metrics.jsonl"))


def _train(tmp_path: Path, name: str, **train) -> tuple[list[dict], dict[str, torch.Tensor], Trainer]:
    trainer = Trainer(run_cfg(tmp_path, name, **train))
    trainer.fit()
    weights = mf.load(ckpt.latest_checkpoint(tmp_path / name / "checkpoints")).state_dict()
    return strip(read_metrics(tmp_path / name / "metrics.jsonl")), weights, trainer


@cuda
@pytest.mark.parametrize("optimizer, options, accum", [("adamw", {}, 1), ("muon", GROUPED, 1), ("muon", GROUPED, 2)])
def test_graph_replays_train_like_the_eager_step(tmp_path, optimizer, options, accum):
    """10 float32 steps (warm-up, capture, replays; a cosine schedule with warm-up, so the learning rate changes
    every step): the losses and final weights equal the eager run's. The graph multiplies Muon's update by a tensor
    learning rate where the eager step passes a float ``alpha``: one float32 rounding apart, which the bfloat16
    Newton-Schulz iteration can turn into a flipped bfloat16 rounding (2^-8 of an update element, at most
    ~1.2 lr = 3.4e-3 per step) in the following steps: 10 steps x 3.4e-3 x 2^-8 ~ 1.3e-4 bounds the drift."""
    kw = dict(optimizer=optimizer, optimizer_options=options, grad_accum=accum)
    muon = optimizer == "muon"
    eager_rows, eager_w, _ = _train(tmp_path, "eager", **kw)
    graph_rows, graph_w, trainer = _train(tmp_path, "graph", cuda_graph=True, **kw)
    assert trainer.step_graph is not None and trainer.step_graph.graph is not None    # captured, then replayed
    assert len(eager_rows) == len(graph_rows)
    for a, b in zip(eager_rows, graph_rows):
        assert a.keys() == b.keys() and a["step"] == b["step"]
        for key in ("loss", "lr"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-3 if muon else 1e-5, abs=1e-6), (a["step"], key)
    for k in eager_w:
        torch.testing.assert_close(graph_w[k], eager_w[k], rtol=0, atol=2e-4 if muon else 1e-5, msg=k)


@cuda
def test_graph_with_dropout_draws_fresh_masks_each_replay(tmp_path):
    """Dropout inside the graph: the replayed steps' losses are finite and differ from a dropout-free run's,
    and the same seed reproduces them (the capture registers the CUDA generator)."""
    a, _, _ = _train(tmp_path, "a", cuda_graph=True, dropout=0.3, steps=8)
    b, _, _ = _train(tmp_path, "b", cuda_graph=True, dropout=0.3, steps=8)
    plain, _, _ = _train(tmp_path, "plain", cuda_graph=True, dropout=0.0, steps=8)
    losses = [r["loss"] for r in a if r["split"] == "train"]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses == [r["loss"] for r in b if r["split"] == "train"]
    assert losses[4:] != [r["loss"] for r in plain if r["split"] == "train"][4:]
