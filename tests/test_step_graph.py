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
from modformer.train.step_graph import check_graphable, eager_fallback
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
        check_graphable(t)
    check_graphable(TrainConfig(cuda_graph=True, optimizer="muon", optimizer_options=GROUPED))
    check_graphable(TrainConfig(cuda_graph=False, **settings))   # off: nothing checked


def test_the_step_runs_eagerly_without_cuda_or_under_torchrun():
    """The graph captures one process's step on a CUDA device; elsewhere the trainer runs the eager step and says
    why in one line (a shipped GPU config still runs on a CPU or under torchrun)."""
    assert eager_fallback(torch.device("cpu"), 1) == "no CUDA device (cpu)"
    assert eager_fallback(torch.device("cuda", 0), 2).startswith("2 processes")
    assert eager_fallback(torch.device("cuda", 0), 1) is None


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
    """(metric rows without timings, the change of every weight over the run, the trainer) in float32 with TF32
    off, so both paths' matmuls round alike."""
    trainer = Trainer(run_cfg(tmp_path, name, **train))
    torch.backends.cuda.matmul.allow_tf32 = False        # the trainer turns TF32 on for CUDA
    start = {k: v.detach().clone() for k, v in trainer.raw_model.state_dict().items()}
    trainer.fit()
    weights = mf.load(ckpt.latest_checkpoint(tmp_path / name / "checkpoints")).state_dict()
    change = {k: weights[k].to(start[k].device) - start[k] for k in start}
    return strip(read_metrics(tmp_path / name / "metrics.jsonl")), change, trainer


@cuda
@pytest.mark.parametrize("accum", [1, 2])
def test_graph_replays_train_like_the_eager_step(tmp_path, accum):
    """10 steps (2 eager warm-up, the capture, replays; a cosine schedule with warm-up, so the learning rate changes
    every step) with AdamW at eps = 1: its update lr * m / (sqrt(v) + 1) is then nearly linear in the gradients, so
    kernels that round differently (cuBLAS may choose other algorithms for the graph pool's addresses) move the
    weights by a float32 rounding of the change, not more. A graph that kept the capture step's learning rate, batch
    or loss scale would change them by a large share of the change itself."""
    kw = dict(optimizer="adamw", eps=1.0, lr=0.05, grad_accum=accum)
    eager_rows, eager_change, _ = _train(tmp_path, "eager", **kw)
    graph_rows, graph_change, trainer = _train(tmp_path, "graph", cuda_graph=True, **kw)
    assert trainer.step_graph is not None and trainer.step_graph.graph is not None    # captured, then replayed
    assert [r["step"] for r in graph_rows] == [r["step"] for r in eager_rows]
    for k, want in eager_change.items():
        assert want.norm() > 0, k
        assert (graph_change[k] - want).norm() <= 1e-4 * want.norm(), k
    for a, b in zip(eager_rows, graph_rows):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), a["step"]


@cuda
def test_graph_trains_muon_like_the_eager_step(tmp_path):
    """GroupedMuon in the graph, reading its learning rate from a tensor: Muon orthogonalises each update (every
    singular direction scaled to ~1, the near-null ones too), so rounding differences turn whole directions and the
    weights are compared through what they compute: the training and validation losses of 10 steps agree within
    1e-3 (on an H100 the first version of this test saw them agree so, while weights differed by more than 2e-4)."""
    kw = dict(optimizer="muon", optimizer_options=GROUPED)
    eager_rows, _, _ = _train(tmp_path, "eager", **kw)
    graph_rows, _, trainer = _train(tmp_path, "graph", cuda_graph=True, **kw)
    assert trainer.step_graph is not None and trainer.step_graph.graph is not None
    assert [(r["step"], r["split"]) for r in graph_rows] == [(r["step"], r["split"]) for r in eager_rows]
    for a, b in zip(eager_rows, graph_rows):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3), (a["step"], a["split"])


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
