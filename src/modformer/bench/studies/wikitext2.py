"""WikiText-2 (word level) test perplexity of a recipe, trained and evaluated through the real CLI.

Every run is a fresh ``python -m modformer.cli train CONFIG ...`` process followed by ``modformer eval RUN --split
test``, so the times count everything a user waits for: interpreter start, imports, data loading, model build,
torch.compile, evaluations. (Time to a target loss on Tiny Shakespeare is ``modformer bench time-to-loss``.)

    modformer bench wikitext2                                  # configs/wikitext2.yaml -> OUT/wikitext2.json

``--run NAME CONFIG [key=value ...]`` (repeatable) replaces the default run; ``--set key=value`` adds an
override to every run (e.g. ``data.root=...``). ``--parallel`` trains the runs at the same time on one GPU: a
sweep; each run's time is then an upper bound of its time alone.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from modformer.bench.common import DEFAULT_OUT, cases, device_name, print_table, write_result
from modformer.bench.process import TrainProcess, child_env
from modformer.cli import HelpFormatter

T_SCRIPT = time.perf_counter()


def build_runs(args: argparse.Namespace, defaults: list[list[str]], extra: list[str]) -> list[TrainProcess]:
    specs = args.run or defaults
    runs_dir = Path(args.runs_dir)
    out = []
    for spec in specs:
        name, config, *overrides = spec
        overrides = [f"train.device={args.device}", *extra, *args.set, *overrides]
        out.append(TrainProcess(name, config, overrides, runs_dir, child_env(name, args.warm_cache), args.max_seconds))
    return out


def over_deadline(args: argparse.Namespace) -> bool:
    return args.deadline is not None and time.perf_counter() - T_SCRIPT > args.deadline


def evaluate(run: TrainProcess, split: str, env: dict[str, str], stride: int = 0) -> dict:
    argv = [sys.executable, "-m", "modformer.cli", "eval", str(run.run_dir), "--split", split]
    if stride:
        argv += ["--stride", str(stride)]
    p = subprocess.run(argv, env=env, capture_output=True, text=True)
    if p.returncode:
        return {"error": (p.stderr or p.stdout).strip().splitlines()[-1:]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def size_runs_to_budget(args: argparse.Namespace, runs: list[TrainProcess]) -> None:
    """Set each run's ``train.steps`` so that all of them end ``--minutes`` after the script started.

    A short probe of every run (at the same concurrency as the real runs, sharing its compile cache)
    measures tokens/s; the real run gets the steps that fit in the time left, less a reserve for
    compilation, evaluations and the test evaluation.
    """
    probes = [TrainProcess(r.name + "_probe", r.config, [*r.overrides, f"train.steps={args.probe_steps}",
                                                         "train.log_every=20", "train.eval_every=1000000"],
                           r.run_dir.parent, r.env, args.max_seconds) for r in runs]
    for p in probes:
        p.start()
        if not args.parallel:
            p.wait()
    for p in probes:
        if p.returncode is None:
            p.wait()
    import yaml

    left = args.minutes * 60 - (time.perf_counter() - T_SCRIPT) - args.reserve_seconds
    for run, probe in zip(runs, probes):
        tps = probe.tokens_per_s()
        if not tps or probe.returncode:
            print(f"probe of {run.name} failed:\n{probe.tail(20)}")
            continue
        c = yaml.safe_load((probe.run_dir / "config.yaml").read_text())
        share = left if args.parallel else left / len(runs)
        steps = int(tps * share / (c["train"]["batch_size"] * c["data"]["seq_len"]) / 100) * 100
        print(f"{run.name}: {tps:,.0f} tok/s in the probe -> train.steps={steps}", flush=True)
        run.overrides.append(f"train.steps={steps}")
        run.argv.insert(run.argv.index(f"name={run.name}"), f"train.steps={steps}")


def wikitext2(args: argparse.Namespace) -> None:
    runs = build_runs(args, [["recipe", "configs/wikitext2.yaml"]], [])
    if args.minutes:
        size_runs_to_budget(args, runs)
    if args.parallel:
        for run in runs:
            run.start()
        for run in runs:
            run.wait()
    else:
        for run in cases(runs, "wikitext2", lambda r: f"next: {r.name}"):
            if over_deadline(args):
                print(f"skipped {run.name}: past --deadline")
                continue
            run.start()
            run.wait()
    rows = []
    for run in runs:
        if run.returncode is None:
            continue
        s = run.summary()
        test = evaluate(run, "test", run.env) if not args.no_test and s else {}
        cfg = run.run_dir / "config.yaml"
        tokens = None
        if cfg.is_file():
            import yaml

            c = yaml.safe_load(cfg.read_text())
            tokens = s.get("steps", 0) * c["train"]["batch_size"] * c["data"]["seq_len"]
        row = {"name": run.name, "config": run.config, "overrides": run.overrides,
               "test_ppl": test.get("ppl"), "test_loss": test.get("loss"),
               "valid_ppl": s.get("final_val_ppl"), "best_valid_ppl": s.get("val_ppl"),
               "best_valid_ppl_step": s.get("val_ppl_step"), "steps": s.get("steps"),
               "epochs": tokens / 2_088_628 if tokens else None,
               "train_minutes": s["wall_s"] / 60 if "wall_s" in s else None,
               "process_minutes": run.seconds / 60, "params": s.get("params"),
               "tokens_per_s": run.tokens_per_s(), "concurrent_runs": len(runs) if args.parallel else 1,
               "returncode": run.returncode, "settings": run.settings()}
        if "error" in test:
            row["test_error"] = test["error"]
        if args.eval_stride and s and not args.no_test:
            slid = evaluate(run, "test", run.env, args.eval_stride)
            row["test_ppl_strided"], row["eval_stride"] = slid.get("ppl"), args.eval_stride
        rows.append(row)
        print(json.dumps(row), flush=True)
        if run.returncode:
            print(run.tail(20))
    by = {r["name"]: r for r in rows}
    scored = [r for r in rows if r["valid_ppl"] is not None]
    head = by.get(args.headline) or (min(scored, key=lambda r: r["valid_ppl"]) if scored else {})
    headline = {"test_ppl": head.get("test_ppl"), "test_ppl_strided": head.get("test_ppl_strided"),
                "valid_ppl": head.get("valid_ppl"),
                "train_minutes": head.get("train_minutes"), "run": head.get("name"),
                "concurrent_runs": head.get("concurrent_runs"), "goal_test_ppl": 85.0,
                "goal_train_minutes": 15.0}
    device = device_name(args.device if torch.cuda.is_available() else "cpu")
    print(f"wrote {write_result('wikitext2', headline, rows, device, args.out, filename=args.results_name)}")
    print_table(rows, ["name", "test_ppl", "test_ppl_strided", "valid_ppl", "best_valid_ppl", "epochs", "train_minutes",
                       "tokens_per_s"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="modformer bench wikitext2", description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter,
                                epilog="examples:\n  modformer bench wikitext2 --device cuda")
    p.add_argument("--run", nargs="+", action="append", metavar="NAME CONFIG [key=value]",
                   help="a run: name, config file and overrides (repeatable; replaces the defaults)")
    p.add_argument("--set", action="append", default=[], metavar="key=value", help="override for every run")
    p.add_argument("--headline", default="recipe", help="run whose figures make the headline "
                   "(default 'recipe', else the best valid ppl)")
    p.add_argument("--device", default="cuda", help="device: cpu, cuda, cuda:N")
    p.add_argument("--parallel", action="store_true", help="train all runs at once (a sweep)")
    p.add_argument("--minutes", type=float, default=None,
                   help="size train.steps (after a probe) so the runs end this long after start")
    p.add_argument("--probe-steps", type=int, default=200, help="training steps of the short probe runs")
    p.add_argument("--reserve-seconds", type=float, default=90,
                   help="with --minutes: time kept for compilation, evaluations and the test split")
    p.add_argument("--no-test", action="store_true", help="skip the test-split evaluation")
    p.add_argument("--eval-stride", type=int, default=0, help="also report the test ppl with "
                   "sliding-window evaluation (each token scored with >= seq_len - STRIDE tokens of context)")
    p.add_argument("--warm-cache", action="store_true", help="reuse torch.compile caches between runs")
    p.add_argument("--max-seconds", type=float, default=None, help="kill a run after this many seconds")
    p.add_argument("--deadline", type=float, default=None, help="start no run after this many seconds")
    p.add_argument("--runs-dir", default="runs/bench", help="folder for the training runs")
    p.add_argument("--out", default=DEFAULT_OUT, help="result folder (benchmarks/results: the committed answer)")
    p.add_argument("--results-name", default=None, help="file name (default wikitext2.json)")
    args = p.parse_args(argv)
    wikitext2(args)
    return 0
