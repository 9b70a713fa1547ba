"""2017 vs modern recipe over many seeds: share of runs with a non-finite loss, gradient-norm variance, steps
to a fixed loss (seed 003's "NaN frequency 5% -> <0.1%", "gradient variance High -> Low", "100k -> 70k steps").

Recipes (model fields from ``studies.stability.RECIPES``): **2017** = post-LayerNorm, sinusoidal positions,
ReLU MLP, biases, sqrt(d)-scaled embeddings initialised at std d^-1/2, *no warmup*; **modern** = pre-RMSNorm,
RoPE, SwiGLU, no biases, warmup over the first 10% of steps. Both: Tiny Shakespeare characters, AdamW, cosine
schedule, gradient clip 1 (``--grad-clip 0`` removes it: clipping is itself a stabiliser), the same width, heads
and learning rate(s).
For every recipe x depth x learning rate x seed one short run; per cell:

* ``nonfinite_share``: runs whose training or validation loss became NaN/inf (the trainer stops them);
* ``grad_cv_time``: per layer (``interp.gradflow`` groups: ``blocks.i``, embeddings), the coefficient of
  variation (std / mean) of the gradient norm over the logged steps, median over layers, then over seeds;
* ``grad_layer_spread``: per logged step, std / mean of the per-block gradient norms across depth, median over
  steps, then over seeds (how unevenly the layers are trained);
* ``steps_to_target``: the first evaluation step whose validation loss is <= ``--target`` (median over the seeds
  that got there; ``reached`` counts them).

Examples:
    modformer bench recipe-stability --jobs 8                # GPU: depths 6 12 24, 20 seeds, lr 1e-3 and 3e-3
    modformer bench recipe-stability --tiny --out runs/bench # CPU: depths 2 4, 20 seeds, 40 steps
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

from modformer.bench.common import DEFAULT_OUT, map_cases, parse_with_preset, print_table, write_result
from modformer.bench.studies.stability import RECIPES
from modformer.cli import HelpFormatter
from modformer.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from modformer.interp.gradflow import GradFlowMonitor
from modformer.train.logging import read_metrics
from modformer.train.trainer import Trainer, TrainingError


def cv(values: list[float]) -> float | None:
    """std / mean (population std); None for fewer than two values or a zero mean."""
    if len(values) < 2 or not statistics.fmean(values):
        return None
    return statistics.pstdev(values) / statistics.fmean(values)


def extras(recipe: str, width: int) -> dict[str, float]:
    """The 2017 recipe's embedding init, std d^-1/2 (with its sqrt(d) scale: unit-size token embeddings beside the
    unit sinusoids, as configs/sweeps/stability.yaml); at std 0.02 the sinusoids drown them and it stalls."""
    return {"embed_init_std": width ** -0.5} if recipe == "y2017" else {}


def run_cell(cell: tuple[str, int, float, int], args: argparse.Namespace, runs: Path) -> dict[str, Any]:
    """``run_one`` of one (recipe, depth, lr, seed) cell, with its one-line outcome (a ``map_cases`` task)."""
    recipe, depth, lr, seed = cell
    r = run_one(recipe, depth, lr, seed, args, runs)
    print(f"{recipe} depth {depth} lr {lr:g} seed {seed}: "
          f"{'NON-FINITE at step ' + str(r['nonfinite_step']) if r['nonfinite'] else 'finite'}"
          f", steps to {args.target}: {r['steps_to_target']}", flush=True)
    return r


def run_one(recipe: str, depth: int, lr: float, seed: int, args: argparse.Namespace, runs: Path) -> dict[str, Any]:
    """One short run; its non-finite flag, gradient-norm statistics and steps to the target loss."""
    name = f"{recipe}_d{depth}_lr{lr:g}_s{seed}"
    cfg = RunConfig(
        name=name, out_dir=str(runs),
        model=ModelConfig(n_layer=depth, d_model=args.width, n_head=args.heads, max_seq_len=args.seq_len,
                          dropout=0.0, **RECIPES[recipe], **extras(recipe, args.width)),
        data=DataConfig(name="shakespeare_char", seq_len=args.seq_len),
        train=TrainConfig(steps=args.steps, batch_size=args.batch, lr=lr, warmup_steps=0 if recipe == "y2017"
                          else max(args.steps // 10, 1), grad_clip=args.grad_clip, eval_every=args.eval_every,
                          eval_batches=args.eval_batches, log_every=args.log_every, seed=seed, device=args.device,
                          progress=False, tensorboard=False, sample_tokens=0, optimizer_options={}))
    trainer = Trainer(cfg, overwrite=True)
    monitor = GradFlowMonitor(trainer.raw_model, every=args.log_every, path=runs / f"{name}.gradflow.jsonl")
    trainer.callbacks.append(monitor)
    row: dict[str, Any] = {"recipe": recipe, "depth": depth, "lr": lr, "seed": seed}
    try:
        trainer.fit()
        row["nonfinite"], row["nonfinite_step"] = False, None
    except TrainingError:
        row["nonfinite"], row["nonfinite_step"] = True, trainer.step
    finally:
        monitor.remove()
    history = [h for h in monitor.history if all(math.isfinite(v) for v in h["norms"].values())]
    layers = sorted({k for h in history for k in h["norms"]})
    per_layer = [cv([h["norms"][k] for h in history if k in h["norms"]]) for k in layers]
    per_layer = [v for v in per_layer if v is not None]
    row["grad_cv_time"] = statistics.median(per_layer) if per_layer else None
    spreads = [cv([v for k, v in h["norms"].items() if k.startswith("blocks.")]) for h in history]
    spreads = [v for v in spreads if v is not None]
    row["grad_layer_spread"] = statistics.median(spreads) if spreads else None
    vals = [r for r in read_metrics(runs / name / "metrics.jsonl") if r["split"] == "val"]
    hit = [r["step"] for r in vals if math.isfinite(r["loss"]) and r["loss"] <= args.target]
    row["steps_to_target"] = hit[0] if hit else None
    row["final_val_loss"] = vals[-1]["loss"] if vals else None
    return row


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per recipe x depth x lr: non-finite share, gradient statistics and steps to the target."""
    out = []
    for key in dict.fromkeys((r["recipe"], r["depth"], r["lr"]) for r in rows):
        cell = [r for r in rows if (r["recipe"], r["depth"], r["lr"]) == key]

        def med(field: str, cell: list[dict[str, Any]] = cell) -> float | None:
            vals = [r[field] for r in cell if r[field] is not None]
            return statistics.median(vals) if vals else None
        reached = [r for r in cell if r["steps_to_target"] is not None]
        out.append({"recipe": key[0], "depth": key[1], "lr": key[2], "runs": len(cell),
                    "nonfinite": sum(r["nonfinite"] for r in cell),
                    "nonfinite_share": sum(r["nonfinite"] for r in cell) / len(cell),
                    "grad_cv_time": med("grad_cv_time"), "grad_layer_spread": med("grad_layer_spread"),
                    "reached": len(reached), "steps_to_target": med("steps_to_target"),
                    "final_val_loss": med("final_val_loss")})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="modformer bench recipe-stability", description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter, epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES), help="recipes compared")
    p.add_argument("--depths", type=int, nargs="+", default=[6, 12, 24], help="layer counts")
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3], help="peak learning rates")
    p.add_argument("--seeds", type=int, default=20, help="seeds per recipe x depth x lr")
    p.add_argument("--width", type=int, default=256, help="model width")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--seq-len", type=int, default=128, help="context length")
    p.add_argument("--batch", type=int, default=32, help="batch size")
    p.add_argument("--steps", type=int, default=400, help="training steps per run")
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clip (0: off)")
    p.add_argument("--eval-every", type=int, default=25, help="steps between val evaluations")
    p.add_argument("--eval-batches", type=int, default=4, help="val batches per evaluation")
    p.add_argument("--log-every", type=int, default=5, help="training-loss check and gradient-norm record interval")
    p.add_argument("--target", type=float, default=2.2, help="validation loss (nats/char) for steps_to_target")
    p.add_argument("--tiny", action="store_true", help="CPU scale: depths 2 4, width 32, 40 steps, target 3.0")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="device: cpu, cuda, cuda:N")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once, each in its own process")
    p.add_argument("--runs-dir", default=None, help="keep the run folders here (default: a temporary folder)")
    p.add_argument("--name", default="recipe_stability", help="result file NAME.json (another question, another file)")
    p.add_argument("--out", default=DEFAULT_OUT, help="result folder (benchmarks/results: the committed answer)")
    args = parse_with_preset(p, argv, "--tiny", depths=[2, 4], lrs=[3e-3], width=32, heads=2, seq_len=32, batch=16,
                             steps=40, eval_every=10, eval_batches=2, log_every=5, target=3.0)
    device = torch.device(args.device)
    grid = list(itertools.product(args.recipes, args.depths, args.lrs, range(args.seeds)))
    config = {k: getattr(args, k) for k in ("depths", "lrs", "width", "heads", "seq_len", "batch", "steps",
                                            "grad_clip", "eval_every", "log_every", "target")}

    def write(rows: list[dict[str, Any]]) -> Path:
        """The result file from the runs finished so far (rewritten after each run)."""
        headline: dict[str, Any] = {"target_loss": args.target, "seeds": args.seeds, "steps": args.steps}
        for recipe in args.recipes:
            mine = [r for r in rows if r["recipe"] == recipe]
            headline[f"{recipe}_nonfinite_share"] = sum(r["nonfinite"] for r in mine) / len(mine) if mine else None
            headline[f"{recipe}_runs"] = len(mine)
        extra = {"summary": summarise(rows), "config": config}
        if len(rows) < len(grid):
            extra["partial"] = f"{len(rows)} of {len(grid)} runs finished"
        return write_result(args.name, headline, rows, device, args.out, extra=extra)

    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(args.runs_dir or tmp)
        runs.mkdir(parents=True, exist_ok=True)
        rows = map_cases(functools.partial(run_cell, args=args, runs=runs), grid, "recipe-stability", args.jobs,
                         lambda c: f"{c[0]} depth {c[1]} lr {c[2]:g} seed {c[3]}", on_result=write)
    print_table(summarise(rows))
    path = write(rows)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
