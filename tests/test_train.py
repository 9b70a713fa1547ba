"""Training engine: exact resume, failure handling, schedules, optimizer groups, DDP on gloo."""

import errno
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _helpers import Kill, kill_at, strip

import modformer as mf
from modformer.config import DataConfig, ModelConfig, RunConfig, TrainConfig, save_yaml
from modformer.train import checkpoint as ckpt
from modformer.train.grokfast import GrokfastEMA
from modformer.train.logging import read_metrics
from modformer.train.loss import COMPILED_LOSS_MIN_VOCAB, lm_loss
from modformer.train.optim import param_groups
from modformer.train.schedule import lr_schedule
from modformer.train.trainer import Trainer, TrainingError


def run_cfg(tmp_path: Path, name: str = "r", **train) -> RunConfig:
    t = dict(steps=12, batch_size=32, lr=3e-3, eval_every=4, eval_batches=0, log_every=2, checkpoint_every=4,
             progress=False, tensorboard=False, seed=3, device="cpu", schedule="cosine", warmup_steps=2,
             optimizer_options={"grokfast": {"kind": "ema", "alpha": 0.9, "lamb": 1.0}})
    t.update(train)
    return RunConfig(name=name, out_dir=str(tmp_path),
                     model=ModelConfig(n_layer=1, d_model=32, n_head=2, max_seq_len=8, dropout=0.1),
                     data=DataConfig(name="modular", options={"p": 13, "train_fraction": 0.5}),
                     train=TrainConfig(**t))


@pytest.mark.parametrize("optimizer", ["adamw", "muon", "muon_grouped"])
def test_resume_after_kill_reproduces_metrics_exactly(tmp_path, optimizer):
    extra = {}
    if optimizer == "muon_grouped":        # GroupedMuon (train/muon.py): its state must resume exactly too
        options = {**run_cfg(tmp_path).train.optimizer_options, "muon_grouped": True}
        optimizer, extra = "muon", {"optimizer_options": options}
    full = Trainer(run_cfg(tmp_path, "full", optimizer=optimizer, **extra)).fit()
    with pytest.raises(Kill):
        Trainer(run_cfg(tmp_path, "broken", optimizer=optimizer, **extra), callbacks=[kill_at(6)]).fit()
    rows_before = read_metrics(tmp_path / "broken" / "metrics.jsonl")
    assert max(r["step"] for r in rows_before) == 6             # rows after checkpoint 4 exist ...
    resumed = Trainer(run_cfg(tmp_path, "broken", optimizer=optimizer, **extra), resume=True).fit()
    a = strip(read_metrics(tmp_path / "full" / "metrics.jsonl"))
    b = strip(read_metrics(tmp_path / "broken" / "metrics.jsonl"))
    assert a == b                                                # ... and are replaced, not duplicated
    assert resumed["steps"] == full["steps"] == 12
    wa = mf.load(ckpt.latest_checkpoint(tmp_path / "full" / "checkpoints")).state_dict()
    wb = mf.load(ckpt.latest_checkpoint(tmp_path / "broken" / "checkpoints")).state_dict()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_run_directory_contents(tmp_path):
    summary = Trainer(run_cfg(tmp_path, tensorboard=True)).fit()
    run = tmp_path / "r"
    for f in ["config.yaml", "metrics.jsonl", "summary.json", "report.md", "plots/loss.png", "plots/metric.png"]:
        assert (run / f).is_file(), f
    assert list((run / "tb").iterdir())
    assert len(list((run / "checkpoints").glob("step_*"))) == 2          # keep_checkpoints=2
    rows = read_metrics(run / "metrics.jsonl")
    assert {r["split"] for r in rows} == {"train", "val"}
    assert all({"step", "split", "loss", "acc", "wall_s"} <= set(r) for r in rows)
    assert json.loads((run / "summary.json").read_text())["steps"] == summary["steps"] == 12
    assert mf.load_config(run / "config.yaml").model.vocab_size == 14    # filled in from the data


def test_refuses_to_overwrite_and_resume_checks_model_config(tmp_path):
    Trainer(run_cfg(tmp_path, steps=4)).fit()
    with pytest.raises(mf.ConfigError, match="already holds a run"):
        Trainer(run_cfg(tmp_path, steps=4))
    cfg = run_cfg(tmp_path, steps=8)
    cfg.model.d_model = 64
    with pytest.raises(mf.ConfigError, match=r"model config differs.*d_model: 32 -> 64"):
        Trainer(cfg, resume=True)
    Trainer(run_cfg(tmp_path, steps=4), overwrite=True).fit()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    def poison(trainer, step):
        if step == 5:
            with torch.no_grad():
                trainer.raw_model.tok_emb.weight.fill_(float("nan"))

    with pytest.raises(TrainingError, match=r"loss is nan at step 6.*last good checkpoint kept: .*step_0000004"):
        Trainer(run_cfg(tmp_path), callbacks=[poison]).fit()
    last = ckpt.latest_checkpoint(tmp_path / "r" / "checkpoints")
    assert last.name == "step_0000004"
    assert all(torch.isfinite(p).all() for p in mf.load(last).parameters())


def test_full_disk_while_saving_keeps_previous_checkpoint(tmp_path, monkeypatch):
    real = ckpt.save
    calls = {"n": 0}

    def flaky(model, path):
        calls["n"] += 1
        if calls["n"] == 2:
            (Path(path) / "partial").mkdir(parents=True, exist_ok=True)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(model, path)

    monkeypatch.setattr(ckpt, "save", flaky)
    expected = r"no space left on device while writing .*step_0000008.*last good checkpoint kept: .*step_0000004"
    with pytest.raises(ckpt.CheckpointError, match=expected):
        Trainer(run_cfg(tmp_path)).fit()
    root = tmp_path / "r" / "checkpoints"
    assert ckpt.latest_checkpoint(root).name == "step_0000004"
    assert not list(root.glob(".tmp*"))
    mf.load(ckpt.latest_checkpoint(root))


def test_bad_training_config(tmp_path):
    with pytest.raises(mf.ConfigError, match="train.optimizer: unknown optimizer 'adamww'.*did you mean 'adamw'"):
        Trainer(run_cfg(tmp_path, optimizer="adamww"))
    with pytest.raises(mf.ConfigError, match="train.schedule"):
        Trainer(run_cfg(tmp_path, "s", schedule="step")).fit()
    with pytest.raises(mf.ConfigError, match="must be divisible"):
        Trainer(run_cfg(tmp_path, "g", grad_accum=5))
    cfg = run_cfg(tmp_path, "d")
    cfg.data = DataConfig(name="wikitext2", root=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Trainer(cfg)
    cfg.data = DataConfig(name="modulo")
    with pytest.raises(mf.ConfigError, match="did you mean 'modular'"):
        Trainer(cfg)


def test_grad_accumulation_matches_one_big_batch(tmp_path):
    cfgs = [run_cfg(tmp_path, n, grad_accum=k, steps=4, optimizer_options={}) for n, k in (("a", 1), ("b", 4))]
    for c in cfgs:
        c.model.dropout = 0.0       # dropout masks depend on the micro-batch split
    a, b = (Trainer(c).fit() for c in cfgs)
    ra, rb = strip(read_metrics(tmp_path / "a" / "metrics.jsonl")), strip(read_metrics(tmp_path / "b" /
                                                                                       "metrics.jsonl"))
    for x, y in zip(ra, rb):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
    assert a["steps"] == b["steps"]


def test_schedule_and_param_groups():
    t = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, steps=110, schedule="cosine")
    f = lr_schedule(t)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)
    lin = lr_schedule(TrainConfig(lr=1.0, min_lr=0.0, steps=100, schedule="linear"))
    assert lin(50) == pytest.approx(0.5)
    # warmup-stable-decay: 10 warm-up steps, flat at lr, then linear to min_lr over the last 25% of 100 steps
    w = lr_schedule(TrainConfig(lr=1.0, min_lr=0.2, warmup_steps=10, steps=100, schedule="wsd", cooldown=0.25))
    assert w(4) == pytest.approx(0.5) and w(10) == w(74) == 1.0
    assert w(75) == pytest.approx(1.0) and w(80) == pytest.approx(1.0 - 0.8 * 5 / 25) and w(100) == pytest.approx(0.2)
    assert [w(s) for s in range(75, 101)] == sorted([w(s) for s in range(75, 101)], reverse=True)
    assert lr_schedule(TrainConfig(lr=1.0, steps=100, schedule="wsd", cooldown=0.0))(99) == 1.0
    with pytest.raises(mf.ConfigError, match="train.cooldown"):
        TrainConfig(schedule="wsd", cooldown=1.5).validate()
    model = mf.build_model(ModelConfig(vocab_size=10, n_layer=1, d_model=16, n_head=2))
    decay, no_decay = param_groups(model, 0.1, decay_embeddings=False)
    decayed = {id(p) for p in decay["params"]}
    assert id(model.tok_emb.weight) not in decayed and id(model.blocks[0].attn.qkv.weight) in decayed
    assert id(model.blocks[0].ln1.weight) not in decayed and id(model.blocks[0].attn.qkv.bias) not in decayed
    decay2, _ = param_groups(model, 0.1, decay_embeddings=True)
    assert id(model.tok_emb.weight) in {id(p) for p in decay2["params"]}
    n_unique = len({id(p) for p in model.parameters()})
    assert len(decay["params"]) + len(no_decay["params"]) == n_unique


def test_grokfast_ema_filter():
    lin = torch.nn.Linear(2, 1, bias=False)
    f = GrokfastEMA(alpha=0.5, lamb=2.0)
    lin.weight.grad = torch.tensor([[1.0, 0.0]])
    f(lin)                                         # h = g; g <- g + 2h = 3g
    torch.testing.assert_close(lin.weight.grad, torch.tensor([[3.0, 0.0]]))
    lin.weight.grad = torch.tensor([[0.0, 1.0]])
    f(lin)                                         # h = 0.5*[1,0] + 0.5*[0,1]
    torch.testing.assert_close(lin.weight.grad, torch.tensor([[1.0, 2.0]]))


def test_cli_train_eval_generate_list(tmp_path):
    cfg = run_cfg(tmp_path, "cli", steps=4)
    corpus = tmp_path / "data" / "tinyshakespeare" / "input.txt"      # self-contained: no shared data needed
    corpus.parent.mkdir(parents=True)
    corpus.write_text("ROMEO:\nBut soft, what light through yonder window breaks?\n" * 40)
    cfg.data = DataConfig(name="shakespeare_char", seq_len=8, root=str(tmp_path / "data"),
                          options={"verify": False})                   # not the published file: skip its sha256
    cfg.train.sample_tokens = 5
    cfg.train.optimizer_options = {}
    path = tmp_path / "c.yaml"
    save_yaml(cfg, path)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "modformer.cli", *args], capture_output=True, text=True,
                              env=env, cwd=tmp_path, timeout=300)

    out = cli("train", str(path), "train.batch_size=8")
    assert out.returncode == 0, out.stderr
    assert "report:" in out.stdout
    out = cli("eval", str(tmp_path / "cli"), "--split", "val", "--max-batches", "2", "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["split"] == "val"
    full = json.loads(cli("eval", str(tmp_path / "cli"), "--split", "val", "--json").stdout)
    same = json.loads(cli("eval", str(tmp_path / "cli"), "--split", "val", "--stride", "8", "--json").stdout)
    assert same["loss"] == pytest.approx(full["loss"], rel=1e-6)       # stride = seq_len: non-overlapping
    slid = cli("eval", str(tmp_path / "cli"), "--split", "val", "--stride", "2", "--json")
    assert slid.returncode == 0 and math.isfinite(json.loads(slid.stdout)["loss"])
    out = cli("generate", str(tmp_path / "cli"), "--prompt", "ROMEO:", "--max-new-tokens", "3")
    assert out.returncode == 0 and out.stdout.startswith("ROMEO:")
    greedy = [cli("generate", str(tmp_path / "cli"), "--prompt", "ROMEO:", "--max-new-tokens", "4",
                  "--temperature", "0", *extra)
              for extra in ([], ["--compile"],
                            ["--compile", "--decode-backend", "decode", "--decode-linear", "matvec"])]
    assert greedy[1].returncode == 0 and greedy[1].stdout == greedy[0].stdout
    assert greedy[2].returncode == 0 and greedy[2].stdout == greedy[0].stdout, greedy[2].stderr
    batch = [cli("generate", str(tmp_path / "cli"), "--prompt", "ROMEO:", "--prompt", "O", "--prompt", "MEO",
                 "--max-new-tokens", "3", "--temperature", "0", "--compile", *extra)
             for extra in ([], ["--prefill-buckets", "2"])]
    assert batch[1].returncode == 0 and batch[1].stdout == batch[0].stdout, batch[1].stderr
    for extra in (["--decode-backend", "decode"], ["--compile", "--decode-backend", "fastest"],
                  ["--prefill-buckets", "2"], ["--decode-linear", "matvec"], ["--compile", "--decode-linear", "gemv"]):
        bad = cli("generate", str(tmp_path / "cli"), "--prompt", "ROMEO:", "--max-new-tokens", "2", *extra)
        assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0, bad.stderr   # one error line
    out = cli("list")
    assert "attention" in out.stdout and "gqa" in out.stdout and "rope" in out.stdout
    bad = cli("train", str(path), "train.lrr=1")
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "did you mean 'train.lr'" in bad.stderr


def torchrun_train(path: Path, *extra: str) -> None:
    """``torchrun --nproc_per_node=2 -m modformer.cli train PATH`` on gloo; fails the test on a non-zero exit."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "modformer.cli", "train",
                          str(path), *extra], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]


def assert_same_weights_up_to_reduction_order(run_a: Path, run_b: Path, cfg: RunConfig) -> None:
    """Two runs that differ only in how float32 gradient sums are split (processes, shards) end with the same
    weights, to the precision AdamW leaves them.

    AdamW moves each coordinate by at most about lr_t per step (m/sqrt(v) is bounded by ~1), and reordering a
    float32 sum changes a gradient by a relative error of order N * 2^-24 that Adam passes on relative to that
    coordinate's own gradient scale. We allow 2^-10 of the largest possible total movement sum_t lr_t. The key
    bias is the exception: softmax ignores a shift common to every key of a query, so its gradient is zero
    analytically, its float32 value is pure rounding noise, and Adam's normalisation turns that noise into steps
    of up to lr_t in either run. It is held only to the movement bound, and the two models' logits, which do
    not depend on it, are compared instead."""
    ma = mf.load(ckpt.latest_checkpoint(run_a / "checkpoints"))
    mb = mf.load(ckpt.latest_checkpoint(run_b / "checkpoints"))
    lr_at = lr_schedule(cfg.train)
    movement = sum(lr_at(s) for s in range(cfg.train.steps))
    wa, wb = ma.state_dict(), mb.state_dict()
    d = cfg.model.d_model
    for k in wa:
        a, b = wa[k].clone(), wb[k].clone()
        if k.endswith("attn.qkv.bias"):
            torch.testing.assert_close(a[d:2 * d], b[d:2 * d], atol=2 * movement, rtol=0)
            a[d:2 * d] = b[d:2 * d] = 0
        torch.testing.assert_close(a, b, atol=movement * 2 ** -10, rtol=0, msg=k)
    idx = torch.randint(0, cfg.model.vocab_size, (4, cfg.model.max_seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        la, lb = ma.eval()(idx), mb.eval()(idx)
    torch.testing.assert_close(la, lb, atol=movement * 2 ** -10 * cfg.model.d_model, rtol=0)


def test_compile_scope_blocks_compiles_each_block_once_and_trains_as_eager(tmp_path):
    """Regional compilation: every block is compiled (one shared graph), the model itself is not wrapped, and the
    losses equal the uncompiled run's (no dropout: compiled dropout draws other random numbers), with the loss
    compiled apart (compile_loss=on: Inductor's fused cross-entropy instead of the chunked one)."""
    torch._dynamo.reset()
    with pytest.raises(mf.ConfigError, match="train.compile_scope"):
        Trainer(run_cfg(tmp_path, "bad", compile=True, compile_scope="layers"))
    with pytest.raises(mf.ConfigError, match="without CUDA graphs"):     # one shared CUDA graph: outputs overwritten
        Trainer(run_cfg(tmp_path, "graphs", compile=True, compile_scope="blocks", compile_mode="reduce-overhead"))
    runs = {}
    for name, kw in (("eager", {}), ("blocks", dict(compile=True, compile_scope="blocks", compile_loss="on"))):
        cfg = run_cfg(tmp_path, name, steps=4, optimizer_options={}, **kw)
        cfg.model.n_layer, cfg.model.dropout = 2, 0.0
        trainer = Trainer(cfg)
        runs[name] = trainer
        trainer.fit()
    compiled = runs["blocks"]
    assert compiled.model is compiled.raw_model                          # no whole-model wrapper
    assert compiled.loss_fn is not lm_loss                               # the compiled loss took the steps
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in compiled.raw_model.blocks)
    a, b = (strip(read_metrics(tmp_path / n / "metrics.jsonl")) for n in ("eager", "blocks"))
    losses = [(x["loss"], y["loss"]) for x, y in zip(a, b) if "loss" in x]
    assert losses and all(math.isclose(x, y, rel_tol=1e-4) for x, y in losses)   # fp32, fused vs unfused sums


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None
                    and shutil.which("torchrun") is None, reason="torchrun not installed")
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_ddp_two_processes_gloo_matches_single_process(tmp_path, strategy):
    """Two gloo processes (DDP or FSDP2) with the same global batch reproduce the single-process run."""
    cfg = run_cfg(tmp_path, "ddp", steps=6, checkpoint_every=3, optimizer_options={})
    cfg.model.dropout = 0.0
    cfg.train.distributed = strategy
    path = tmp_path / "c.yaml"
    save_yaml(cfg, path)
    torchrun_train(path)
    cfg.name = "single"
    single = Trainer(cfg).fit()
    a = strip(read_metrics(tmp_path / "ddp" / "metrics.jsonl"))
    b = strip(read_metrics(tmp_path / "single" / "metrics.jsonl"))
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["step"] == y["step"] and x["split"] == y["split"]
        assert math.isclose(x["loss"], y["loss"], rel_tol=1e-4), (x, y)
    assert json.loads((tmp_path / "ddp" / "summary.json").read_text())["world_size"] == 2
    assert single["world_size"] == 1
    assert_same_weights_up_to_reduction_order(tmp_path / "ddp", tmp_path / "single", cfg)
    # resume under the same strategy from the step-3 checkpoint reproduces the rest of the run
    shutil.rmtree(tmp_path / "ddp" / "checkpoints" / "step_0000006")
    (tmp_path / "ddp" / "checkpoints" / "latest").write_text("step_0000003\n")
    torchrun_train(path, "--resume")
    again = strip(read_metrics(tmp_path / "ddp" / "metrics.jsonl"))
    for x, y in zip(again, b):
        assert math.isclose(x["loss"], y["loss"], rel_tol=1e-4), (x, y)


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None
                    and shutil.which("torchrun") is None, reason="torchrun not installed")
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_bf16_gradient_reduction_stays_close_to_the_single_process_run(tmp_path, strategy):
    """train.grad_reduce_dtype=bfloat16 (DDP comm hook / FSDP2 reduce dtype) only rounds the averaged grads."""
    cfg = run_cfg(tmp_path, "ddp", steps=4, optimizer_options={})
    cfg.model.dropout = 0.0
    cfg.train.distributed, cfg.train.grad_reduce_dtype = strategy, "bfloat16"
    path = tmp_path / "c.yaml"
    save_yaml(cfg, path)
    torchrun_train(path)
    cfg.name = "single"
    Trainer(cfg).fit()
    a = strip(read_metrics(tmp_path / "ddp" / "metrics.jsonl"))
    b = strip(read_metrics(tmp_path / "single" / "metrics.jsonl"))
    assert [x["step"] for x in a] == [y["step"] for y in b]
    for x, y in zip(a, b):
        assert math.isclose(x["loss"], y["loss"], rel_tol=1e-2), (x, y)
    with pytest.raises(mf.ConfigError, match="grad_reduce_dtype"):
        from modformer.train.distributed import World, wrap_model
        wrap_model(torch.nn.Linear(2, 2), World(size=1), strategy, torch.device("cpu"), reduce_dtype="float16")


def test_profile_steps_trace_exactly_the_chosen_steps(tmp_path):
    """train.profile_steps=[3, 4] traces optimizer steps 3 and 4 only; a bad range fails at construction."""
    Trainer(run_cfg(tmp_path, "p", steps=6, profile_steps=(3, 4), optimizer_options={})).fit()
    out = tmp_path / "p" / "profile"
    trace = json.loads((out / "rank0_trace.json").read_text())
    steps = [e for e in trace["traceEvents"] if e.get("name") == "Optimizer.step#AdamW.step"]
    assert len(steps) == 2                              # one optimizer step per traced training step
    assert "aten::" in (out / "rank0_table.txt").read_text()
    with pytest.raises(mf.ConfigError, match="profile_steps"):
        Trainer(run_cfg(tmp_path, "bad", profile_steps=(4, 2)))


def test_init_from_starts_from_another_runs_weights(tmp_path):
    """train.init_from: a run folder (newest checkpoint) or saved model gives the initial weights; misfits fail."""
    Trainer(run_cfg(tmp_path, "base", steps=4, optimizer_options={})).fit()
    base = mf.load(ckpt.latest_checkpoint(tmp_path / "base" / "checkpoints"))
    tuned = Trainer(run_cfg(tmp_path, "tuned", steps=2, lr=1e-4, init_from=str(tmp_path / "base")))
    for k, v in base.state_dict().items():
        torch.testing.assert_close(tuned.raw_model.state_dict()[k], v, rtol=0, atol=0)
    mf.save(base, tmp_path / "saved")
    again = Trainer(run_cfg(tmp_path, "again", steps=2, init_from=str(tmp_path / "saved")))
    torch.testing.assert_close(again.raw_model.tok_emb.weight, base.tok_emb.weight, rtol=0, atol=0)
    wide = run_cfg(tmp_path, "wide", init_from=str(tmp_path / "base"))
    wide.model.d_model = 64
    with pytest.raises(mf.ConfigError, match="does not fit"):
        Trainer(wide)
    with pytest.raises(mf.ConfigError, match="init_from"):
        Trainer(run_cfg(tmp_path, "none", init_from=str(tmp_path / "nowhere")))
    with pytest.raises(mf.ConfigError, match="train.steps must be >= 1"):
        Trainer(run_cfg(tmp_path, "zero", steps=0))


def test_compile_mode_is_checked_and_passed_to_torch_compile(tmp_path, monkeypatch):
    with pytest.raises(mf.ConfigError, match="train.compile_mode"):
        Trainer(run_cfg(tmp_path, "bad", compile_mode="fast"))
    with pytest.raises(mf.ConfigError, match="train.compile_loss"):
        Trainer(run_cfg(tmp_path, "bad", compile_loss="yes"))
    seen = []

    def fake_compile(fn, **kw):
        seen.append((fn, kw))
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    trainer = Trainer(run_cfg(tmp_path, "ok", compile=True, compile_mode="reduce-overhead", compile_loss="on"))
    # the model in the configured mode; the loss apart, in Inductor's default mode (fused cross-entropy)
    assert seen == [(trainer.raw_model, {"mode": "reduce-overhead"}), (lm_loss, {"dynamic": False})]
    seen.clear()
    trainer = Trainer(run_cfg(tmp_path, "auto", compile=True))     # auto: a small vocabulary keeps the eager loss
    assert trainer.cfg.model.vocab_size < COMPILED_LOSS_MIN_VOCAB
    assert seen == [(trainer.raw_model, {"mode": "default"})] and trainer.loss_fn is lm_loss
    seen.clear()
    trainer = Trainer(run_cfg(tmp_path, "graphs", compile=True, compile_mode="cudagraphs"))
    assert seen == [(trainer.raw_model, {"backend": "cudagraphs"})]   # torch.compile's backend, no Inductor:
    assert trainer.loss_fn is lm_loss                                  # the loss stays eager


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None
                    and shutil.which("torchrun") is None, reason="torchrun not installed")
def test_ddp_scaling_benchmark_tiny_run_reproduces_the_single_process_curve(tmp_path):
    """`modformer bench ddp-scaling --tiny` (gloo): 2 DDP processes match 1 process with grad_accum=2."""
    out = tmp_path / "ddp.json"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    res = subprocess.run([sys.executable, "-m", "modformer.cli", "bench", "ddp-scaling", "--tiny",
                          "--nproc", "1", "2", "--strategies", "ddp", "--runs-dir", str(tmp_path / "runs"),
                          "--out", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads(out.read_text())
    assert [r["name"] for r in result["rows"]] == ["ddp_n1", "ddp_n2", "single_accum2"]
    assert result["headline"]["max_rel_loss_diff"] < 1e-4
    assert result["env"]["NCCL_NVLS_ENABLE"] == "0" and result["headline"]["scaling_efficiency"] > 0


def test_muon_optimizes_hidden_matrices_and_adamw_the_rest(tmp_path, monkeypatch):
    """train.optimizer=muon: Muon gets exactly the hidden 2-D weights (not the tied embedding / output layer,
    biases or norms), AdamW the rest, every parameter once; a step moves a hidden matrix by an orthogonalised
    update; FSDP is refused."""
    from modformer.train.optim import MuonAdamW, muon_split

    trainer = Trainer(run_cfg(tmp_path, "muon", optimizer="muon", lr=3e-3, optimizer_options={}, warmup_steps=0,
                              schedule="constant", weight_decay=0.0, grad_clip=0.0))
    model = trainer.raw_model
    opt = trainer.optimizer
    assert isinstance(opt, MuonAdamW)
    hidden, rest = muon_split(model)
    muon_ids = {id(p) for g in opt.muon.param_groups for p in g["params"]}
    adamw_ids = {id(p) for g in opt.adamw.param_groups for p in g["params"]}
    assert muon_ids == {id(p) for p in hidden} and not muon_ids & adamw_ids
    assert muon_ids | adamw_ids == {id(p) for p in model.parameters()}
    assert id(model.tok_emb.weight) in adamw_ids and id(model.lm_head.weight) in adamw_ids
    assert all(p.dim() == 2 for p in hidden) and id(model.blocks[0].attn.qkv.weight) in muon_ids
    w = model.blocks[0].attn.qkv.weight
    before = w.detach().clone()
    trainer.cfg.train.steps = 1
    trainer.fit()                    # one step at lr 3e-3 (constant), no decay: W -= lr * 0.2 sqrt(max(A, B)) * O
    update = (before - w.detach()) / (3e-3 * 0.2 * max(w.shape) ** 0.5)
    s = torch.linalg.svdvals(update)
    s = s[s > 1e-3]                  # Newton-Schulz pushes the momentum's singular values towards 1 (5 steps:
    assert len(s) > 1 and 0.7 < float(s.max()) < 1.5 and 0.5 < float(s.median()) < 1.3   # most within 0.5-1.2)
    monkeypatch.setattr(Trainer, "sharded", property(lambda self: True))
    with pytest.raises(mf.ConfigError, match="muon"):
        Trainer(run_cfg(tmp_path, "muon_fsdp", optimizer="muon"))


def test_warmup_seconds_is_the_first_log_windows_excess_time():
    """1000 tokens/step at 10k tokens/s is 0.1 s/step; a first window of 10 steps that took 5 s held 4 s of warm-up."""
    from modformer.train.logging import warmup_seconds

    rows = [{"step": 10, "split": "train", "tokens_per_s": 10 * 1000 / 5.0}] + \
           [{"step": s, "split": "train", "tokens_per_s": 10_000.0} for s in (20, 30, 40)]
    assert warmup_seconds(rows, 1000) == pytest.approx(4.0)
    assert warmup_seconds(rows[:1], 1000) is None
    assert warmup_seconds([{**rows[0], "tokens_per_s": 20_000.0}] + rows[1:], 1000) == 0.0   # faster: no warm-up


def test_steady_tokens_per_s_skips_the_first_log_window():
    from modformer.train.logging import steady_tokens_per_s

    rows = [{"tokens_per_s": v} for v in (1.0, 10.0, 30.0, 20.0)]
    assert steady_tokens_per_s(rows) == 20.0                 # median of the windows after the first
    assert steady_tokens_per_s(rows[:1]) == 1.0 and steady_tokens_per_s([]) is None
