"""Distillation engine: train a student (the teacher with its attention swapped) to match the teacher.

``modformer distill CONFIG.yaml [key=value ...]`` reads a ``DistillConfig``::

    name: sparse_window
    teacher: runs/sparse_teacher/hf      # modformer run dir | saved model dir | HF GPT-2 dir (save_pretrained)
    student: {attention: sliding_window, attention_options: {window: 128}, attn_backend: flex}
    data: {name: wikitext2, seq_len: 1024}
    trainable: ["blocks.*.attn"]         # fnmatch patterns of module names; everything else is frozen
    steps: 300 ...

The student is built from the teacher's ModelConfig with the ``student`` fields replaced, and every
teacher weight is copied (new modules such as a learned gate keep their own init). Each step runs
teacher (no grad) and student on the same batch and minimises

    kl_weight * T^2 KL(P_teacher^T || P_student^T)       (next-token distributions at temperature T)
    + ce_weight * CE(student, targets) + hidden_weight * sum_l MSE(resid_post_l) + attn_out_weight *
    sum_l MSE(attn_out_l) + aux_weight * student.aux_loss   (e.g. the learned gate's block-map loss)

with AdamW over the trainable parameters. The run folder looks like a training run's: ``config.yaml``
(a RunConfig of the student, so ``modformer eval/generate`` work), ``distill.yaml``, ``metrics.jsonl``
(train rows: loss, kl; val rows: kl, top1_agree, ppl, teacher_ppl, ppl_retention, acc, teacher_acc),
``checkpoints/`` and ``summary.json``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from modformer.bench.fidelity import next_token_kl
from modformer.config import (
    DataConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    apply_overrides,
    from_dict,
    read_yaml_mapping,
)
from modformer.registry import ConfigError
from modformer.train.schedule import lr_schedule
from modformer.validation import DEVICE, check_fields, check_plain_name


@dataclass
class DistillConfig:
    """What to distil into what, and how."""

    name: str = "distill"
    out_dir: str = "runs"
    teacher: str = ""
    student: dict[str, Any] = field(default_factory=dict)    # ModelConfig fields replaced in the student
    data: DataConfig | None = None       # None: the teacher run's data
    trainable: list[str] = field(default_factory=lambda: ["blocks.*.attn"])
    steps: int = 200
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = 0
    schedule: str = "constant"           # constant | cosine | linear | wsd (after warm-up, to min_lr)
    min_lr: float = 0.0
    grad_clip: float = 1.0
    temperature: float = 1.0
    kl_weight: float = 1.0
    ce_weight: float = 0.0
    hidden_weight: float = 0.0
    attn_out_weight: float = 0.0
    aux_weight: float = 1.0
    eval_every: int = 100
    eval_batches: int = 8
    eval_batch_size: int | None = None
    log_every: int = 10
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    progress: bool = True
    tensorboard: bool = False

    RULES: ClassVar[dict[str, Any]] = {        # value rules (validation.check_fields); None passes
        "steps": ">= 1", "batch_size": ">= 1", "lr": "> 0", "weight_decay": ">= 0", "betas": "[0, 1)",
        "warmup_steps": ">= 0", "min_lr": ">= 0", "grad_clip": [">= 0", "0 disables clipping"],
        "temperature": "> 0", "kl_weight": ">= 0", "ce_weight": ">= 0", "hidden_weight": ">= 0",
        "attn_out_weight": ">= 0", "aux_weight": ">= 0", "eval_every": ">= 1",
        "eval_batches": [">= 0", "0 = the full split"], "eval_batch_size": ">= 1", "log_every": ">= 1",
        "device": DEVICE, "dtype": ("auto", "float32", "bfloat16", "float16"), "seed": ">= 0"}

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    def validate(self) -> DistillConfig:
        """Raise a one-line ConfigError naming the first bad field."""
        check_plain_name(self.name, "name")
        check_fields(self, "")
        if self.data is not None:
            self.data.validate()
        return self


def load_distill_config(path: str | Path, overrides: list[str] | None = None) -> DistillConfig:
    cfg = from_dict(DistillConfig, read_yaml_mapping(path))
    return (apply_overrides(cfg, overrides) if overrides else cfg).validate()


# ---- models --------------------------------------------------------------------------------
def load_teacher(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, DataConfig | None]:
    """A modformer run dir (newest checkpoint + its data config), a saved model dir, or an HF GPT-2 dir."""
    from modformer.runs import load_any, run_config

    path = Path(path)
    try:
        model = load_any(path, device)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"teacher {e}") from None
    return model, run_config(path).data if (path / "config.yaml").is_file() else None


def build_student(teacher: nn.Module, overrides: dict[str, Any]) -> nn.Module:
    """The teacher's architecture with ``overrides`` (e.g. ``attention``) and the teacher's weights."""
    from modformer.saving import build_model

    data = dataclasses.asdict(teacher.cfg)
    bad = set(overrides) - set(data)
    if bad:
        raise ConfigError(f"student: unknown ModelConfig fields {sorted(bad)}")
    data.update(overrides)
    if "attention" in overrides and "attention_options" not in overrides:
        data["attention_options"] = {}
    student = build_model(from_dict(ModelConfig, data))
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    if unexpected:
        raise ConfigError(f"student has no place for teacher weights {unexpected[:5]}")
    ref = next(teacher.parameters())
    return student.to(device=ref.device, dtype=ref.dtype)


def freeze_except(model: nn.Module, patterns: list[str]) -> list[str]:
    """Freeze every parameter outside the modules matching ``patterns`` (fnmatch); returns trained names."""
    names = []
    for name, p in model.named_parameters():
        keep = any(fnmatch.fnmatchcase(name, pat) or fnmatch.fnmatchcase(name, pat + ".*") for pat in patterns)
        p.requires_grad_(keep)
        if keep:
            names.append(name)
    if not names:
        raise ConfigError(f"trainable: {patterns} match no parameter of the student")
    return names


def _capture(model: nn.Module, names: list[str]) -> tuple[dict[str, Tensor], list[Any]]:
    store: dict[str, Tensor] = {}
    points = model.hook_points()
    handles = [points[n].add_hook(lambda x, hook, n=n: store.__setitem__(n, x)) for n in names]
    return store, handles


# ---- the engine ----------------------------------------------------------------------------
class Distiller:
    """Teacher + student + optimizer + logging for one distillation run."""

    def __init__(self, cfg: DistillConfig, teacher: nn.Module | None = None, data: Any = None,
                 overwrite: bool = True) -> None:
        from modformer.data import build_dataset
        from modformer.train.logging import MetricsLogger
        from modformer.train.trainer import resolve_device, resolve_dtype

        self.cfg = cfg.validate()
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        if teacher is None:
            if not cfg.teacher:
                raise ConfigError("teacher: path of a run folder, saved model or HF GPT-2 folder is required")
            teacher, teacher_data = load_teacher(cfg.teacher, self.device)
        else:
            teacher_data = None
        data_cfg = cfg.data or teacher_data
        if data is None:
            if data_cfg is None:
                raise ConfigError("data: required when the teacher is not a run folder")
            data = build_dataset(data_cfg)
        self.data, self.data_cfg = data, data_cfg or DataConfig()
        self.teacher = teacher.to(self.device).eval().requires_grad_(False)
        if self.data.vocab_size > teacher.cfg.vocab_size:
            raise ConfigError(f"data vocabulary ({self.data.vocab_size}) exceeds the teacher's "
                              f"({teacher.cfg.vocab_size})")
        torch.manual_seed(cfg.seed)
        # no dropout unless asked: the student should match the teacher's deterministic predictions
        self.student = build_student(self.teacher, {"dropout": 0.0, "attn_dropout": 0.0, **cfg.student})
        self.trained = freeze_except(self.student, cfg.trainable)
        params = [p for p in self.student.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        self._schedule = lr_schedule(TrainConfig(steps=cfg.steps, lr=cfg.lr, min_lr=cfg.min_lr,
                                                 warmup_steps=cfg.warmup_steps, schedule=cfg.schedule))
        self.gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.step = 0
        self.run_dir = cfg.run_dir
        if self.run_dir.exists() and (self.run_dir / "metrics.jsonl").exists():
            if not overwrite:
                raise ConfigError(f"{self.run_dir} already holds a run")
            (self.run_dir / "metrics.jsonl").unlink()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._write_configs()
        self.logger = MetricsLogger(self.run_dir, cfg.tensorboard)
        self.t0 = time.perf_counter()
        L = self.student.cfg.n_layer
        self.hidden = [f"blocks.{i}.hook_resid_post" for i in range(L)] if cfg.hidden_weight else []
        self.attn_out = [f"blocks.{i}.hook_attn_out" for i in range(L)] if cfg.attn_out_weight else []

    def _write_configs(self) -> None:
        from modformer.config import save_yaml
        from modformer.utils import atomic_write_text

        run = RunConfig(name=self.cfg.name, out_dir=self.cfg.out_dir, model=self.student.cfg, data=self.data_cfg,
                        train=TrainConfig(steps=self.cfg.steps, batch_size=self.cfg.batch_size, lr=self.cfg.lr,
                                          eval_batches=self.cfg.eval_batches, device=self.cfg.device))
        save_yaml(run, self.run_dir / "config.yaml")
        atomic_write_text(self.run_dir / "distill.yaml", yaml.safe_dump(dataclasses.asdict(self.cfg), sort_keys=False))

    def _autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def lr_at(self, step: int) -> float:
        return self._schedule(step)

    def train_step(self) -> dict[str, float]:
        c = self.cfg
        x, y = self.data.get_batch("train", c.batch_size, self.gen)
        x, y = x.to(self.device), y.to(self.device)
        self.student.train()
        names = self.hidden + self.attn_out
        t_store, t_handles = _capture(self.teacher, names)
        s_store, s_handles = _capture(self.student, names)
        try:
            with self._autocast():
                with torch.no_grad():
                    t_logits = self.teacher(x)
                s_logits = self.student(x)
        finally:
            for h in t_handles + s_handles:
                h.remove()
        mask = y != -100
        kl = next_token_kl(t_logits, s_logits, c.temperature, mask)
        loss = c.kl_weight * c.temperature ** 2 * kl
        if c.ce_weight:
            loss = loss + c.ce_weight * F.cross_entropy(s_logits.flatten(0, 1).float(), y.flatten(), ignore_index=-100)
        for n in names:
            w = c.hidden_weight if n in self.hidden else c.attn_out_weight
            loss = loss + w * F.mse_loss(s_store[n].float(), t_store[n].float())
        aux = getattr(self.student, "aux_loss", None)
        if aux is not None and c.aux_weight:
            loss = loss + c.aux_weight * aux
        for g in self.opt.param_groups:
            g["lr"] = self.lr_at(self.step)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if c.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in self.student.parameters() if p.requires_grad], c.grad_clip)
        self.opt.step()
        self.step += 1
        row = {"loss": float(loss.detach()), "kl": float(kl.detach())}
        if aux is not None:
            row["aux_loss"] = float(aux.detach())
        return row

    @torch.no_grad()
    def evaluate(self, max_batches: int | None = None) -> dict[str, float]:
        """Fidelity on the validation split: KL, top-1 agreement, ppl / acc of both and retention."""
        from modformer.bench.fidelity import compare_models

        bs = self.cfg.eval_batch_size or self.cfg.batch_size
        with self._autocast():
            return compare_models(self.teacher, self.student, self.data.iter_eval(
                "val", bs, self.cfg.eval_batches if max_batches is None else max_batches))

    def save(self) -> Path:
        from modformer.train import checkpoint as ckpt

        state = {"step": self.step, "optimizer": self.opt.state_dict(), "rng": ckpt.rng_state(),
                 "data_gen": self.gen.get_state(), "model_config": dataclasses.asdict(self.student.cfg)}
        return ckpt.save_checkpoint(self.run_dir / "checkpoints", self.step, self.student, state, keep=1)

    def fit(self) -> dict[str, Any]:
        """Evaluate before training (no fine-tuning), train, evaluate, checkpoint; returns the summary."""
        from modformer.train.logging import ProgressDisplay
        from modformer.train.report import write_summary

        c = self.cfg
        before = self.evaluate()
        self.logger.log({"step": 0, "split": "val", **before, "wall_s": 0.0})
        progress = ProgressDisplay(c.steps, 0, c.progress, label="distill")
        progress.message(f"[distill {c.name}] before: kl {before['kl']:.4g}  ppl {before['ppl']:.4g} "
                         f"(teacher {before['teacher_ppl']:.4g})  trainable {len(self.trained)} tensors")
        rows: list[dict[str, float]] = []
        after = before
        try:
            while self.step < c.steps:
                rows.append(self.train_step())
                if not math.isfinite(rows[-1]["loss"]):
                    raise ValueError(f"distillation loss is {rows[-1]['loss']} at step {self.step}")
                if self.step % c.log_every == 0 or self.step == c.steps:
                    mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
                    self.logger.log({"step": self.step, "split": "train", **mean, "lr": self.lr_at(self.step - 1),
                                     "wall_s": time.perf_counter() - self.t0})
                    progress.update(self.step, f"loss {mean['loss']:.4g}  kl {mean['kl']:.4g}")
                    rows = []
                if self.step % c.eval_every == 0 or self.step == c.steps:
                    after = self.evaluate()
                    self.logger.log({"step": self.step, "split": "val", **after,
                                     "wall_s": time.perf_counter() - self.t0})
                    progress.message(f"[distill {c.name}] step {self.step}/{c.steps}  kl {after['kl']:.4g}  "
                                     f"agree {after['top1_agree']:.3f}  ppl {after['ppl']:.4g}")
        finally:
            progress.close()
            self.logger.close()
        self.save()
        summary = {"steps": self.step, "wall_s": time.perf_counter() - self.t0,
                   **{f"before_{k}": v for k, v in before.items()}, **{f"final_val_{k}": v for k, v in after.items()},
                   "trainable_params": sum(p.numel() for p in self.student.parameters() if p.requires_grad),
                   "student": c.student}
        write_summary(self.run_dir, summary)
        return summary


def cmd_distill(args: Any) -> int:
    cfg = load_distill_config(args.config, args.overrides)
    summary = Distiller(cfg).fit()
    print(json.dumps({k: v for k, v in summary.items() if k.startswith(("final_val_", "before_kl", "wall"))}))
    print(f"run: {cfg.run_dir}")
    return 0


def add_parser(sub: Any) -> None:
    """Register ``distill`` on the CLI's subparsers."""
    p = sub.add_parser("distill", help="distil a teacher into a student with another attention: "
                                       "modformer distill CONFIG.yaml [key=value ...]")
    p.add_argument("config", help="distillation YAML, e.g. configs/sparse_window.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. steps=500 student.attention_options.window=64")
    p.set_defaults(fn=cmd_distill)
