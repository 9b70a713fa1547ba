"""Grokking benchmark (CPU): steps and wall seconds to 99% validation accuracy, recipe vs baseline.

Runs ``modformer train configs/grokking.yaml`` as a fresh process per seed and times it from
process start (import included). The baseline is the published recipe (AdamW lr 1e-3, wd 1,
betas (0.9, 0.98), full batch, GPT-2 init, no label smoothing) on the same model, for the same
step budget. Writes OUT/grokking.json and grokking.png (val accuracy vs step).

    modformer bench grokking [--seeds 0 1 2] [--baseline-steps 500]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from modformer.bench.common import CONFIGS, DEFAULT_OUT, cases, print_table, write_result
from modformer.bench.process import SRC
from modformer.cli import HelpFormatter

BASELINE = ["train.batch_size=0", "train.lr=1e-3", "train.betas=[0.9,0.98]", "train.weight_decay=1.0",
            "train.decay_embeddings=false", "train.label_smoothing=0", "model.init=gpt2",
            "model.embed_init_std=null", "train.eval_batches=0"]


def run(name: str, overrides: list[str], out_dir: str) -> dict:
    cmd = [sys.executable, "-m", "modformer.cli", "train", str(CONFIGS / "grokking.yaml"),
           f"name={name}", f"out_dir={out_dir}", "train.progress=false", "train.tensorboard=false", *overrides]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed: {proc.stderr[-500:]}")
    run_dir = Path(out_dir) / name
    summary = json.loads((run_dir / "summary.json").read_text())
    curve = [(r["step"], r["acc"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
             if r["split"] == "val"]
    steps = summary.get("first_target_step")
    # process wall time to the target = total minus what ran after it (report, plots, final checkpoint)
    after = summary["wall_s"] - summary.get("first_target_wall_s", summary["wall_s"])
    return {"name": name, "steps_to_99": steps, "process_seconds": wall,
            "seconds_to_99": wall - after if steps else None, "trainer_seconds_to_99": summary.get(
                "first_target_wall_s"), "final_val_acc": summary.get("final_val_acc"), "curve": curve}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="modformer bench grokking", description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter,
                                epilog=("examples:\n"
                                        "  modformer bench grokking\n"
                                        "  modformer bench grokking --out benchmarks/results"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of each recipe")
    p.add_argument("--baseline-steps", type=int, default=500, help="training steps of the baseline")
    p.add_argument("--out", default=DEFAULT_OUT, help="result folder (benchmarks/results: the committed answer)")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [(f"recipe_seed{seed}", [f"train.seed={seed}", f"data.options.seed={seed}"]) for seed in args.seeds]
        jobs.append(("baseline_seed0", BASELINE + [f"train.steps={args.baseline_steps}", "train.eval_every=50"]))
        for name, overrides in cases(jobs, "grokking", lambda j: f"next: {j[0]}"):
            rows.append(run(name, overrides, tmp))
            print_table([{k: v for k, v in rows[-1].items() if k != "curve"}])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.plot(*zip(*r["curve"]), label=r["name"])
    ax.axhline(0.99, color="gray", ls=":")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation accuracy")
    ax.set_title("modular addition p=113, 30% train")
    ax.legend()
    fig.tight_layout()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    fig.savefig(Path(args.out) / "grokking.png", dpi=110)
    recipe = [r for r in rows if r["name"].startswith("recipe")]
    ok = [r for r in recipe if r["steps_to_99"]]
    headline = {"steps_to_99": max(r["steps_to_99"] for r in ok) if len(ok) == len(recipe) else None,
                "seconds_to_99": max(r["seconds_to_99"] for r in ok) if len(ok) == len(recipe) else None,
                "steps_to_99_baseline": rows[-1]["steps_to_99"],
                "baseline_val_acc_at_budget": rows[-1]["final_val_acc"], "seeds": args.seeds,
                "note": "worst case over seeds; seconds from process start (import included) on this CPU"}
    print_table([{k: v for k, v in r.items() if k != "curve"} for r in rows])
    print(f"headline: {headline}")
    import torch

    print(f"wrote {write_result('grokking', headline, rows, torch.device('cpu'), args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
