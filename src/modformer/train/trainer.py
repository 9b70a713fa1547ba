"""The training loop: one code path for CPU, one GPU and torchrun (DDP / FSDP2).

``Trainer(run_cfg).fit()`` trains, evaluates, checkpoints and reports into ``out_dir/name``:
config.yaml, metrics.jsonl, tb/, checkpoints/, plots/*.png, summary.json, report.md.
Resume is exact: model, optimizer, gradient filter, weight EMA, RNG and data-generator state are
all checkpointed, and the LR schedule is a pure function of the step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel

from modformer.config import ConfigError, ModelConfig, RunConfig, TrainConfig, from_dict, load_config, save_yaml
from modformer.data import Dataset, build_dataset
from modformer.saving import build_model, unwrap
from modformer.train import checkpoint as ckpt
from modformer.train.compile_cache import use_persistent_cache
from modformer.train.distributed import World, all_reduce_sum, barrier, init_world, shutdown, wrap_model
from modformer.train.ema import build_ema, update_ema
from modformer.train.fp8 import check_fp8, convert_to_float8
from modformer.train.grokfast import build_grad_filter
from modformer.train.logging import MetricsLogger, ProgressDisplay, run_banner
from modformer.train.loss import COMPILED_LOSS_MIN_VOCAB, lm_loss
from modformer.train.optim import build_optimizer
from modformer.train.profiling import StepProfiler
from modformer.train.pruning import TrainingPruner, check_prune_compatible, parse_prune
from modformer.train.report import plot_metrics, write_report, write_summary
from modformer.train.runlock import LOCK_NAME, RunInUseError, RunLock
from modformer.train.schedule import lr_schedule
from modformer.train.step_graph import COMPILE_MODES_WITHOUT_CUDA_GRAPHS, StepGraph, check_graphable, eager_fallback


class TrainingError(RuntimeError):
    """Training cannot continue (e.g. non-finite loss); the message says what was kept."""


def resolve_device(name: str, world: World | None = None) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and world is not None and world.size > 1:
        name = f"cuda:{world.local_rank}"
    elif name == "cuda" and torch.cuda.is_available():
        name = f"cuda:{torch.cuda.current_device()}"   # torch.cuda.set_device rejects an index-less device
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but CUDA is not available; use train.device=cpu")
    return torch.device(name)


def make_deterministic(device: torch.device) -> Callable[[], None]:
    """``train.deterministic``: the same config gives bit-identical runs (and resumes) on one machine.

    PyTorch's deterministic kernels (cuBLAS with a fixed workspace, no cuDNN autotuning; an op with no
    deterministic kernel warns) and one CPU thread: with more, MKL may use fewer threads when the machine is busy
    (MKL_DYNAMIC), which changes the order of floating-point sums. Cost: a CPU run uses one core (BENCHMARKS.md,
    Reliability). Returns a function that restores the previous process-wide settings."""
    import os

    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark, torch.get_num_threads())
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    if device.type == "cpu":
        torch.set_num_threads(1)

    def restore() -> None:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.benchmark = before[1]
        torch.set_num_threads(before[2])
    return restore


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in table:
        raise ConfigError(f"train.dtype: unknown {name!r}; allowed: auto, {', '.join(table)}")
    return table[name]


def config_diff(a: ModelConfig, b: ModelConfig) -> list[str]:
    da, db = dataclasses.asdict(a), dataclasses.asdict(b)
    return [f"{k}: {da[k]!r} -> {db[k]!r}" for k in da if da[k] != db[k]]


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs", "cudagraphs")


def compile_kwargs(t: TrainConfig) -> dict[str, str]:
    """torch.compile arguments for ``train.compile_mode``, checked (torch.compile's own error only names the mode).

    ``cudagraphs`` is torch.compile's ``cudagraphs`` backend: the captured graphs replay PyTorch's own kernels as
    CUDA graphs, with no Inductor code generation (seconds of compile time instead of tens); the other modes are
    Inductor's."""
    if t.compile_mode not in COMPILE_MODES:
        raise ConfigError(f"train.compile_mode must be one of {', '.join(COMPILE_MODES)}, got {t.compile_mode!r}")
    if t.compile_scope not in ("model", "blocks"):
        raise ConfigError(f"train.compile_scope must be model or blocks, got {t.compile_scope!r}")
    if t.compile and t.compile_scope == "blocks" and t.compile_mode not in COMPILE_MODES_WITHOUT_CUDA_GRAPHS:
        # the blocks share one compiled graph: its CUDA graph would overwrite one block's output with the next's
        raise ConfigError(f"train.compile_scope=blocks needs a compile_mode without CUDA graphs "
                          f"({' or '.join(COMPILE_MODES_WITHOUT_CUDA_GRAPHS)}), got {t.compile_mode!r}")
    return {"backend": "cudagraphs"} if t.compile_mode == "cudagraphs" else {"mode": t.compile_mode}


class Trainer:
    """Builds data, model and optimizer from a RunConfig and runs the loop.

    ``model`` / ``data``: train this model object as it is (a pruned model, one with pruning masks or LoRA
    adapters attached; only parameters with ``requires_grad`` train) on this dataset instead of building them
    from ``cfg`` (fine-tuning: ``compress.finetune``); ``saved`` maps the trained module to the plain model its
    checkpoints hold (e.g. a LoRA model merged). ``record=False``: no checkpoints, plots, report or summary
    (a silent inner loop; metrics.jsonl is still written) and no evaluation unless ``train.eval_every`` is due.
    """

    ema: AveragedModel | None = None    # weight EMA (train.ema_decay > 0): evaluated, sampled and saved

    def __init__(self, cfg: RunConfig, resume: bool = False, overwrite: bool = False,
                 callbacks: list[Callable[[Trainer, int], None]] | None = None, *,
                 model: torch.nn.Module | None = None, data: Dataset | None = None,
                 saved: Callable[[torch.nn.Module], torch.nn.Module] | None = None, record: bool = True) -> None:
        if model is not None and resume:
            raise ConfigError("a run that trains a given model object (fine-tuning) cannot be resumed; start it again")
        self.record, self.saved = record, saved
        cfg.validate()                 # the CLI checks too; the Python API, sweeps and compose runs rely on this
        cfg.check_run_dir()
        self.cfg = cfg
        t = cfg.train
        self.t_start = time.perf_counter()
        self.init_seconds: dict[str, float] = {}   # wall seconds of each Trainer() phase (`bench startup`)
        self._lap_at = self.t_start
        if t.compile:                   # before anything imports Inductor (it fixes its cache folder on first use)
            use_persistent_cache()      # kernels survive /tmp cleaning, unless TORCHINDUCTOR_CACHE_DIR is set
        self.world = init_world("cuda" if t.device.startswith("cuda") or (
            t.device == "auto" and torch.cuda.is_available()) else "cpu")
        self.device = resolve_device(t.device, self.world)
        fallback = eager_fallback(self.device, self.world.size) if t.cuda_graph else None
        if fallback:
            self._warn(f"train.cuda_graph: {fallback}; the training step runs eagerly")
            t = cfg.train = dataclasses.replace(t, cuda_graph=False)
        check_graphable(t)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self._restore_settings: Callable[[], None] = lambda: None
        if t.deterministic:
            self._restore_settings = make_deterministic(self.device)
        elif t.threads:
            torch.set_num_threads(t.threads)
        self.dtype = resolve_dtype(t.dtype, self.device)
        if t.precision != "auto":                 # bf16 | fp8: bf16 autocast (fp8 adds FP8 linear layers)
            self.dtype = torch.bfloat16
        if t.precision.startswith("fp8"):
            check_fp8(self.device, t.precision)
        self.profiler = StepProfiler(t.profile_steps, cfg.run_dir / "profile", self.world.rank, self.device,
                                     memory=t.profile_memory, total_steps=t.steps)
        self.callbacks = callbacks or []
        self.run_dir = cfg.run_dir
        self.lock = RunLock(self.run_dir)      # taken in _prepare_run_dir, released when fit() ends
        self._lap("set-up (device, precision, profiler)")
        self.data: Dataset = data if data is not None else build_dataset(cfg.data)
        self._lap("dataset (build_dataset)")
        if model is not None and isinstance(getattr(unwrap(model), "cfg", None), ModelConfig):
            cfg.model = dataclasses.replace(unwrap(model).cfg)   # config.yaml and checkpoints describe it
        self._fill_model_config(check_model=model is None)
        torch.manual_seed(t.seed)
        self.raw_model = build_model(cfg.model).to(self.device) if model is None else model.to(self.device)
        if t.precision.startswith("fp8"):
            convert_to_float8(self.raw_model, "rowwise" if t.precision == "fp8_rowwise" else "tensorwise")
        if t.init_from and not resume:
            self._init_weights_from(Path(t.init_from))
        self.ema = build_ema(self.raw_model, t, self.sharded)
        self._lap("model (build, to device, EMA)")
        compile_args = compile_kwargs(t)              # checked even when compile is off: a typo fails early
        self.step_graph: StepGraph | None = None      # train.cuda_graph: built at the first step
        if self.sharded and t.precision.startswith("fp8"):
            raise ConfigError(f"train.precision={t.precision} quantises whole weight matrices; use "
                              "train.distributed=ddp, not fsdp")
        if self.sharded and t.optimizer == "muon":
            raise ConfigError("train.optimizer=muon needs whole weight matrices; use train.distributed=ddp, not fsdp")
        regional = t.compile and (self.sharded or t.compile_scope == "blocks")
        if regional and t.compile_scope == "blocks" and not isinstance(getattr(self.raw_model, "blocks", None),
                                                                       torch.nn.ModuleList):
            raise ConfigError(f"train.compile_scope=blocks needs a model with a `blocks` list; "
                              f"{type(self.raw_model).__name__} has none (use compile_scope=model)")
        if regional:   # FSDP2 (its hooks stay outside the graphs) or compile_scope=blocks: compile each block
            for block in getattr(self.raw_model, "blocks", []):
                block.compile(**compile_args)
        self.model = wrap_model(self.raw_model, self.world, t.distributed, self.device, self.dtype,
                                t.grad_reduce_dtype)
        if t.compile and not regional:
            self.model = torch.compile(self.model, **compile_args)
        self.loss_fn = torch.compile(lm_loss, dynamic=False) if self._compiles_loss() else lm_loss
        self._lap("wrap and torch.compile (imports Dynamo / Inductor)")
        self.optimizer = build_optimizer(self.raw_model, t)
        prune_spec = parse_prune(t.prune, t.steps)
        self.pruner: TrainingPruner | None = None      # train.prune: gradual magnitude pruning in the loop
        if prune_spec is not None:
            check_prune_compatible(t, self.sharded)
            self.pruner = TrainingPruner(self.raw_model, prune_spec)
        self.lr_at = lr_schedule(t)
        self.grad_filter = build_grad_filter(t.optimizer_options)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.data_gen = torch.Generator().manual_seed(t.seed + 1)
        self.step = 0
        self.best: dict[str, Any] = {}
        self.wall_offset = 0.0
        self.stop_reason = "steps"
        self._aux_window: dict[str, torch.Tensor] = {}   # aux loss / stats summed since the last log row
        self._aux_steps = 0
        self._lap("optimizer, schedule, pruner")
        self._prepare_run_dir(resume, overwrite)
        try:
            self.logger = MetricsLogger(self.run_dir, t.tensorboard, enabled=self.world.is_main)
            if resume:
                self._resume()
        except BaseException:
            self.lock.release()
            raise
        self._lap("run folder, metrics logger, resume")

    def _lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.init_seconds[phase] = now - self._lap_at
        self._lap_at = now

    # ---- set-up ------------------------------------------------------------------------
    def _init_weights_from(self, path: Path) -> None:
        """``train.init_from``: start from a run folder's newest checkpoint, a saved model or an HF GPT-2 folder.

        Every tensor must exist with the same shape; other model settings (dropout, say) may differ."""
        from modformer.runs import load_any

        try:
            src = load_any(path)
        except FileNotFoundError as e:
            raise ConfigError(f"train.init_from={str(path)!r}: {e}") from None
        mine, theirs = self.raw_model.state_dict(), src.state_dict()
        bad = [f"{k} {tuple(theirs[k].shape) if k in theirs else 'missing'} vs {tuple(v.shape)}"
               for k, v in mine.items() if k not in theirs or theirs[k].shape != v.shape]
        extra = sorted(set(theirs) - set(mine))
        if bad or extra:
            raise ConfigError(f"train.init_from={str(path)!r} does not fit model: "
                              f"{(bad or [f'{extra[0]} unexpected'])[0]} ({len(bad) + len(extra)} tensors differ)")
        self.raw_model.load_state_dict(theirs)

    def _fill_model_config(self, check_model: bool = True) -> None:
        m, d = self.cfg.model, self.data
        if check_model:            # a given model (fine-tuning) is what it is
            if m.vocab_size == 0:
                m.vocab_size = d.vocab_size
            elif m.vocab_size < d.vocab_size:
                raise ConfigError(f"model.vocab_size={m.vocab_size} is smaller than the dataset's vocabulary "
                                  f"({d.vocab_size}); set model.vocab_size=0 to take it from the data")
            if m.position == "learned" and d.seq_len > m.max_seq_len:
                raise ConfigError(f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
        if self.cfg.train.steps < 1:
            raise ConfigError(f"train.steps must be >= 1, got {self.cfg.train.steps}")
        b, parts = self.cfg.train.batch_size, self.world.size * self.cfg.train.grad_accum
        if b > 0 and b % parts:
            raise ConfigError(f"train.batch_size={b} must be divisible by processes x grad_accum = {parts}")

    def _check_request(self, resume: bool, overwrite: bool) -> None:
        """Refuse a request that cannot succeed before anything in the run folder changes.

        A resumed run must keep its model and data settings (train.* such as steps or lr may change):
        the saved config.yaml is compared with the new one, so a refused resume leaves it as it was."""
        has_run = (self.run_dir / "checkpoints").exists() or (self.run_dir / "metrics.jsonl").exists()
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise ConfigError(f"{self.run_dir} exists and is not a folder; choose another name= or out_dir=")
        if has_run and not resume and not overwrite:
            raise ConfigError(f"{self.run_dir} already holds a run; pass --resume to continue it, "
                              "--overwrite to replace it, or choose another name=")
        if not resume:
            return
        saved_file = self.run_dir / "config.yaml"
        if saved_file.is_file():
            saved = load_config(saved_file)
            for section in ("model", "data"):
                a, b = dataclasses.asdict(getattr(saved, section)), dataclasses.asdict(getattr(self.cfg, section))
                diff = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in b if a.get(k) != b.get(k)]
                if diff:
                    raise ConfigError(f"cannot resume {self.run_dir}: {section} config differs from the run's "
                                      f"config.yaml ({'; '.join(diff)}); only train.* settings may change")
        self._resume_from = self._find_resumable()

    def _prepare_run_dir(self, resume: bool, overwrite: bool) -> None:
        """Lock the run folder for this process's lifetime, then (and only then) clear or create it."""
        self._check_request(resume, overwrite)
        error: ConfigError | None = None
        if self.world.is_main:
            try:
                self.lock.acquire()
            except RunInUseError as e:
                error = e
        if all_reduce_sum([float(error is not None)], torch.device("cpu") if self.device.type != "cuda"
                          else self.device, self.world)[0]:
            raise error or RunInUseError(f"{self.run_dir} is in use by another process (rank 0 could not lock it)")
        has_run = (self.run_dir / "checkpoints").exists() or (self.run_dir / "metrics.jsonl").exists()
        if self.world.is_main:
            if has_run and overwrite and not resume:
                for child in self.run_dir.iterdir():       # everything but the lock we hold
                    if child.name == LOCK_NAME:
                        continue
                    if child.is_dir() and not child.is_symlink():
                        shutil.rmtree(child)
                    else:
                        child.unlink()
            save_yaml(self.cfg, self.run_dir / "config.yaml")
        barrier(self.world)

    def _find_resumable(self) -> ckpt.Checkpoint:
        """The newest checkpoint that verifies in full (signed config, weights that fit and are finite, a trainer
        state that parses and fits this optimizer and model config); each newer one skipped is reported in one
        line. Only reads: called before the run folder is touched."""
        root = self.run_dir / "checkpoints"
        try:
            found = ckpt.newest_checkpoint(root, self._read_resumable, warn=self._warn)
        except FileNotFoundError:
            raise ConfigError(f"cannot resume: no checkpoint in {root}") from None
        diff = config_diff(from_dict(ModelConfig, found.state["model_config"]), self.cfg.model)
        if diff:
            raise ConfigError(f"cannot resume {self.run_dir}: model config differs from the checkpoint "
                              f"({'; '.join(diff)})")
        return found

    def _resume(self) -> None:
        """Continue from the checkpoint ``_check_request`` found; everything was read and checked before."""
        found = self._resume_from
        path, state = found.path, found.state
        trained = found.raw_model if found.raw_model is not None else found.model   # EMA: model is the average
        try:
            if self.sharded:
                from torch.distributed.checkpoint.state_dict import (
                    StateDictOptions,
                    set_model_state_dict,
                    set_optimizer_state_dict,
                )

                opts = StateDictOptions(full_state_dict=True)
                set_model_state_dict(self.model, trained.state_dict(), options=opts)
                set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=opts)
            else:
                self.optimizer.load_state_dict(state["optimizer"])
                self.raw_model.load_state_dict(trained.state_dict())
            if self.ema is not None:                      # (never sharded)
                if found.raw_model is not None and "ema_n_averaged" in state:
                    self.ema.module.load_state_dict(found.model.state_dict())
                    self.ema.n_averaged.fill_(state["ema_n_averaged"])
                else:                                     # a checkpoint without EMA: the average starts here
                    self.ema.module.load_state_dict(self.raw_model.state_dict())
                    self.ema.n_averaged.zero_()
            if self.grad_filter is not None and state.get("grad_filter") is not None:
                self.grad_filter.load_state_dict(state["grad_filter"])
            self.scaler.load_state_dict(state["scaler"])
            self.data_gen.set_state(state["data_gen"])
            ckpt.set_rng_state(state["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise ckpt.CheckpointError(f"cannot resume from {path}: its trainer state does not fit this run "
                                       f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        self.step, self.best, self.wall_offset = state["step"], state["best"], state["wall_s"]
        if self.pruner is not None:
            self.pruner.restore(self.step)        # the mask is the checkpoint's zeros
        self.logger.truncate_after(self.step)
        self._resume_from = None          # the checkpoint's tensors are not needed any more

    def _read_resumable(self, path: Path) -> ckpt.Checkpoint:
        """``ckpt.read_checkpoint`` plus the checks that make applying the state all-or-nothing."""
        found = ckpt.read_checkpoint(path)
        s = found.state
        kinds = {"model_config": dict, "optimizer": dict, "scaler": dict, "data_gen": torch.Tensor, "rng": dict,
                 "best": dict, "wall_s": (int, float)}
        bad = [k for k, kind in kinds.items() if not isinstance(s.get(k), kind)]
        if not bad and not self.sharded and not ckpt.optimizer_layout_matches(s["optimizer"],
                                                                                 self.optimizer.state_dict()):
            bad = ["optimizer (its parameter groups differ from this run's optimizer)"]
        if bad:
            raise ckpt.CheckpointError(f"{path / ckpt.STATE_JSON}: missing or malformed {', '.join(bad)}")
        return found

    def _warn(self, line: str) -> None:
        if self.world.is_main:
            import sys

            print(line, file=sys.stderr, flush=True)

    def _compiles_loss(self) -> bool:
        """``train.compile_loss``: the loss compiled apart from the model (the same under every wrapper), where
        Inductor fuses the cross-entropy and argmax over the logits (default mode: a few kernels). ``auto``: for
        vocabularies of >= 1024 entries; never with the cudagraphs backend (it runs no Inductor)."""
        t = self.cfg.train
        if not t.compile or t.compile_mode == "cudagraphs" or t.compile_loss == "off":
            return False
        return t.compile_loss == "on" or self.cfg.model.vocab_size >= COMPILED_LOSS_MIN_VOCAB

    # ---- one optimisation step ---------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        # a CUDA graph must not keep autocast's cast-weight cache from its capture (CUDA graphs docs)
        return torch.autocast(self.device.type, dtype=self.dtype, cache_enabled=not self.cfg.train.cuda_graph)

    def _micro_batches(self) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int, int]:
        """Draw the global batch (same on every rank) and return this rank's micro-batches."""
        t = self.cfg.train
        x, y = self.data.get_batch("train", t.batch_size, self.data_gen)
        n_targets = int((y != -100).sum())
        parts = self.world.size * t.grad_accum
        xs, ys = x.tensor_split(parts), y.tensor_split(parts)
        mine = range(self.world.rank * t.grad_accum, (self.world.rank + 1) * t.grad_accum)
        return [(xs[i], ys[i]) for i in mine], n_targets, x.numel()

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """Forward/backward over the micro-batches, filter, clip, step (``_step_body``): eagerly, or replayed as
        one CUDA graph with ``train.cuda_graph`` (``train/step_graph.py``).

        Returns this rank's summed NLL and correct count (device tensors, no sync) and the
        global batch's token and target counts.
        """
        micro, n_targets, n_tokens = self._micro_batches()
        lr, loss_scale = self.lr_at(self.step), self.world.size / max(n_targets, 1)  # exact mean after DDP's average
        self.model.train()
        if self.cfg.train.cuda_graph:
            if self.step_graph is None:    # built at the first step: after a resume has loaded the optimizer
                self.step_graph = StepGraph(self._step_body, self.optimizer, self.device)
            loss_sum, correct = self.step_graph(micro, lr, loss_scale)
        else:
            for group in self.optimizer.param_groups:
                group["lr"] = lr           # a float (a graph-run checkpoint may have left a tensor here)
            loss_sum, correct = self._step_body(micro, loss_scale)
            self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.ema is not None:
            update_ema(self.ema, self.raw_model, self.step, self.cfg.train.ema_start)
        self._aux_steps += 1
        return loss_sum, correct, n_tokens, n_targets

    def _step_body(self, micro: list[tuple[torch.Tensor, torch.Tensor]],
                   loss_scale: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The step without zeroing the gradients: (summed NLL, correct count) as device tensors. It never syncs
        with the host, so ``train.cuda_graph`` can capture it (``loss_scale`` is then a device tensor)."""
        t = self.cfg.train
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        for i, (x, y) in enumerate(micro):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            sync = i == len(micro) - 1 or not hasattr(self.model, "no_sync")
            with (contextlib.nullcontext() if sync else self.model.no_sync()), self._autocast():
                logits = self.model(x, **self.data.batch_kwargs(x, y))  # document_ids / attention_mask
                nll, objective, n_correct = self.loss_fn(logits.flatten(0, 1), y.flatten(), t.label_smoothing,
                                                         t.loss_chunk_size)   # no float32 logits copy
                loss = objective * loss_scale
                core = unwrap(self.model)
                aux, stats = getattr(core, "aux_loss", None), getattr(core, "aux_stats", {})
                if t.cuda_graph and (aux is not None or stats):
                    raise ConfigError("train.cuda_graph does not support models with an auxiliary loss or "
                                      "statistics (mixture-of-experts); set train.cuda_graph: false")
                if aux is not None:
                    loss = loss + aux / len(micro)
                    self._track_aux("aux_loss", aux.detach() / len(micro))
                for key, value in stats.items():
                    self._track_aux(key, value.detach())   # e.g. moe_overflow, moe_assignments
            self.scaler.scale(loss).backward()
            loss_sum += nll.detach()
            correct += n_correct
        if self.pruner is not None:
            self.pruner.mask_grads()
        if self.grad_filter is not None:
            self.grad_filter(self.raw_model)
        if t.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.pruner is not None:
            self.pruner.apply()
        return loss_sum, correct

    def _track_aux(self, key: str, value: torch.Tensor) -> None:
        self._aux_window[key] = self._aux_window[key] + value if key in self._aux_window else value

    def _pop_aux(self) -> dict[str, float]:
        """Per-step means of the model's aux loss and stats since the last call (logged with train rows)."""
        out = {k: float(v) / max(self._aux_steps, 1) for k, v in self._aux_window.items()}
        self._aux_window, self._aux_steps = {}, 0
        return out

    # ---- evaluation --------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, split: str, max_batches: int | None = None, raw: bool = False) -> dict[str, float]:
        """Loss/acc (+ppl for corpora) on ``split``; every rank evaluates the same batches.

        With a weight EMA the averaged weights are evaluated, unless ``raw`` (the trained weights).
        """
        t = self.cfg.train
        max_batches = t.eval_batches if max_batches is None else max_batches
        bs = t.eval_batch_size or (t.batch_size if t.batch_size > 0 else 0)
        # Eager (not torch.compile'd) forward: a compiled model would recompile for eval mode and
        # again for the ragged last batch, costing more than the evaluation itself.
        model = self.ema.module if self.ema is not None and not raw else getattr(self.model, "_orig_mod", self.model)
        model.eval()
        loss_sum, n, correct = 0.0, 0, 0
        windows = (self.data.iter_eval(split, bs, max_batches, stride=t.eval_stride) if self.data.kind == "corpus"
                   else self.data.iter_eval(split, bs, max_batches))
        for x, y in windows:
            x, y = x.to(self.device), y.to(self.device)
            with self._autocast():
                logits = model(x, **self.data.batch_kwargs(x, y))
            loss_sum += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-100,
                                        reduction="sum").item()
            mask = y != -100
            n += int(mask.sum())
            correct += int(((logits.argmax(-1) == y) & mask).sum())
        try:
            out = self.data.metrics(loss_sum, n, correct, split=split)
        except TypeError:
            out = self.data.metrics(loss_sum, n, correct)
        if not math.isfinite(out["loss"]):
            raise TrainingError(f"{split} loss is {out['loss']} at step {self.step}; training stopped, "
                                f"{self._kept()}")
        return out

    # ---- the loop ----------------------------------------------------------------------
    def wall(self) -> float:
        return self.wall_offset + time.perf_counter() - self.t_start

    def _kept(self) -> str:
        """Names the newest checkpoint that verifies (what --resume would use), or says there is none."""
        try:
            last = ckpt.newest_checkpoint(self.run_dir / "checkpoints", warn=lambda _: None).path
        except (FileNotFoundError, ckpt.CheckpointError, ConfigError):
            return "no good checkpoint exists"
        return f"last good checkpoint kept: {last}"

    def _metric_value(self, key: str, rows: dict[str, dict[str, float]]) -> float | None:
        split, _, name = key.partition("/")
        return rows.get(split, {}).get(name)

    def fit(self) -> dict[str, Any]:
        """Train to ``train.steps`` (or early stop) and write the run's artefacts; returns the summary."""
        t = self.cfg.train
        progress = ProgressDisplay(t.steps, self.step, t.progress and self.world.is_main)
        if progress.enabled:
            progress.banner(*run_banner(self))
        stats = [torch.zeros((), device=self.device), torch.zeros((), device=self.device, dtype=torch.long)]
        window_tokens, window_t0, targets_in_window = 0, time.perf_counter(), 0
        try:
            try:
                while self.step < t.steps:
                    self.profiler.before(self.step + 1)
                    loss_sum, correct, n_tokens, n_targets = self.train_step()
                    self.profiler.after(self.step)
                    if self.pruner is not None:
                        self.pruner.update(self.step)
                    progress.advance(self.step)
                    stats[0] += loss_sum
                    stats[1] += correct
                    window_tokens += n_tokens
                    targets_in_window += n_targets
                    last = self.step == t.steps
                    do_eval = self.step % t.eval_every == 0 or (last and self.record)
                    do_ckpt = self.record and ((t.checkpoint_every and self.step % t.checkpoint_every == 0) or last)
                    if self.step % t.log_every == 0 or do_eval or do_ckpt:
                        loss_tot, corr_tot = all_reduce_sum([stats[0].item(), float(stats[1].item())],
                                                            self.device, self.world)
                        train_loss = loss_tot / max(targets_in_window, 1)
                        if not math.isfinite(train_loss):
                            raise TrainingError(f"training loss is {train_loss} at step {self.step}; stopped, "
                                                f"{self._kept()}")
                        tps = window_tokens / max(time.perf_counter() - window_t0, 1e-9)
                        row = {"step": self.step, "split": "train", "loss": train_loss,
                               "acc": corr_tot / max(targets_in_window, 1), "lr": self.lr_at(self.step - 1),
                               "tokens_per_s": tps, "wall_s": self.wall(), **self._pop_aux()}
                        if self.pruner is not None:
                            row["sparsity"] = self.pruner.sparsity()
                        self.logger.log(row)
                        progress.update(self.step, f"loss {train_loss:.4f}  acc {row['acc']:.3f}  {tps:,.0f} tok/s")
                        stats = [torch.zeros_like(stats[0]), torch.zeros_like(stats[1])]
                        window_tokens, window_t0, targets_in_window = 0, time.perf_counter(), 0
                    if do_eval:
                        n_eval = None
                        val = self.evaluate("val")
                        if t.eval_batches and self._early_stop({"val": val}):
                            n_eval = 0
                            val = self.evaluate("val", 0)     # a partial eval passed: confirm on the full split
                        if self.ema is not None:              # the trained weights' loss beside the average's
                            val["raw_loss"] = self.evaluate("val", n_eval, raw=True)["loss"]
                        self.logger.log({"step": self.step, "split": "val", **val, "wall_s": self.wall()})
                        self._update_best(val)
                        shown = "  ".join(f"{k} {v:.4g}" for k, v in val.items())
                        progress.message(f"step {self.step}/{t.steps}  val {shown}  "
                                         f"({self.wall():.1f}s, ETA {progress.eta(self.step)})")
                        if self._early_stop({"val": val}):
                            self.stop_reason = f"early stop: {t.early_stop_metric} reached {t.early_stop_target}"
                            progress.message(self.stop_reason)
                            do_ckpt = self.record
                    if do_ckpt:
                        self.save_checkpoint()
                    for cb in self.callbacks:
                        cb(self, self.step)
                    if self.stop_reason != "steps":
                        break
            finally:
                self.profiler.close(self.step)
                progress.close()
                self.logger.close()
            summary = self.finish()
        finally:
            self.lock.release()
            self._restore_settings()
        shutdown(self.world)
        return summary

    def _update_best(self, val: dict[str, float]) -> None:
        for k, v in val.items():
            better = v < self.best.get(f"val_{k}", math.inf) if k in ("loss", "ppl", "word_ppl", "raw_loss") else \
                v > self.best.get(f"val_{k}", -math.inf)
            if better:
                self.best[f"val_{k}"] = v
                self.best[f"val_{k}_step"] = self.step
        target = self.cfg.train.early_stop_target
        key = self.cfg.train.early_stop_metric
        if key and target is not None and "first_target_step" not in self.best:
            v = val.get(key.partition("/")[2])
            if v is not None and self._reached(v):
                self.best["first_target_step"] = self.step
                self.best["first_target_wall_s"] = self.wall()

    def _reached(self, v: float) -> bool:
        t = self.cfg.train
        return v >= t.early_stop_target if t.early_stop_mode == "max" else v <= t.early_stop_target

    def _early_stop(self, rows: dict[str, dict[str, float]]) -> bool:
        t = self.cfg.train
        if not t.early_stop_metric or t.early_stop_target is None:
            return False
        v = self._metric_value(t.early_stop_metric, rows)
        if v is None:
            raise ConfigError(f"train.early_stop_metric={t.early_stop_metric!r} is not among the logged "
                              f"metrics ({', '.join('val/' + k for k in rows['val'])})")
        return self._reached(v)

    @property
    def sharded(self) -> bool:
        """FSDP2 under torchrun: parameters are DTensor shards; state must be gathered collectively."""
        return self.cfg.train.distributed == "fsdp" and self.world.size > 1

    PROBE_ROWS, PROBE_TOKENS = 8, 512     # the NaN guard's validation batch: at most 8 rows, ~512 tokens

    def _probe_loss(self, model: torch.nn.Module) -> float:
        """Mean loss of ``model`` on one fixed validation batch (the split's first rows): no RNG is drawn,
        no gradient kept, and the model's train/eval mode is restored."""
        if getattr(self, "_probe", None) is None:
            x, y = next(iter(self.data.iter_eval("val", self.PROBE_ROWS, 1)))
            rows = max(1, min(self.PROBE_ROWS, self.PROBE_TOKENS // max(x.shape[1], 1)))
            self._probe = (x[:rows].to(self.device), y[:rows].to(self.device))
        x, y = self._probe
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), self._autocast():
                logits = model(x)
            nll = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-100, reduction="sum")
        finally:
            model.train(was_training)
        return float(nll) / max(int((y != -100).sum()), 1)

    def _check_saveable(self) -> None:
        """The NaN guard: a checkpoint is written (and so becomes ``latest``) only if every weight it holds is
        finite and the loss those weights give on one fixed validation batch is finite. The training loss
        checked in ``fit`` is measured before an update; this check sees the weights after it, which are what
        the checkpoint holds. Every rank takes part (FSDP's forward is collective) and all agree; on failure
        the run stops with TrainingError naming the step and the last good checkpoint, which stays newest."""
        held = [("weights", self.ema.module if self.ema is not None else self._saved_model())]
        if self.ema is not None:
            held.append(("trained weights", self.raw_model))
        counts = []
        for _, model in held:
            from modformer.saving import nonfinite_names

            local = {k: v.to_local() if hasattr(v, "to_local") else v for k, v in model.state_dict().items()}
            counts.append(float(len(nonfinite_names(local))))
            counts.append(float(not math.isfinite(self._probe_loss(model))))
        counts = all_reduce_sum(counts, self.device, self.world)
        for i, (label, _) in enumerate(held):
            if counts[2 * i]:
                why = f"{int(counts[2 * i])} tensors of the {label} hold NaN/inf"
            elif counts[2 * i + 1]:
                why = f"the loss of the {label} on a fixed validation batch is not finite"
            else:
                continue
            raise TrainingError(f"step {self.step}: {why}; checkpoint not written, training stopped, {self._kept()}")

    def save_checkpoint(self) -> Path | None:
        """Checkpoint the current step if it passes the NaN guard (``_check_saveable``); rank 0 writes it."""
        self._check_saveable()
        model, optim_state = self.raw_model, None
        if self.sharded:   # every rank takes part in gathering the full state; rank 0 writes it
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
                get_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            full = get_model_state_dict(self.model, options=opts)
            optim_state = get_optimizer_state_dict(self.model, self.optimizer, options=opts)
            if self.world.is_main:
                model = build_model(self.cfg.model)
                model.load_state_dict(full)
        state = {"step": self.step, "optimizer": optim_state or self.optimizer.state_dict(),
                 "grad_filter": self.grad_filter.state_dict() if self.grad_filter else None,
                 "scaler": self.scaler.state_dict(), "data_gen": self.data_gen.get_state(),
                 "rng": ckpt.rng_state(), "best": self.best, "wall_s": self.wall(),
                 "model_config": dataclasses.asdict(self.cfg.model)}
        raw = None
        if self.saved is not None and not self.sharded:
            model = self._saved_model()
        if self.ema is not None:     # the average is the saved model; the trained weights are kept for resume
            model, raw = self.ema.module, self.raw_model
            state["ema_n_averaged"] = int(self.ema.n_averaged)
        path = None
        if self.world.is_main:
            path = ckpt.save_checkpoint(self.run_dir / "checkpoints", self.step, model, state,
                                        self.cfg.train.keep_checkpoints, raw_model=raw)
        barrier(self.world)
        return path

    def _saved_model(self) -> torch.nn.Module:
        """The model a checkpoint holds: the trained one, or ``saved(trained)`` (e.g. a LoRA model merged)."""
        if getattr(self, "saved", None) is None:
            return self.raw_model
        was = self.raw_model.training
        try:
            return self.saved(self.raw_model).eval()
        finally:
            self.raw_model.train(was)

    # ---- end of run --------------------------------------------------------------------
    def samples(self, n: int = 2) -> list[str]:
        """Generated text for LM runs (prompt: the start of the validation split)."""
        if self.data.kind != "corpus" or self.cfg.train.sample_tokens <= 0:
            return []
        x, _ = next(iter(self.data.iter_eval("val", 1, 1)))
        prompt = x[:, : min(16, x.shape[1])].to(self.device)
        g = torch.Generator(device=self.device).manual_seed(0)
        out = []
        model = self.ema.module if self.ema is not None else self.raw_model
        max_new = self.cfg.train.sample_tokens
        if model.position.max_len is not None:
            max_new = min(max_new, model.position.max_len - prompt.shape[1])
        for _ in range(n):
            with self._autocast():
                ids = model.generate(prompt, max_new, temperature=0.8, top_k=50, generator=g)
            out.append(self.data.decode(ids[0].tolist()))
        return out

    def finish(self) -> dict[str, Any]:
        final = {}
        if self.world.is_main and self.record:
            from modformer.train.logging import read_metrics

            rows = read_metrics(self.run_dir / "metrics.jsonl")
            last_val = [r for r in rows if r["split"] == "val"]
            final = {k: v for k, v in (last_val[-1] if last_val else {}).items() if k not in ("split",)}
        summary = {"steps": self.step, "stop_reason": self.stop_reason, "wall_s": self.wall(),
                   **{f"final_val_{k}": v for k, v in final.items() if k not in ("step", "wall_s")},
                   **self.best, "params": sum(p.numel() for p in {id(p): p for p in
                                                                  unwrap(self.raw_model).parameters()}.values()),
                   "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
                   "world_size": self.world.size}
        if self.pruner is not None:
            summary["sparsity"] = self.pruner.sparsity()
        if not self.record:
            return summary
        if self.world.is_main:
            write_summary(self.run_dir, summary)
            metric = "ppl" if self.data.kind == "corpus" else "acc"
            plot_metrics(self.run_dir, metric)
        samples = self.samples() if self.world.is_main or self.sharded else []   # FSDP: all ranks decode
        if self.world.is_main:
            report = write_report(self.run_dir, self.cfg.to_dict(), summary, samples)
            summary["report"] = str(report)
        return summary
