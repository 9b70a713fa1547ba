"""Time to a target validation loss, from process start: Tiny Shakespeare (char) to 1.47 by default.

Every run is a fresh ``modformer train CONFIG ...`` process (``process.TrainProcess``), alone on the device, with
its own empty torch.compile cache unless ``--warm-cache``; the time runs from the launch to the trainer's
``early stop:`` line. The peer in the same call is the nanoGPT-like baby GPT (``configs/shakespeare_char.yaml``,
compiled); the headline run is our recipe (``configs/shakespeare_char_muon.yaml``).

``--peer-nanogpt PATH`` adds nanoGPT itself: its ``train.py config/train_shakespeare_char.py`` run from a temporary
copy of the user's checkout (``bench/nanogpt_peer.py``; its data files written from our local Tiny Shakespeare, the
same 90/10 split), as a fresh process with its own empty compile cache, timed from launch to its first
``step N: ... val loss Y`` line with Y <= target (then stopped). Headline: ``seconds_to_target_cold`` (ours, from
process start, cold caches), ``nanogpt_seconds_to_target`` and ``speedup_vs_nanogpt``.

    modformer bench time-to-loss                                  # both default runs -> results/time_to_loss.json
    modformer bench time-to-loss --run muon configs/shakespeare_char_muon.yaml train.batch_size=128
    modformer bench time-to-loss --peer-nanogpt ../nanoGPT --out benchmarks/results      # vs nanoGPT, same call
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from modformer.bench.common import DEFAULT_OUT, cases, print_table, write_result
from modformer.bench.nanogpt_peer import checkout, run_peer_time_to_loss
from modformer.bench.process import TrainProcess, child_env
from modformer.cli import HelpFormatter

DEFAULT_RUNS = [["nanogpt_like", "configs/shakespeare_char.yaml", "train.compile=true"],
                ["muon", "configs/shakespeare_char_muon.yaml"]]


def run_row(run: TrainProcess) -> dict:
    s = run.summary()
    return {"name": run.name, "config": run.config, "overrides": run.overrides,
            "seconds_to_target": run.t_target, "trainer_seconds_to_target": s.get("first_target_wall_s"),
            "steps_to_target": s.get("first_target_step"), "best_val_loss": s.get("val_loss"),
            "best_val_loss_step": s.get("val_loss_step"), "steps": s.get("steps"),
            "process_seconds": run.seconds, "params": s.get("params"), "tokens_per_s": run.tokens_per_s(),
            "warmup_s": run.warmup_s(), "returncode": run.returncode, "settings": run.settings()}


def headline(rows: list[dict], target: float, headline_run: str, cold: bool = True) -> dict:
    """The headline run's time and steps, the nanoGPT-like peer's, nanoGPT's own (``--peer-nanogpt``), the ratios
    and the fastest of our runs. ``cold``: every run had empty compile caches (not ``--warm-cache``)."""
    by = {r["name"]: r for r in rows}
    reached = [r for r in rows if r["seconds_to_target"] is not None and r["name"] != "nanogpt"]
    best = min(reached, key=lambda r: r["seconds_to_target"]) if reached else None
    out = {"target": target,
           "seconds_to_target": by.get(headline_run, {}).get("seconds_to_target"),
           "steps_to_target": by.get(headline_run, {}).get("steps_to_target"),
           "nanogpt_like_seconds_to_target": by.get("nanogpt_like", {}).get("seconds_to_target"),
           "nanogpt_like_steps_to_target": by.get("nanogpt_like", {}).get("steps_to_target"),
           "nanogpt_like_best_val_loss": by.get("nanogpt_like", {}).get("best_val_loss"),
           "best_run": best["name"] if best else None,
           "best_seconds_to_target": best["seconds_to_target"] if best else None}
    if out["seconds_to_target"] and out["nanogpt_like_seconds_to_target"]:
        out["speedup_vs_nanogpt_like"] = out["nanogpt_like_seconds_to_target"] / out["seconds_to_target"]
    out["seconds_to_target_cold"] = out["seconds_to_target"] if cold else None
    if "nanogpt" in by:
        peer = by["nanogpt"]
        out.update(nanogpt_seconds_to_target=peer["seconds_to_target"], nanogpt_steps_to_target=peer["steps_to_target"],
                   nanogpt_best_val_loss=peer["best_val_loss"],
                   speedup_vs_nanogpt=peer["seconds_to_target"] / out["seconds_to_target"]
                   if peer["seconds_to_target"] and out["seconds_to_target"] else None)
    out.update(seed_summary(by, headline_run, out.get("nanogpt_seconds_to_target")))
    return out


def seed_summary(by: dict[str, dict], headline_run: str, nanogpt_seconds: float | None) -> dict:
    """Median and spread over the headline run and its seed repeats (runs named ``<headline>_seed<N>``), with the
    median ratio to nanoGPT; empty without repeats. A run that missed the target makes the median None."""
    names = [headline_run] + sorted(n for n in by if n.startswith(f"{headline_run}_seed")
                                    and n[len(headline_run) + 5:].isdigit())
    if len(names) < 2 or headline_run not in by:
        return {}
    secs = [by[n]["seconds_to_target"] for n in names]
    med = statistics.median(secs) if all(s is not None for s in secs) else None
    return {"seed_runs": names, "seeds_seconds_to_target": secs, "median_seconds_to_target": med,
            "median_speedup_vs_nanogpt": nanogpt_seconds / med if med and nanogpt_seconds else None}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="modformer bench time-to-loss", description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter,
                                epilog=("examples:\n"
                                        "  modformer bench time-to-loss   # to Shakespeare-char val loss 1.47"))
    p.add_argument("--run", nargs="+", action="append", metavar="NAME CONFIG [key=value]",
                   help="a run (repeatable; default: nanogpt_like and muon)")
    p.add_argument("--set", action="append", default=[], metavar="key=value", help="override for every run")
    p.add_argument("--target", type=float, default=1.47, help="target val loss")
    p.add_argument("--headline", default="muon",
                   help="run whose figures make the headline; its repeats NAME_seed1, NAME_seed2, ... add the median")
    p.add_argument("--device", default=None, help="train.device of every run (default: the configs')")
    p.add_argument("--warm-cache", action="store_true", help="reuse torch.compile caches between runs")
    p.add_argument("--max-seconds", type=float, default=None, help="kill a run after this many seconds")
    p.add_argument("--peer-nanogpt", metavar="PATH",
                   help="a nanoGPT checkout: also time its train.py (PEER_CONFIG) to the target, from process start")
    p.add_argument("--peer-config", default="config/train_shakespeare_char.py",
                   help="nanoGPT config file, relative to its checkout")
    p.add_argument("--peer-arg", action="append", default=[], metavar="--key=value",
                   help="extra nanoGPT train.py argument (repeatable), e.g. --peer-arg=--device=cpu")
    p.add_argument("--runs-dir", default="runs/bench", help="folder for the training runs and their logs")
    p.add_argument("--out", default=DEFAULT_OUT, help="result folder (benchmarks/results: the committed answer)")
    p.add_argument("--results-name", default="time_to_loss", help="result file name, without .json")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    stop = ["train.early_stop_metric=val/loss", "train.early_stop_mode=min", f"train.early_stop_target={args.target}"]
    device = [f"train.device={args.device}"] if args.device else []
    measured = torch.device(args.device if args.device not in (None, "auto") else
                            "cuda" if torch.cuda.is_available() else "cpu")
    if args.peer_nanogpt:
        checkout(args.peer_nanogpt, "train.py")            # a wrong path fails before any run
    rows: list[dict] = []
    # one at a time: each run has the device to itself
    for spec in cases(args.run or DEFAULT_RUNS, "time-to-loss", lambda s: f"next: {s[0]}"):
        if len(spec) < 2:
            raise SystemExit(f"--run needs NAME CONFIG [key=value ...], got {spec}")
        name, config, *overrides = spec
        if not Path(config).is_file():
            raise SystemExit(f"config file not found: {config}")
        run = TrainProcess(name, config, [*device, *stop, *args.set, *overrides], Path(args.runs_dir),
                           child_env(name, args.warm_cache), args.max_seconds)
        run.start()
        run.wait()
        rows.append(run_row(run))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "settings"}), flush=True)
        if run.returncode:
            print(run.tail(20))
        # after every run, so a cut-off benchmark keeps what it measured
        path = write_result("time_to_loss", headline(rows, args.target, args.headline, not args.warm_cache), rows,
                            measured, args.out, filename=f"{args.results_name}.json")
    if args.peer_nanogpt:
        from modformer.data.files import corpus_files

        (text_file,) = corpus_files(None, "tinyshakespeare", ["input.txt"])
        print(f"nanoGPT: {args.peer_nanogpt}/train.py {args.peer_config} (temporary copy, cold cache)", flush=True)
        peer = run_peer_time_to_loss(args.peer_nanogpt, text_file.read_text(), args.target,
                                     [args.peer_config, *args.peer_arg], child_env("nanogpt", args.warm_cache),
                                     args.max_seconds, Path(args.runs_dir) / "nanogpt.log")
        rows.append(peer)
        print(json.dumps({k: v for k, v in peer.items() if k != "evals"}), flush=True)
        path = write_result("time_to_loss", headline(rows, args.target, args.headline, not args.warm_cache), rows,
                            measured, args.out, filename=f"{args.results_name}.json")
    print_table(rows, ["name", "seconds_to_target", "steps_to_target", "best_val_loss", "process_seconds",
                       "tokens_per_s"])
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
