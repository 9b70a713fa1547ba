"""Reliability study: ``modformer train`` killed with SIGKILL at random moments, then resumed.

Each trial starts a fresh ``modformer train`` process on a tiny deterministic config that checkpoints every
step or every few steps (so many kills land inside a save), kills it after a random delay, checks what the
run folder holds (``latest`` names a checkpoint that loads and has finite weights; no partial checkpoint is
pointed to), then ``--resume``s it (or starts over with ``--overwrite`` when the kill came before the first
checkpoint) and compares the finished run with an uninterrupted reference: final weights bit for bit and the
metrics rows (timings aside). Writes OUT/reliability.json.

    modformer bench reliability [--trials 30] [--out DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from modformer.bench.common import DEFAULT_OUT, cases, print_table, write_result
from modformer.bench.process import child_env
from modformer.cli import HelpFormatter

TIMING_KEYS = ("wall_s", "tokens_per_s")

TINY = {
    "model": {"n_layer": 1, "d_model": 32, "n_head": 2, "max_seq_len": 8},
    "data": {"name": "modular", "options": {"p": 13, "train_fraction": 0.5}},
    "train": {"steps": 40, "batch_size": 32, "lr": 3e-3, "eval_every": 10, "eval_batches": 0, "log_every": 1,
              "progress": False, "tensorboard": False, "device": "cpu", "deterministic": True, "seed": 1},
}


def write_config(folder: Path, checkpoint_every: int) -> Path:
    import yaml

    cfg = json.loads(json.dumps(TINY))
    cfg["train"]["checkpoint_every"] = checkpoint_every
    cfg["out_dir"] = str(folder)
    path = folder / f"tiny_ckpt{checkpoint_every}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def train(config: Path, name: str, *extra: str, kill_after: float | None = None) -> subprocess.CompletedProcess | None:
    """Run ``modformer train CONFIG name=NAME`` in a child; with ``kill_after`` SIGKILL it after that many seconds
    (returns None when it was killed, the finished process otherwise)."""
    cmd = [sys.executable, "-m", "modformer.cli", "train", str(config), f"name={name}", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=child_env(name, warm_cache=True))
    if kill_after is not None:
        try:
            proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return None
    out, err = proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def final_state(run_dir: Path) -> tuple[str, list[dict[str, Any]]]:
    """sha256 of the newest checkpoint's weights, and the metrics rows without timings."""
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    digest = hashlib.sha256((run_dir / "checkpoints" / latest / "model.safetensors").read_bytes()).hexdigest()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return digest, [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def check_after_kill(run_dir: Path) -> str | None:
    """None when the killed run's folder is sound: no checkpoint yet, or ``latest`` loads with finite weights."""
    import torch

    import modformer as mf

    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    try:
        model = mf.load(run_dir / "checkpoints" / pointer.read_text().strip())
    except Exception as e:  # noqa: BLE001 - any failure to load is the finding
        return f"latest does not load: {e}"
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        return "latest holds non-finite weights"
    return None


def kill_trial(config: Path, name: str, delay: float, reference: tuple[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """One kill at ``delay`` seconds, the folder check, the resume, and the comparison with ``reference``."""
    run_dir = config.parent / name
    killed = train(config, name, kill_after=delay) is None
    problem = check_after_kill(run_dir)
    has_ckpt = (run_dir / "checkpoints" / "latest").exists()
    finish = train(config, name, "--resume" if has_ckpt else "--overwrite")
    if finish.returncode != 0:
        problem = problem or f"resume failed: {finish.stderr.strip().splitlines()[-1:]}"
    same = finish.returncode == 0 and final_state(run_dir) == reference
    if finish.returncode == 0 and not same:
        problem = problem or "resumed run differs from the uninterrupted one"
    return {"trial": name, "delay_s": round(delay, 3), "killed": killed, "resumed_from_checkpoint": has_ckpt,
            "identical": same, "problem": problem}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="modformer bench reliability", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter,
                                epilog="examples:\n  modformer bench reliability --trials 15 --out benchmarks/results")
    p.add_argument("--trials", type=int, default=30, help="kill trials per checkpoint interval (default 30)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random kill delays")
    p.add_argument("--out", default=DEFAULT_OUT, help="result folder (benchmarks/results: the committed answer)")
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="reliability-") as tmp:
        for every in (1, 5):
            config = write_config(Path(tmp), every)
            t0 = time.perf_counter()
            ref = train(config, f"reference_{every}")
            wall = time.perf_counter() - t0
            if ref.returncode != 0:
                raise SystemExit(f"reference run failed: {ref.stderr[-500:]}")
            reference = final_state(Path(tmp) / f"reference_{every}")
            print(f"checkpoint_every={every}: reference run {wall:.1f}s; {args.trials} kill trials", flush=True)
            for i in cases(range(args.trials), f"reliability checkpoint_every={every}",
                           lambda i: f"next: kill trial {i + 1}"):
                row = kill_trial(config, f"kill{every}_{i}", rng.uniform(0.3 * wall, wall), reference)
                rows.append({"checkpoint_every": every, **row})
                print(f"  trial {i + 1}/{args.trials}: kill at {row['delay_s']}s -> "
                      f"{'ok' if row['problem'] is None else row['problem']}", flush=True)
    killed = [r for r in rows if r["killed"]]
    headline = {"trials": len(rows), "killed_mid_run": len(killed),
                "survived": sum(r["problem"] is None and r["identical"] for r in rows),
                "resumed_bit_exact": sum(r["identical"] for r in rows),
                "data_lost": sum(r["problem"] is not None for r in rows)}
    print_table(rows, ["checkpoint_every", "trial", "delay_s", "killed", "resumed_from_checkpoint", "identical",
                       "problem"])
    print(json.dumps(headline))
    write_result("reliability", headline, rows, torch.device("cpu"), args.out)
    return 0 if headline["data_lost"] == 0 else 1
