"""Scaling laws on algorithmic tasks: loss vs parameters and steps-to-generalise vs training data, with fits.

Two tasks, each trained over a grid of model widths (fixed depth; head size fixed, so wider = more heads) x
amounts of training data x seeds:

* **modular**: ``a + b (mod p)`` with configs/grokking.yaml's recipe (AdamW 7e-3, weight decay 2, batch 512,
  label smoothing 0.2); the data axis is the share of all p^2 pairs used for training (``--fractions``);
  validation = the first 1000 held-out pairs;
* **sort**: sort ``--sort-length`` digits (0..``--sort-symbols``-1) with the recipe of
  configs/sweeps/archsearch_sort.yaml (LayerNorm, GPT-2 init, AdamW 3e-3, weight decay 0.1, batch 128); the data
  axis is the number of training sequences (``--sort-train``); validation = ``--sort-val`` other sequences.

Per run: non-embedding parameters, **steps to generalise** (the first evaluation whose validation accuracy, token
level on the answer tokens, is >= ``--target``; None = not within the step budget), the **validation loss at a
fixed step** (``--*-loss-step``: every run reaches it, so the sizes are compared at equal steps) and the lowest
validation loss of the evaluations up to that step (the default loss fitted: a single evaluation can sit on a
loss spike), the last validation loss / accuracy, steps run and wall seconds. A run stops early once it has
generalised *and* passed its loss step (a trainer callback), else at its step budget.

Fits (``modformer.sweep.scaling.fit_power``, the fitter behind ``modformer scaling``, with its row bootstrap: the
runs are resampled, 95% percentile intervals):

* (a) loss by the fixed step vs parameters N: ``L = E + A N^-alpha``, one fit per data setting; the headline is
  the largest data setting;
* (b) steps to generalise vs training data x (fraction or sequences): ``S = A x^-beta``, over the runs that
  generalised, one fit per width; the headline is the largest width.

A fit is flagged not meaningful when it has < 3 distinct x values or < 5 points (then not fitted at all), an
exponent or its 95% interval at the fitter's search bound (the data do not determine it), or a 95% interval
wider than 10x. Steps to generalise are censored at the budget: runs that did not get there are left out of (b).
Writes OUT/algo_scaling.json and OUT/algo_scaling.png (both relations with their fits).

Examples:
    modformer bench algo-scaling --out benchmarks/results     # the committed CPU run (about 15 minutes, 1 thread)
    modformer bench algo-scaling --tiny --out /tmp/as         # seconds: a smoke test, not a measurement
    modformer bench algo-scaling --tasks sort --sort-train 400 800 1600 --sort-seeds 0 1 2 3
"""

from __future__ import annotations

import argparse
import itertools
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modformer.bench.common import CONFIGS, DEFAULT_OUT, cases, parse_with_preset, print_table, write_result
from modformer.cli import HelpFormatter
from modformer.config import ConfigError, RunConfig, load_config
from modformer.sweep.scaling import fit_power
from modformer.train.logging import read_metrics
from modformer.train.trainer import Trainer, TrainingError

TASKS = ("modular", "sort")
BOUNDS = (0.01, 2.5)          # the exponent search range of sweep.scaling (a fit at an end is not determined)
MIN_POINTS, MIN_DISTINCT, MAX_CI_RATIO = 5, 3, 10.0


# ---- fits ----------------------------------------------------------------------------------------------------
def fit_relation(x: Any, y: Any, irreducible: bool, bootstrap: int = 500, seed: int = 0) -> dict[str, Any]:
    """``y = E + A x^-alpha`` (``irreducible=False``: E = 0) by ``sweep.scaling.fit_power`` with its row bootstrap.

    Returns the points used, the parameters, the exponent's 95% interval and a verdict: ``fitted`` False with
    a ``note`` below 3 distinct x or 5 points; ``meaningful`` False (``note`` says why) when an exponent sits at
    the search bound or its interval spans more than a factor 10."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    x, y = x[ok], y[ok]
    out: dict[str, Any] = {"points": int(len(x)), "distinct_x": int(len(np.unique(x))), "fitted": False,
                           "meaningful": False}
    if out["distinct_x"] < MIN_DISTINCT or out["points"] < MIN_POINTS:
        out["note"] = (f"not fitted: {out['points']} points at {out['distinct_x']} distinct x "
                       f"(needs >= {MIN_POINTS} points at >= {MIN_DISTINCT})")
        return out
    fit = fit_power(x, y, irreducible=irreducible, bootstrap=bootstrap, seed=seed)
    lo, hi = fit.interval("alpha")
    out.update(fitted=True, E=fit.params["E"], A=fit.params["A"], alpha=fit.params["alpha"], ci95=[lo, hi],
               bootstrap=bootstrap, form="E + A x^-alpha" if irreducible else "A x^-alpha")
    reasons = []
    if abs(fit.params["alpha"] - BOUNDS[0]) < 1e-6:
        reasons.append(f"the exponent is at the lower search bound {BOUNDS[0]}: no decrease with x resolved "
                       "(flat, or rising)")
    elif abs(fit.params["alpha"] - BOUNDS[1]) < 1e-6:
        reasons.append(f"the exponent is at the upper search bound {BOUNDS[1]}: steeper than any power law in "
                       "range (a step)")
    elif lo <= BOUNDS[0] + 1e-6 or hi >= BOUNDS[1] - 1e-6:
        reasons.append(f"the 95% interval [{lo:.3g}, {hi:.3g}] reaches the search bound {BOUNDS}")
    elif hi / max(lo, 1e-12) > MAX_CI_RATIO:
        reasons.append(f"the 95% interval [{lo:.3g}, {hi:.3g}] spans more than {MAX_CI_RATIO:g}x")
    out["meaningful"] = not reasons
    out["note"] = "; ".join(reasons) if reasons else "ok"
    return out


def predict(fit: dict[str, Any], x: np.ndarray) -> np.ndarray:
    return fit["E"] + fit["A"] * np.asarray(x, dtype=float) ** -fit["alpha"]


def task_fits(rows: list[dict[str, Any]], bootstrap: int, seed: int, loss_key: str = "best_loss_to_step"
              ) -> dict[str, Any]:
    """(a) ``loss_key`` (the loss measured at the fixed step) vs parameters, one fit per data setting; (b) steps to
    generalise vs data over the generalised runs, one fit per width."""
    datas = sorted({r["data"] for r in rows})
    widths = sorted({r["width"] for r in rows})
    loss = {}
    for d in datas:
        cell = [r for r in rows if r["data"] == d and r[loss_key] is not None]
        loss[str(d)] = fit_relation([r["params"] for r in cell], [r[loss_key] for r in cell], True,
                                    bootstrap, seed)
    steps = {}
    for w in widths:
        cell = [r for r in rows if r["width"] == w and r["steps_to_generalise"] is not None]
        steps[str(w)] = fit_relation([r["data"] for r in cell], [r["steps_to_generalise"] for r in cell], False,
                                     bootstrap, seed)
    return {"loss_vs_params": loss, "steps_vs_data": steps}


# ---- runs ----------------------------------------------------------------------------------------------------
def heads(width: int, head_dim: int) -> int:
    return max(1, width // head_dim)


def modular_config(width: int, fraction: float, seed: int, args: argparse.Namespace, runs: Path) -> RunConfig:
    """configs/grokking.yaml at ``width`` (d_ff 4x, heads of ``--head-dim``) on ``fraction`` of the pairs."""
    run = load_config(CONFIGS / "grokking.yaml")
    run.name, run.out_dir = f"modular_w{width}_f{fraction:g}_s{seed}", str(runs)
    m = run.model
    m.d_model, m.d_ff, m.n_layer, m.n_head = width, 4 * width, args.layers, heads(width, args.head_dim)
    run.data.options = {**run.data.options, "p": args.modulus, "train_fraction": fraction, "seed": seed}
    t = run.train
    t.steps, t.eval_every, t.log_every = args.mod_steps, args.eval_every, args.eval_every
    return run


def sort_config(width: int, n_train: int, seed: int, args: argparse.Namespace, runs: Path) -> RunConfig:
    """Sorting with configs/sweeps/archsearch_sort.yaml's recipe: ``n_train`` training + ``--sort-val`` val."""
    run = load_config(CONFIGS / "grokking.yaml")
    run.name, run.out_dir = f"sort_w{width}_n{n_train}_s{seed}", str(runs)
    m = run.model
    m.d_model, m.d_ff, m.n_layer, m.n_head = width, 4 * width, args.layers, heads(width, args.head_dim)
    m.max_seq_len, m.norm, m.init, m.embed_init_std, m.tie_embeddings = 2 * args.sort_length, "layernorm", \
        "gpt2", None, True
    total = n_train + args.sort_val
    run.data.name = "sort"
    run.data.options = {"length": args.sort_length, "n_symbols": args.sort_symbols, "n_examples": total,
                        "train_fraction": (n_train + 0.5) / total, "seed": seed}   # int(total * f) == n_train
    t = run.train
    t.steps, t.eval_every, t.log_every = args.sort_steps, args.sort_eval_every, args.sort_eval_every
    t.batch_size, t.lr, t.betas, t.weight_decay, t.decay_embeddings = args.sort_batch, 3e-3, (0.9, 0.98), 0.1, False
    t.label_smoothing, t.warmup_steps, t.eval_batches, t.eval_batch_size = 0.0, 20, 0, 1000
    return run


class StopWhenGeneralised:
    """Trainer callback: the first evaluation step whose best validation accuracy is >= ``target``; stops the run
    once that has happened and the run is at or past ``loss_step`` (so every run has its loss at that step)."""

    def __init__(self, target: float, loss_step: int) -> None:
        self.target, self.loss_step, self.step = target, loss_step, None

    def __call__(self, trainer: Trainer, step: int) -> None:
        if self.step is None and step % trainer.cfg.train.eval_every == 0 and \
                trainer.best.get("val_acc", -1.0) >= self.target:
            self.step = step
        if self.step is not None and step >= self.loss_step:
            trainer.stop_reason = f"generalised (val acc >= {self.target}) at step {self.step}"


def train_one(task: str, width: int, data: float, seed: int, args: argparse.Namespace, runs: Path) -> dict[str, Any]:
    cfg = (modular_config(width, data, seed, args, runs) if task == "modular" else
           sort_config(width, int(data), seed, args, runs))
    t = cfg.train
    t.seed, t.device, t.progress, t.tensorboard = seed, "cpu", False, False
    t.early_stop_metric = t.early_stop_target = None             # the callback stops instead (after the loss step)
    t.deterministic, t.threads = args.threads == 1, args.threads
    loss_step = args.mod_loss_step if task == "modular" else args.sort_loss_step
    stop = StopWhenGeneralised(args.target, loss_step)
    t0 = time.perf_counter()
    trainer = Trainer(cfg, overwrite=True, callbacks=[stop], record=False)
    row: dict[str, Any] = {"task": task, "width": width, "heads": cfg.model.n_head, "n_layer": cfg.model.n_layer,
                           "data": data, "train_examples": trainer.data.split_size("train"),
                           "val_examples": trainer.data.split_size("val"), "seed": seed,
                           "params": trainer.raw_model.num_params(non_embedding=True),
                           "params_total": trainer.raw_model.num_params()}
    try:
        trainer.fit()
        row["nonfinite"] = False
    except TrainingError:
        row["nonfinite"] = True
    vals = [r for r in read_metrics(runs / cfg.name / "metrics.jsonl") if r["split"] == "val"]
    at = [r for r in vals if r["step"] == loss_step]
    ok = at and math.isfinite(at[0]["loss"])
    upto = [r["loss"] for r in vals if r["step"] <= loss_step and math.isfinite(r["loss"])]
    row.update(steps_to_generalise=stop.step, generalised=stop.step is not None, loss_step=loss_step,
               loss_at_step=at[0]["loss"] if ok else None, acc_at_step=at[0]["acc"] if ok else None,
               best_loss_to_step=min(upto) if ok and upto else None,
               final_val_loss=vals[-1]["loss"] if vals else None, final_val_acc=vals[-1]["acc"] if vals else None,
               steps_run=trainer.step, wall_s=time.perf_counter() - t0)
    return row


# ---- plot ----------------------------------------------------------------------------------------------------
def plot(rows: list[dict[str, Any]], fits: dict[str, Any], tasks: list[str], path: Path, label: str,
         loss_key: str = "best_loss_to_step") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from modformer.utils import atomic_write

    fig, axes = plt.subplots(len(tasks), 2, figsize=(11, 4 * len(tasks)), squeeze=False)
    for i, task in enumerate(tasks):
        mine = [r for r in rows if r["task"] == task]
        xname = "train fraction of all pairs" if task == "modular" else "training sequences"
        ax = axes[i][0]
        for j, d in enumerate(sorted({r["data"] for r in mine})):
            cell = [r for r in mine if r["data"] == d and r[loss_key] is not None]
            ax.scatter([r["params"] for r in cell], [r[loss_key] for r in cell], color=f"C{j}", s=18,
                       label=f"{xname.split()[0]} {d:g}")
            f = fits[task]["loss_vs_params"].get(str(d), {})
            if f.get("fitted") and cell:
                grid = np.geomspace(min(r["params"] for r in cell) / 1.2, max(r["params"] for r in cell) * 1.2, 60)
                ax.plot(grid, predict(f, grid), color=f"C{j}", lw=1, ls="-" if f["meaningful"] else ":",
                        label=f"α={f['alpha']:.2g} [{f['ci95'][0]:.2g}, {f['ci95'][1]:.2g}]")
        ax.set_xscale("log")
        ax.set_xlabel("non-embedding parameters N")
        step = mine[0]["loss_step"] if mine else "?"
        ax.set_ylabel(f"best val loss up to step {step}" if loss_key == "best_loss_to_step" else
                      f"val loss at step {step}")
        ax.set_title(f"{task}: loss vs parameters (L = E + A N^-α)", fontsize=9)
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
        ax = axes[i][1]
        for j, w in enumerate(sorted({r["width"] for r in mine})):
            cell = [r for r in mine if r["width"] == w and r["steps_to_generalise"] is not None]
            if not cell:
                continue
            ax.scatter([r["data"] for r in cell], [r["steps_to_generalise"] for r in cell], color=f"C{j}", s=18,
                       label=f"width {w}")
            f = fits[task]["steps_vs_data"].get(str(w), {})
            if f.get("fitted"):
                grid = np.geomspace(min(r["data"] for r in cell) / 1.1, max(r["data"] for r in cell) * 1.1, 60)
                ax.plot(grid, predict(f, grid), color=f"C{j}", lw=1, ls="-" if f["meaningful"] else ":",
                        label=f"β={f['alpha']:.2g} [{f['ci95'][0]:.2g}, {f['ci95'][1]:.2g}]")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xname)
        ax.set_ylabel("steps to generalise")
        ax.set_title(f"{task}: steps to val acc >= target (S = A x^-β; generalised runs only)", fontsize=9)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
        else:
            ax.text(0.5, 0.5, "no run generalised", transform=ax.transAxes, ha="center")
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(label, fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return path


# ---- main ----------------------------------------------------------------------------------------------------
def headline_for(task: str, rows: list[dict[str, Any]], fits: dict[str, Any]) -> dict[str, Any]:
    mine = [r for r in rows if r["task"] == task]
    gen = [r for r in mine if r["generalised"]]
    d_top, w_top = str(max(r["data"] for r in mine)), str(max(r["width"] for r in mine))
    a, b = fits["loss_vs_params"][d_top], fits["steps_vs_data"][w_top]
    return {f"{task}_runs": len(mine), f"{task}_generalised": len(gen),
            f"{task}_generalised_share": len(gen) / len(mine),
            f"{task}_loss_alpha": a.get("alpha"), f"{task}_loss_alpha_ci95": a.get("ci95"),
            f"{task}_loss_fit_at_data": float(d_top), f"{task}_loss_fit_meaningful": a["meaningful"],
            f"{task}_loss_fit_note": a["note"],
            f"{task}_steps_beta": b.get("alpha"), f"{task}_steps_beta_ci95": b.get("ci95"),
            f"{task}_steps_fit_at_width": int(w_top), f"{task}_steps_fit_meaningful": b["meaningful"],
            f"{task}_steps_fit_note": b["note"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="modformer bench algo-scaling", description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter, epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS), help="tasks to run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="modular: seeds (data split and init)")
    p.add_argument("--sort-seeds", type=int, nargs="+", default=[0, 1, 2], help="sort: seeds (data and init)")
    p.add_argument("--layers", type=int, default=2, help="layers of every model (the depth is fixed)")
    p.add_argument("--head-dim", type=int, default=32, help="attention head size: heads = max(1, width // this)")
    p.add_argument("--target", type=float, default=0.99, help="validation accuracy that counts as generalised")
    p.add_argument("--p", dest="modulus", type=int, default=113, help="modular: the modulus")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.3, 0.4, 0.5, 0.7],
                   help="modular: shares of all p^2 pairs used for training")
    p.add_argument("--mod-widths", type=int, nargs="+", default=[32, 64, 96, 128], help="modular: model widths")
    p.add_argument("--mod-steps", type=int, default=600, help="modular: step budget per run")
    p.add_argument("--mod-loss-step", type=int, default=300,
                   help="modular: the step whose val loss is fitted against parameters")
    p.add_argument("--eval-every", type=int, default=10, help="modular: steps between evaluations")
    p.add_argument("--sort-length", type=int, default=10, help="sort: digits per sequence")
    p.add_argument("--sort-symbols", type=int, default=10, help="sort: distinct digits")
    p.add_argument("--sort-train", type=int, nargs="+", default=[200, 400, 800, 1600],
                   help="sort: training sequences (the data axis)")
    p.add_argument("--sort-val", type=int, default=500, help="sort: validation sequences")
    p.add_argument("--sort-widths", type=int, nargs="+", default=[16, 24, 32, 48], help="sort: model widths")
    p.add_argument("--sort-steps", type=int, default=400, help="sort: step budget per run")
    p.add_argument("--sort-loss-step", type=int, default=200,
                   help="sort: the step whose val loss is fitted against parameters")
    p.add_argument("--sort-eval-every", type=int, default=20, help="sort: steps between evaluations")
    p.add_argument("--sort-batch", type=int, default=128, help="sort: batch size")
    p.add_argument("--loss-measure", choices=["best", "at_step"], default="best",
                   help="loss fitted against parameters: best = the lowest val loss of the evaluations up to the "
                        "loss step (robust to loss spikes); at_step = the val loss at that step")
    p.add_argument("--bootstrap", type=int, default=500, help="bootstrap refits per fit (runs resampled)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: deterministic runs)")
    p.add_argument("--tiny", action="store_true",
                   help="seconds-long smoke test: p=23, widths 8 16 24, two data settings, 20 steps, sort of 4 digits; "
                        "not a measurement")
    p.add_argument("--runs-dir", default=None, help="keep the run folders here (default: a temporary folder)")
    p.add_argument("--out", default=DEFAULT_OUT, help="result folder (benchmarks/results: the committed answer)")
    args = parse_with_preset(p, argv, "--tiny", modulus=23, fractions=[0.5, 0.9], mod_widths=[8, 16, 24],
                             mod_steps=20, mod_loss_step=10, eval_every=5, sort_length=4, sort_train=[20, 80],
                             sort_val=40, sort_widths=[8, 16, 24], sort_steps=20, sort_loss_step=10,
                             sort_eval_every=5, sort_batch=32, head_dim=8, bootstrap=50, sort_seeds=[0, 1])
    for task, steps, loss_step, every in (("mod", args.mod_steps, args.mod_loss_step, args.eval_every),
                                          ("sort", args.sort_steps, args.sort_loss_step, args.sort_eval_every)):
        if not (0 < loss_step <= steps) or loss_step % every or steps % every:
            raise ConfigError(f"--{task}-loss-step ({loss_step}) and --{task}-steps ({steps}) must be multiples of "
                              f"the evaluation interval ({every}), with 0 < loss step <= steps")
    grid = []
    if "modular" in args.tasks:
        grid += [("modular", w, f, s) for f, w, s in itertools.product(args.fractions, args.mod_widths, args.seeds)]
    if "sort" in args.tasks:
        grid += [("sort", w, n, s) for n, w, s in itertools.product(args.sort_train, args.sort_widths, args.sort_seeds)]
    rows: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(args.runs_dir or tmp)
        runs.mkdir(parents=True, exist_ok=True)
        for task, w, d, s in cases(grid, "algo-scaling", lambda c: f"next: {c[0]} width {c[1]} data {c[2]:g} "
                                                                   f"seed {c[3]}"):
            rows.append(train_one(task, w, d, s, args, runs))
            r = rows[-1]
            print(f"[{len(rows)}/{len(grid)}] {task} width {w} data {d:g} seed {s}: params {r['params']}, "
                  f"steps to {args.target} {r['steps_to_generalise']}, loss@{r['loss_step']} "
                  f"{r['loss_at_step']}, {r['wall_s']:.1f}s", flush=True)
    train_s = time.perf_counter() - t_start
    loss_key = "best_loss_to_step" if args.loss_measure == "best" else "loss_at_step"
    fits = {task: task_fits([r for r in rows if r["task"] == task], args.bootstrap, 0, loss_key)
            for task in args.tasks}
    print_table(rows, ["task", "width", "params", "data", "seed", "steps_to_generalise", "best_loss_to_step",
                       "loss_at_step",
                       "final_val_acc", "steps_run", "wall_s"])
    headline: dict[str, Any] = {"target_val_acc": args.target, "modular_seeds": len(args.seeds),
                                "sort_seeds": len(args.sort_seeds), "train_seconds": train_s}
    for task in args.tasks:
        headline.update(headline_for(task, rows, fits[task]))
    for k, v in headline.items():
        print(f"  {k}: {v}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scale = "tiny smoke test (not a measurement)" if args.tiny else f"CPU, {args.threads} thread(s), small scale"
    png = plot(rows, fits, args.tasks, out / "algo_scaling.png", f"algo-scaling: {scale}; target val acc "
               f"{args.target}; seeds: modular {args.seeds}, sort {args.sort_seeds}", loss_key)
    config = {k: getattr(args, k) for k in vars(args) if k not in ("out", "runs_dir")}
    extra = {"fits": fits, "config": config, "plot": png.name,
             "note": (scale + ". loss_at_step: val loss at the fixed --*-loss-step; best_loss_to_step: the lowest "
                      f"val loss of the evaluations up to it (fitted: {loss_key}); steps_to_generalise: first "
                      "evaluation with val acc >= target (None = not within the budget). Fits: "
                      "modformer.sweep.scaling.fit_power, row bootstrap over runs, 95% percentile intervals.")}
    path = write_result("algo_scaling", headline, rows, torch.device("cpu"), out, extra=extra)
    print(f"wrote {path} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
