"""Where a short compiled training run's start-up time goes (issue 4, time to loss).

Trains one config in this process and prints one JSON line: seconds to import, to build the Trainer (data,
model, optimizer, CUDA context), to the first early-stop target, and to the end; the first metric rows (their
``wall_s`` counts from the Trainer's construction); then torch._dynamo's aggregated compile-time table.
Run it twice on the same machine: the second run shows what a warm Inductor cache leaves (tracing, guards,
CUDA-graph recording).

    python benchmarks/compile_warmup_probe.py configs/shakespeare_char_muon.yaml train.compile=true \\
        train.compile_mode=reduce-overhead --name cold                      # GPU; logs in results/logs/
"""

from __future__ import annotations

import time

T0 = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402

import torch  # noqa: E402

from modformer.config import load_config  # noqa: E402
from modformer.train.logging import read_metrics  # noqa: E402
from modformer.train.trainer import Trainer  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    p.add_argument("--name", default="probe")
    p.add_argument("--rows", type=int, default=10, help="first metric rows to print")
    args = p.parse_args()
    over = [f"out_dir={tempfile.mkdtemp(prefix='warmup_probe_')}", f"name={args.name}", *args.overrides]
    cfg = load_config(args.config, over)
    t_import = time.perf_counter() - T0
    trainer = Trainer(cfg, overwrite=True)
    t_setup = time.perf_counter() - T0
    summary = trainer.fit()
    t_end = time.perf_counter() - T0
    target = summary.get("first_target_wall_s")
    print(json.dumps({"name": args.name, "import_s": t_import, "setup_s": t_setup, "end_s": t_end,
                      "target_s_from_process_start": t_import + target if target is not None else None,
                      "first_target_step": summary.get("first_target_step"),
                      "first_rows": read_metrics(cfg.run_dir / "metrics.jsonl")[:args.rows]}))
    if hasattr(torch, "_dynamo"):
        print(torch._dynamo.utils.compile_times(repr="str", aggregate=True))


if __name__ == "__main__":
    main()
