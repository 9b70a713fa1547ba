"""Start-up cost: where the seconds before a run's first optimizer step go, in a fresh process.

A child process imports torch, then modformer's trainer, builds ``Trainer(CONFIG)`` and takes two training steps.
Rows: wall seconds of each phase (interpreter + ``import torch``, ``import modformer.train.trainer``, ``Trainer()``,
first step (torch.compile's work when compiled), second step) and, inside ``Trainer()``, the seconds of each of its
phases as the trainer times them itself (``Trainer.init_seconds``: set-up, dataset, model, wrapping and
torch.compile -- which imports Dynamo and Inductor --, optimizer, run folder and logger). An earlier version read
the parts from cProfile, whose rows for the compile parts came back empty on the GPU host.

    modformer bench startup                                            # configs/shakespeare_char_muon.yaml
    modformer bench startup --config configs/shakespeare_char.yaml --set train.compile=false
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

import torch

from modformer.bench.common import DEFAULT_OUT, print_table, write_result
from modformer.bench.process import child_env
from modformer.cli import HelpFormatter

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
t_torch = time.perf_counter()
from modformer.config import load_config
from modformer.train.trainer import Trainer
t_mf = time.perf_counter()
cfg = load_config(sys.argv[1], json.loads(sys.argv[2]))
t1 = time.perf_counter()
tr = Trainer(cfg, overwrite=True)
t2 = time.perf_counter()
def sync():
    if tr.device.type == "cuda":
        torch.cuda.synchronize(tr.device)
tr.train_step(); sync()
t3 = time.perf_counter()
tr.train_step(); sync()
t4 = time.perf_counter()
tr.lock.release()
print("STARTUP " + json.dumps({"torch_import": t_torch - t0, "modformer_import": t_mf - t_torch,
                               "trainer_init": t2 - t1, "first_step": t3 - t2, "second_step": t4 - t3,
                               "parts": tr.init_seconds, "device": str(tr.device)}))
"""

def run_child(config: str, overrides: list[str], env: dict[str, str]) -> tuple[dict, float]:
    """The child's timings and the wall seconds from its launch to its exit."""
    import time

    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, config, json.dumps(overrides)], env=env, capture_output=True,
                         text=True)
    wall = time.perf_counter() - t
    line = next((x for x in out.stdout.splitlines() if x.startswith("STARTUP ")), None)
    if out.returncode or line is None:
        tail = "\n".join((out.stdout + out.stderr).splitlines()[-15:])
        raise SystemExit(f"startup child failed (exit {out.returncode}):\n{tail}")
    return json.loads(line[len("STARTUP "):]), wall


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="modformer bench startup", description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter,
                                epilog=("examples:\n"
                                        "  modformer bench startup --config configs/shakespeare_char_muon.yaml"))
    p.add_argument("--config", default="configs/shakespeare_char_muon.yaml", help="run config to start")
    p.add_argument("--set", action="append", default=[], metavar="key=value", help="config override (repeatable)")
    p.add_argument("--warm-cache", action="store_true", help="reuse torch.compile caches (default: an empty one)")
    p.add_argument("--device", default=None, help="train.device (default: the config's)")
    p.add_argument("--out", default=DEFAULT_OUT, help="result folder (benchmarks/results: the committed answer)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="startup-") as tmp:
        overrides = [f"out_dir={tmp}", "name=startup", "train.progress=false",
                     *([f"train.device={args.device}"] if args.device else []), *args.set]
        t, wall = run_child(args.config, overrides, child_env("startup", args.warm_cache))
    rows = [{"phase": "process launch to exit (wall)", "seconds": wall},
            {"phase": "import torch", "seconds": t["torch_import"]},
            {"phase": "import modformer trainer", "seconds": t["modformer_import"]},
            {"phase": "Trainer()", "seconds": t["trainer_init"]}]
    rows += [{"phase": f"  Trainer(): {name}", "seconds": secs} for name, secs in t["parts"].items()]
    rows += [{"phase": "first train step (compile when compiled)", "seconds": t["first_step"]},
             {"phase": "second train step", "seconds": t["second_step"]}]
    print_table(rows)
    compile_wrap = next((v for k, v in t["parts"].items() if "torch.compile" in k), None)
    headline = {"config": args.config, "overrides": args.set, "device": t["device"],
                "trainer_init_s": t["trainer_init"], "compile_wrapper_s": compile_wrap,
                "imports_s": t["torch_import"] + t["modformer_import"], "first_step_s": t["first_step"],
                "process_wall_s": wall}
    print(f"headline: {headline}")
    device = torch.device(t["device"].split(":")[0])
    print(f"wrote {write_result('startup', headline, rows, device, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
