"""Weight EMA (train.ema_decay): the torch AveragedModel update, evaluation, checkpoints and exact resume."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _helpers import Kill, kill_at, strip
from safetensors.torch import load_model

import modformer as mf
from modformer.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from modformer.train import checkpoint as ckpt
from modformer.train.logging import read_metrics
from modformer.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def run_cfg(tmp_path: Path, name: str = "r", **train) -> RunConfig:
    t = dict(steps=12, batch_size=32, lr=3e-3, eval_every=3, eval_batches=0, log_every=2, checkpoint_every=6,
             progress=False, tensorboard=False, seed=3, device="cpu", schedule="cosine", warmup_steps=2,
             ema_decay=0.8, sample_tokens=0)
    t.update(train)
    return RunConfig(name=name, out_dir=str(tmp_path),
                     model=ModelConfig(n_layer=1, d_model=32, n_head=2, max_seq_len=8, dropout=0.1),
                     data=DataConfig(name="modular", options={"p": 13, "train_fraction": 0.5}),
                     train=TrainConfig(**t))


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_ema_matches_float64_reference_of_the_decay_formula(tmp_path):
    decay, start = 0.8, 3
    snaps, emas = [], []

    def record(trainer, step):
        snaps.append(params(trainer.raw_model))
        emas.append(params(trainer.ema.module))

    trainer = Trainer(run_cfg(tmp_path, steps=9, ema_decay=decay, ema_start=start, checkpoint_every=0),
                      callbacks=[record])
    trainer.fit()
    assert len(snaps) == 9 and int(trainer.ema.n_averaged) == 9 - start + 1
    ref = {n: w.double() for n, w in snaps[0].items()}
    for step, w in enumerate(snaps, start=1):
        if step <= start:          # up to ema_start the average is a copy of the weights
            ref = {n: v.double() for n, v in w.items()}
            for n in w:
                assert torch.equal(emas[step - 1][n], w[n]), (step, n)
        else:
            ref = {n: decay * ref[n] + (1 - decay) * w[n].double() for n in w}
    final = params(trainer.ema.module)
    for n, v in final.items():
        torch.testing.assert_close(v.double(), ref[n], rtol=0, atol=1e-6)
    assert any(not torch.allclose(final[n], snaps[-1][n]) for n in final)     # the average is not the weights
    # the saved model (what eval/generate load) is the average; the trained weights are kept for resume
    last = ckpt.latest_checkpoint(tmp_path / "r" / "checkpoints")
    saved = mf.load(last).state_dict()
    raw_model = mf.load(last)
    load_model(raw_model, str(last / ckpt.RAW_WEIGHTS_NAME))
    raw = raw_model.state_dict()
    for n in final:
        assert torch.equal(saved[n], final[n]) and torch.equal(raw[n], snaps[-1][n]), n


def test_evaluate_uses_the_averaged_weights(tmp_path):
    trainer = Trainer(run_cfg(tmp_path, steps=8))
    trainer.fit()
    ema, raw = trainer.evaluate("val"), trainer.evaluate("val", raw=True)
    assert ema["loss"] != raw["loss"]
    model = mf.load(ckpt.latest_checkpoint(tmp_path / "r" / "checkpoints")).eval()   # the EMA weights
    loss_sum, n = 0.0, 0
    with torch.no_grad():
        for x, y in trainer.data.iter_eval("val", 32, 0):
            loss_sum += F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-100,
                                        reduction="sum").item()
            n += int((y != -100).sum())
    assert ema["loss"] == pytest.approx(loss_sum / n, rel=1e-6)
    last_val = [r for r in read_metrics(tmp_path / "r" / "metrics.jsonl") if r["split"] == "val"][-1]
    assert last_val["loss"] == pytest.approx(ema["loss"], rel=1e-6)
    assert last_val["raw_loss"] == pytest.approx(raw["loss"], rel=1e-6)


def test_resume_restores_weights_and_ema_exactly(tmp_path):
    full = Trainer(run_cfg(tmp_path, "full"))
    full.fit()
    with pytest.raises(Kill):
        Trainer(run_cfg(tmp_path, "broken"), callbacks=[kill_at(8)]).fit()     # checkpoint at 6
    resumed = Trainer(run_cfg(tmp_path, "broken"), resume=True)
    assert resumed.step == 6 and int(resumed.ema.n_averaged) == 6
    resumed.fit()
    a = strip(read_metrics(tmp_path / "full" / "metrics.jsonl"))
    b = strip(read_metrics(tmp_path / "broken" / "metrics.jsonl"))
    assert a == b and any("raw_loss" in r for r in a)
    for x, y in ((full.ema.module, resumed.ema.module), (full.raw_model, resumed.raw_model)):
        px, py = params(x), params(y)
        for n in px:
            assert torch.equal(px[n], py[n]), n


def test_checkpoints_without_ema_resume_with_it_and_back(tmp_path):
    plain = Trainer(run_cfg(tmp_path, "plain", ema_decay=0.0))
    plain.fit()
    assert not (ckpt.latest_checkpoint(tmp_path / "plain" / "checkpoints") / ckpt.RAW_WEIGHTS_NAME).exists()
    # a run without EMA resumed with it: the average starts from the restored weights
    with pytest.raises(Kill):
        Trainer(run_cfg(tmp_path, "on", ema_decay=0.0), callbacks=[kill_at(8)]).fit()
    on = Trainer(run_cfg(tmp_path, "on"), resume=True)
    assert int(on.ema.n_averaged) == 0
    on.fit()
    assert int(on.ema.n_averaged) == 6
    # an EMA run resumed without it continues from the trained (not the averaged) weights
    with pytest.raises(Kill):
        Trainer(run_cfg(tmp_path, "off"), callbacks=[kill_at(8)]).fit()
    off = Trainer(run_cfg(tmp_path, "off", ema_decay=0.0), resume=True)
    off.fit()
    for other in (on, off):
        p0, p1 = params(plain.raw_model), params(other.raw_model)
        for n in p0:
            assert torch.equal(p0[n], p1[n]), n
    train_rows = [strip([r for r in read_metrics(tmp_path / n / "metrics.jsonl") if r["split"] == "train"])
                  for n in ("plain", "on", "off")]
    assert train_rows[0] == train_rows[1] == train_rows[2]


@pytest.mark.parametrize("bad", [{"ema_decay": 1.0}, {"ema_decay": -0.1}, {"ema_start": -1}])
def test_bad_ema_settings(tmp_path, bad):
    field = next(iter(bad))
    with pytest.raises(mf.ConfigError, match=rf"train\.{field} must be"):
        Trainer(run_cfg(tmp_path, **bad))
