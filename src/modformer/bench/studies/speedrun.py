"""Training tokens to a target validation loss: the speedrun recipe vs the Muon baseline (issue 24's recipe part).

Tiny Shakespeare (char level) to val loss 1.47 by default. Every run is a fresh ``modformer train`` process
(``bench.process.TrainProcess``) that stops at its first evaluation with val loss <= the target; the figure is
``tokens_to_target = steps_to_target * batch_size * seq_len`` (resolution: ``train.eval_every``, set to 25 for
every run here, the baseline included). Parts (``--parts``):

- ``baseline``: ``configs/shakespeare_char_muon.yaml`` (the best shipped recipe), every seed of ``--seeds``;
- ``recipe``: ``configs/shakespeare_char_speedrun.yaml``, every seed;
- ``ablations``: the recipe without one component at a time (and with the windowed schedule added), seed
  ``--seeds[0]``: which components carry the gain;
- ``lrs``: the recipe at each Muon/AdamW learning rate of ``--lrs``, seed ``--seeds[0]``.

Ablations and learning rates are compared with the recipe's run of the same seed, which the call adds when
``recipe`` is not among the parts.

Headline: the median tokens (and min-max over seeds) of baseline and recipe, their ratio, the best learning rate
and each ablation's tokens relative to the recipe's same-seed run. Tokens, not seconds, are the question here
(``modformer bench time-to-loss`` times the same configs from process start), so runs share the torch.compile
cache unless ``--cold-cache``.

    modformer bench speedrun --out benchmarks/results                       # everything (~12 GPU min on one H200)
    modformer bench speedrun --parts baseline recipe --seeds 0              # a quick pair (~1.5 min)
    modformer bench speedrun --parts baseline recipe ablations --ablations no_unet --seeds 0 --target 3.3 \\
        --set train.device=cpu --set train.compile=false --set model.n_layer=4 --set model.d_model=64 \\
        --set model.n_head=4 --set data.seq_len=32 --set train.batch_size=16 --set train.steps=40 \\
        --set train.eval_batches=4 --set train.eval_batch_size=16 --set train.eval_every=10   # CPU toy, minutes
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from modformer.bench.common import DEFAULT_OUT, cases, print_table, write_result
from modformer.bench.process import TrainProcess, child_env
from modformer.cli import HelpFormatter

BASELINE = "configs/shakespeare_char_muon.yaml"
RECIPE = "configs/shakespeare_char_speedrun.yaml"
EVAL = ["train.eval_every=25", "train.log_every=25"]   # the same target resolution for every run
# the recipe minus one component (or plus the windowed schedule); names say what changed
ABLATIONS = {
    "no_relu2": ["model.ffn=swiglu"],                   # back to the baseline's SwiGLU (hidden 1024)
    "no_qk_norm": ["model.qk_norm=false"],
    "no_zero_init": ["model.zero_init_proj=false"],
    "no_softcap": ["model.logit_softcap=null"],
    "no_value_embeds": ["model.value_embeds=0"],
    "no_unet": ["model.unet_skips=false"],
    "tied_head": ["model.tie_embeddings=true"],
    "plus_windows": ["model.window_pattern=[0,128]"],   # long / short (half the context) alternating
}


def plan(parts: list[str], seeds: list[int], lrs: list[float], ablations: list[str],
         extra: list[list[str]] | None = None) -> list[dict]:
    """The runs of a call, in order: ``{"name", "group", "seed", "config", "overrides"}``; ``extra`` holds
    ``[NAME, CONFIG, key=value, ...]`` runs made for every seed after the parts."""
    runs = []
    first = seeds[0]
    if "baseline" in parts:
        runs += [{"name": f"baseline_s{s}", "group": "baseline", "seed": s, "config": BASELINE, "overrides": []}
                 for s in seeds]
    recipe_seeds = seeds if "recipe" in parts else [first] if {"ablations", "lrs"} & set(parts) else []
    runs += [{"name": f"recipe_s{s}", "group": "recipe", "seed": s, "config": RECIPE, "overrides": []}
             for s in recipe_seeds]              # ablations and learning rates compare with the recipe's same seed
    if "ablations" in parts:
        runs += [{"name": f"{a}_s{first}", "group": a, "seed": first, "config": RECIPE, "overrides": ABLATIONS[a]}
                 for a in ablations]
    if "lrs" in parts:
        runs += [{"name": f"recipe_lr{lr:g}_s{first}", "group": f"lr{lr:g}", "seed": first, "config": RECIPE,
                  "overrides": [f"train.lr={lr}", f"train.min_lr={min(lr, 1e-4)}"]} for lr in lrs]
    for name, config, *overrides in extra or []:
        runs += [{"name": f"{name}_s{s}", "group": name, "seed": s, "config": config, "overrides": overrides}
                 for s in seeds]
    return runs


def run_row(spec: dict, run: TrainProcess) -> dict:
    """What one finished run measured; ``tokens_to_target`` is None when the target was not reached."""
    s, settings = run.summary(), run.settings()
    batch, seq = settings.get("train", {}).get("batch_size"), settings.get("data", {}).get("seq_len")
    steps = s.get("first_target_step")
    return {**{k: spec[k] for k in ("name", "group", "seed", "config", "overrides")},
            "lr": settings.get("train", {}).get("lr"), "steps_to_target": steps,
            "tokens_to_target": steps * batch * seq if steps is not None and batch and seq else None,
            "best_val_loss": s.get("val_loss"), "best_val_loss_step": s.get("val_loss_step"),
            "seconds_to_target": run.t_target, "process_seconds": run.seconds, "params": s.get("params"),
            "returncode": run.returncode, "settings": settings}


def group_stats(rows: list[dict], group: str) -> dict | None:
    """Median and min-max of ``tokens_to_target`` over a group's seeds (None if none of them ran); a run that
    missed the target makes the median None when it is at least half of the group."""
    runs = [r for r in rows if r["group"] == group]
    if not runs:
        return None
    reached = sorted(r["tokens_to_target"] for r in runs if r["tokens_to_target"] is not None)
    missed = len(runs) - len(reached)
    # a missed run counts as +inf: the median exists while fewer than half the runs missed
    ordered = reached + [float("inf")] * missed
    med = statistics.median(ordered) if ordered else None
    return {"runs": len(runs), "reached": len(reached), "seeds": [r["seed"] for r in runs],
            "tokens_median": med if med is not None and med != float("inf") else None,
            "tokens_min": reached[0] if reached else None,
            "tokens_max": reached[-1] if not missed and reached else None,
            "steps": [r["steps_to_target"] for r in runs]}


def headline(rows: list[dict], target: float) -> dict:
    """Baseline vs recipe (medians over seeds), the best learning rate, each ablation against the recipe."""
    base, rec = group_stats(rows, "baseline"), group_stats(rows, "recipe")
    out: dict = {"target": target, "baseline": base, "recipe": rec}
    if base and rec and base["tokens_median"] and rec["tokens_median"]:
        out["token_ratio_baseline_over_recipe"] = base["tokens_median"] / rec["tokens_median"]
    lr_rows = [r for r in rows if r["group"].startswith("lr")]
    if lr_rows:                  # the recipe's own learning rate joins the grid through its same-seed run
        lr_rows += [r for r in rows if r["group"] == "recipe" and r["seed"] == lr_rows[0]["seed"]]
        lr_rows = [r for r in lr_rows if r["tokens_to_target"] is not None]
    if lr_rows:
        best = min(lr_rows, key=lambda r: r["tokens_to_target"])
        out["best_lr"], out["best_lr_tokens"] = best["lr"], best["tokens_to_target"]
    ref = {r["seed"]: r["tokens_to_target"] for r in rows if r["group"] == "recipe"}
    ablations = {}
    for r in rows:
        if r["group"] in ABLATIONS:
            same = ref.get(r["seed"])
            ablations[r["group"]] = {"tokens": r["tokens_to_target"], "recipe_tokens_same_seed": same,
                                     "ratio_to_recipe": r["tokens_to_target"] / same
                                     if r["tokens_to_target"] and same else None}
    if ablations:
        out["ablations"] = ablations
    extra = sorted({r["group"] for r in rows} - {"baseline", "recipe", *ABLATIONS} - {r["group"] for r in lr_rows})
    extra = [g for g in extra if not g.startswith("lr")]
    if extra:                                               # --run groups: median and spread over their seeds
        out["runs"] = {g: group_stats(rows, g) for g in extra}
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="modformer bench speedrun", description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter,
                                epilog="examples:\n  modformer bench speedrun --parts baseline recipe --seeds 0 1 2")
    p.add_argument("--parts", nargs="*", default=["baseline", "recipe", "ablations", "lrs"],
                   choices=["baseline", "recipe", "ablations", "lrs"],
                   help="groups of runs: baseline, recipe, ablations (one component off each), lrs")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="baseline and recipe seeds")
    p.add_argument("--lrs", nargs="+", type=float, default=[3e-3, 8e-3],
                   help="extra learning rates of the recipe (its own 5e-3 is the recipe run)")
    p.add_argument("--ablations", nargs="+", default=list(ABLATIONS), choices=list(ABLATIONS),
                   help="recipe components to switch off, one run each")
    p.add_argument("--run", nargs="+", action="append", default=[], metavar="NAME CONFIG [key=value]",
                   help="an extra run for every seed (repeatable), e.g. --run base_qk configs/... model.qk_norm=true")
    p.add_argument("--target", type=float, default=1.47, help="target val loss")
    p.add_argument("--set", action="append", default=[], metavar="key=value",
                   help="override for every run (e.g. a CPU toy: train.device=cpu train.compile=false ...)")
    p.add_argument("--cold-cache", action="store_true", help="an empty torch.compile cache per run")
    p.add_argument("--max-seconds", type=float, default=300.0, help="kill a run after this many seconds")
    p.add_argument("--runs-dir", default="runs/bench/speedrun", help="folder for the training runs")
    p.add_argument("--out", default=DEFAULT_OUT, help="result folder (benchmarks/results: the committed answer)")
    p.add_argument("--results-name", default="speedrun", help="result file name, without .json")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    for path in (BASELINE, RECIPE):
        if not Path(path).is_file():
            raise SystemExit(f"config file not found: {path} (run from the repository root)")
    stop = ["train.early_stop_metric=val/loss", "train.early_stop_mode=min", f"train.early_stop_target={args.target}"]
    device_arg = next((s.split("=", 1)[1] for s in args.set if s.startswith("train.device=")), "auto")
    measured = torch.device(device_arg if device_arg != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    for spec in args.run:
        if len(spec) < 2 or not Path(spec[1]).is_file() or spec[0] in ("baseline", "recipe", *ABLATIONS):
            raise SystemExit(f"--run needs a new NAME and an existing CONFIG [key=value ...], got {spec}")
    runs = plan(args.parts, args.seeds, args.lrs, args.ablations, args.run)
    rows: list[dict] = []
    path = None
    # one at a time: each run has the device to itself
    for i, spec in enumerate(cases(runs, "speedrun", lambda s: f"next: {s['name']}"), 1):
        print(f"[{i}/{len(runs)}] {spec['name']}: {spec['config']} {' '.join(spec['overrides'])}", flush=True)
        overrides = [*EVAL, *stop, f"train.seed={spec['seed']}", *args.set, *spec["overrides"]]
        run = TrainProcess(spec["name"], spec["config"], overrides, Path(args.runs_dir),
                           child_env(spec["name"], not args.cold_cache), args.max_seconds)
        run.start()
        run.wait()
        rows.append(run_row(spec, run))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "settings"}), flush=True)
        if run.returncode:
            print(run.tail(20))
        # after every run, so a cut-off study keeps what it measured
        path = write_result("speedrun", headline(rows, args.target), rows, measured, args.out,
                            filename=f"{args.results_name}.json")
    print_table(rows, ["name", "steps_to_target", "tokens_to_target", "best_val_loss", "best_val_loss_step",
                       "process_seconds"])
    print(json.dumps({k: v for k, v in headline(rows, args.target).items() if k != "ablations"}, default=str))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
