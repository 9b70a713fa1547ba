"""Data-parallel scaling (issue 11): torchrun DDP / FSDP2 on 1..N GPUs, tokens/s and loss-curve identity.

For each strategy and process count N this launches ``torchrun --standalone --nproc_per_node N -m
modformer.cli train CONFIG`` with 12 sequences per process (global batch 12 N, weak scaling) and reads the
run's ``metrics.jsonl``: median training tokens/s (first log window, with compilation, excluded) and
scaling efficiency = tokens/s(N) / (N x tokens/s(1)). For N > 1 it also trains one process with
``grad_accum = N`` on the same global batch, whose loss curve the N-process run must reproduce (the trainer
splits ``train.batch_size`` over processes x micro-steps, so both see the same examples).

Every launched process gets NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and
NVSHMEM_DISABLE_NVLS=1 (NVLink multicast off, as the device README requires).

Examples:
    modformer bench ddp-scaling --nproc 1 2 4                  # GPUs; configs/ddp_gpt2_wikitext2.yaml
    modformer bench ddp-scaling --tiny --nproc 1 2 --out /tmp/ddp.json   # CPU smoke test (gloo)
    modformer bench ddp-scaling --nproc 2 --strategies fsdp --set train.profile_steps=[60,62] --runs-dir R
                                       # + a torch.profiler trace/table per rank in R/<run>/profile/
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from modformer.bench.common import CONFIGS, DEFAULT_OUT, cases, print_table, write_result
from modformer.bench.process import SRC
from modformer.cli import HelpFormatter
from modformer.train.logging import read_metrics, steady_tokens_per_s

STRATEGIES = {   # name -> trainer overrides
    "ddp": ["train.distributed=ddp"],
    "ddp_bf16": ["train.distributed=ddp", "train.grad_reduce_dtype=bfloat16"],
    "fsdp": ["train.distributed=fsdp"],
    "fsdp_bf16": ["train.distributed=fsdp", "train.grad_reduce_dtype=bfloat16"],
}
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
TINY = ["model.n_layer=2", "model.d_model=32", "model.n_head=2", "model.max_seq_len=32", "data.name=shakespeare_char",
        "data.seq_len=32", "train.steps=6", "train.log_every=2", "train.eval_every=6", "train.eval_batches=1",
        "train.compile=false", "train.device=cpu", "train.threads=1"]


def launch(name: str, nproc: int, overrides: list[str], args: argparse.Namespace) -> dict:
    """Train one run under torchrun; return its throughput and train-loss curve."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    cmd = [torchrun, "--standalone", f"--nproc_per_node={nproc}", "-m", "modformer.cli", "train", "--overwrite",
           args.config, f"name={name}", f"out_dir={args.runs_dir}", *overrides]
    env = {**os.environ, **NO_MULTICAST, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"{name} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    train = [r for r in read_metrics(Path(args.runs_dir) / name / "metrics.jsonl") if r["split"] == "train"]
    return {"name": name, "processes": nproc, "process_seconds": seconds,
            "tokens_per_s": steady_tokens_per_s(train), "curve": [(r["step"], r["loss"]) for r in train]}


def max_rel_diff(a: list, b: list) -> float:
    """Largest relative difference between two loss curves logged at the same steps."""
    if [s for s, _ in a] != [s for s, _ in b]:
        raise ValueError("loss curves were logged at different steps")
    return max(abs(x - y) / abs(y) for (_, x), (_, y) in zip(a, b))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="modformer bench ddp-scaling", description=__doc__,
                                formatter_class=HelpFormatter)
    ap.add_argument("--config", default=str(CONFIGS / "ddp_gpt2_wikitext2.yaml"), help="training config of every run")
    ap.add_argument("--nproc", type=int, nargs="+", default=[1, 2],
                    help="process counts to run (GPUs; CPU processes with --tiny)")
    ap.add_argument("--strategies", nargs="+", default=["ddp", "fsdp"], choices=list(STRATEGIES),
                    help="ddp / fsdp: fp32 gradient average; *_bf16: averaged in bf16 (half the traffic)")
    ap.add_argument("--per-process-batch", type=int, default=12,
                    help="batch size per process (the single-GPU reference accumulates N of them)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config overrides")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny model, gloo, a few steps")
    ap.add_argument("--runs-dir", default=None, help="folder for the training runs (default: a temporary folder)")
    ap.add_argument("--out", default=f"{DEFAULT_OUT}/ddp_scaling.json", help="result JSON file")
    args = ap.parse_args(argv)
    args.runs_dir = args.runs_dir or tempfile.mkdtemp(prefix="ddp_runs_")
    common = (TINY if args.tiny else []) + args.set
    rows, refs = [], {}
    for n in cases(args.nproc, "ddp-scaling", lambda n: f"next: {n} process{'es' if n > 1 else ''}"):
        if n > 1:   # one process, N micro-steps: the same global batch as N processes
            refs[n] = launch(f"single_accum{n}", 1, common + [f"train.batch_size={args.per_process_batch * n}",
                                                             f"train.grad_accum={n}"], args)
        for strategy in args.strategies:
            if n == 1 and strategy != args.strategies[0]:
                continue                      # one process is the same run under either strategy
            row = launch(f"{strategy}_n{n}", n, common + [f"train.batch_size={args.per_process_batch * n}",
                                                         *STRATEGIES[strategy]], args)
            row["strategy"] = strategy if n > 1 else "single"
            if n > 1:
                row["max_rel_loss_diff_vs_1proc_same_batch"] = max_rel_diff(row["curve"], refs[n]["curve"])
            rows.append(row)
            print_table([{k: v for k, v in row.items() if k != "curve"}])
    base = next((r["tokens_per_s"] for r in rows if r["processes"] == 1), None)
    for r in rows:
        r["scaling_efficiency"] = r["tokens_per_s"] / (r["processes"] * base) if base else None
    rows += [{**ref, "strategy": "single, grad_accum"} for ref in refs.values()]
    top = max(args.nproc)
    best = max((r for r in rows if r["processes"] == top and r.get("scaling_efficiency") is not None),
               key=lambda r: r["scaling_efficiency"], default=None)
    headline = {"processes": top, "scaling_efficiency": best["scaling_efficiency"] if best else None,
                "best_strategy": best["strategy"] if best else None,
                "tokens_per_s": best["tokens_per_s"] if best else None,
                "max_rel_loss_diff": max((r.get("max_rel_loss_diff_vs_1proc_same_batch", 0.0) for r in rows),
                                         default=None)}
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    extra = {"env": NO_MULTICAST, "gpus": torch.cuda.device_count() if device.type == "cuda" else 0}
    if args.tiny:
        extra["note"] = "CPU smoke test with a tiny model (gloo): not a measurement"
    out = Path(args.out)
    write_result("ddp_scaling", headline, rows, device, out_dir=out.parent, extra=extra, filename=out.name)
    print_table([{k: v for k, v in r.items() if k != "curve"} for r in rows],
                ["name", "strategy", "processes", "tokens_per_s", "scaling_efficiency",
                 "max_rel_loss_diff_vs_1proc_same_batch", "process_seconds"])
    print(f"headline: {headline}\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
