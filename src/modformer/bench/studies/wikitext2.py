"""GPU language-model recipes through the real CLI: time to a target val loss, and WikiText-2 test ppl.

Every run is a fresh ``python -m modformer.cli train CONFIG ...`` process, so the times count everything
a user waits for: interpreter start, imports, data loading, model build, torch.compile, evaluations.

    # Tiny Shakespeare (char): wall time from process start to the first evaluation with val loss
    # <= target; forwarded to `modformer bench time-to-loss` (same options) -> results/time_to_loss.json
    python benchmarks/lm_recipes.py time_to_loss --target 1.47

    # WikiText-2 (word level): train the recipe, then `modformer eval RUN --split test`
    # -> results/wikitext2.json
    python benchmarks/lm_recipes.py wikitext2

``--run NAME CONFIG [key=value ...]`` (repeatable) replaces the default runs; ``--set key=value`` adds an
override to every run (e.g. ``data.root=...``). ``--parallel`` (wikitext2 only) trains the runs at the
same time on one GPU: a sweep; each run's time is then an upper bound of its time alone.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from modformer.bench.process import TrainProcess, child_env

ROOT = Path(__file__).resolve().parents[1]
T_SCRIPT = time.perf_counter()


def device_info() -> tuple[str, str]:
    import torch

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return name, torch.__version__


def write_result(args: argparse.Namespace, name: str, headline: dict, rows: list[dict]) -> Path:
    dev, ver = device_info()
    out = {"benchmark": name, "device": dev, "torch": ver, "date": datetime.date.today().isoformat(),
           "command": " ".join(shlex.quote(a) for a in ["python", *sys.argv]),
           "headline": headline, "rows": rows}
    path = Path(args.results) / f"{args.results_name or name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def build_runs(args: argparse.Namespace, defaults: list[list[str]], extra: list[str]) -> list[TrainProcess]:
    specs = args.run or defaults
    runs_dir = Path(args.runs_dir)
    out = []
    for spec in specs:
        name, config, *overrides = spec
        overrides = [f"train.device={args.device}", *extra, *args.set, *overrides]
        out.append(TrainProcess(name, config, overrides, runs_dir, child_env(name, args.warm_cache), args.max_seconds,
                                cwd=ROOT))
    return out


def over_deadline(args: argparse.Namespace) -> bool:
    return args.deadline is not None and time.perf_counter() - T_SCRIPT > args.deadline


# ---- Tiny Shakespeare: time to a target val loss (now ``modformer bench time-to-loss``) -----------------
def time_to_loss(args: argparse.Namespace) -> None:
    """Forwarded to ``modformer.bench.time_to_loss`` (same rows and headline; its default runs are the nanoGPT-like
    recipe and configs/shakespeare_char_muon.yaml)."""
    from modformer.bench import time_to_loss as ttl

    argv = ["--target", str(args.target), "--device", args.device, "--runs-dir", args.runs_dir, "--out", args.results,
            "--results-name", args.results_name or "time_to_loss", "--headline", args.headline or "muon"]
    argv += [x for kv in args.set for x in ("--set", kv)] + (["--warm-cache"] if args.warm_cache else [])
    argv += ["--max-seconds", str(args.max_seconds)] if args.max_seconds else []
    for spec in args.run or []:
        argv += ["--run", *spec]
    ttl.main(argv)


# ---- WikiText-2: test perplexity of a recipe ------------------------------------------------------
def evaluate(run: TrainProcess, split: str, env: dict[str, str], stride: int = 0) -> dict:
    argv = [sys.executable, "-m", "modformer.cli", "eval", str(run.run_dir), "--split", split]
    if stride:
        argv += ["--stride", str(stride)]
    p = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
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
                           r.run_dir.parent, r.env, args.max_seconds, cwd=ROOT) for r in runs]
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
        for run in runs:
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
    write_result(args, "wikitext2", headline, rows)
    print_table(rows, ["name", "test_ppl", "test_ppl_strided", "valid_ppl", "best_valid_ppl", "epochs", "train_minutes",
                       "tokens_per_s"])


def print_table(rows: list[dict], keys: list[str]) -> None:
    def fmt(v: object) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    print(" | ".join(keys))
    for r in rows:
        print(" | ".join(fmt(r.get(k)) for k in keys))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("benchmark", choices=["time_to_loss", "wikitext2"])
    p.add_argument("--run", nargs="+", action="append", metavar="NAME CONFIG [key=value]",
                   help="a run: name, config file and overrides (repeatable; replaces the defaults)")
    p.add_argument("--set", action="append", default=[], metavar="key=value", help="override for every run")
    p.add_argument("--target", type=float, default=1.47, help="time_to_loss: target val loss")
    p.add_argument("--headline", default=None, help="run whose figures make the headline "
                   "(default: 'fast' for time_to_loss, 'recipe' or the best valid ppl for wikitext2)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--parallel", action="store_true", help="wikitext2: train all runs at once (a sweep)")
    p.add_argument("--minutes", type=float, default=None,
                   help="wikitext2: size train.steps (after a probe) so the runs end this long after start")
    p.add_argument("--probe-steps", type=int, default=200)
    p.add_argument("--reserve-seconds", type=float, default=90,
                   help="with --minutes: time kept for compilation, evaluations and the test split")
    p.add_argument("--no-test", action="store_true", help="wikitext2: skip the test-split evaluation")
    p.add_argument("--eval-stride", type=int, default=0, help="wikitext2: also report the test ppl with "
                   "sliding-window evaluation (each token scored with >= seq_len - STRIDE tokens of context)")
    p.add_argument("--warm-cache", action="store_true", help="reuse torch.compile caches between runs")
    p.add_argument("--max-seconds", type=float, default=None, help="kill a run after this many seconds")
    p.add_argument("--deadline", type=float, default=None, help="start no run after this many seconds")
    p.add_argument("--runs-dir", default="runs/bench")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--results-name", default=None, help="file name (default: the benchmark's name)")
    args = p.parse_args()
    if args.headline is None:
        args.headline = "fast" if args.benchmark == "time_to_loss" else "recipe"
    (time_to_loss if args.benchmark == "time_to_loss" else wikitext2)(args)


if __name__ == "__main__":
    main()
