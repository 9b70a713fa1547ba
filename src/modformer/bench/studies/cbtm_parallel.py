"""c-BTM experts trained at the same time, one per GPU (issue 11): wall time vs one after another.

The same c-BTM plan (``configs/compose_cbtm.yaml`` with ``modformer bench compose``'s H100 preset, no dense
baseline) is trained twice from one command each: first with every expert on a GPU of its own, as many at
once as there are GPUs (``experts.workers = #GPUs``, ``experts.one_gpu_each``), then one expert after another
on GPU 0. Both are then evaluated, so the table shows the mixture perplexity next to the wall times (the
parallel run must not change what is learned). The parallel run goes first, so any warm-up it leaves on the
host (CUDA, page cache) favours the sequential run: the speed-up is, if anything, understated.

Examples:
    modformer bench cbtm-parallel                                   # every visible GPU
    modformer bench cbtm-parallel --tiny --out /tmp/cbtm_par.json   # CPU smoke test (2 processes)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from modformer.bench.common import CONFIGS, DEFAULT_OUT, cases, print_table, write_result
from modformer.bench.studies.compose import H100
from modformer.cli import HelpFormatter
from modformer.compose import cbtm
from modformer.compose.spec import load_spec

TINY = ["cluster.k=2", "experts.steps=4", "run.train.eval_batches=1", "eval.max_tokens=512", "eval.top_k=[1]",
        "device=cpu"]


def train_and_eval(name: str, overrides: list[str], workers: int, one_gpu_each: bool) -> dict:
    """One whole ``modformer compose cbtm`` run; returns its training wall time and mixture perplexity."""
    spec = load_spec(CONFIGS / "compose_cbtm.yaml", cbtm.DEFAULTS,
                     [f"name={name}", *overrides, f"experts.workers={workers}", f"experts.one_gpu_each={one_gpu_each}"])
    res = cbtm.run(spec)
    seconds = res["train_seconds"]
    return {"name": name, "experts": len(seconds), "workers": workers, "gpus": res["train_gpus"],
            "train_wall_s": res["train_wall_seconds"], "expert_s": seconds, "sum_expert_s": sum(seconds.values()),
            "mixture_ppl": cbtm.mixture_ppl(spec, res["rows"])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="modformer bench cbtm-parallel", description=__doc__,
                                formatter_class=HelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny experts, 2 processes")
    ap.add_argument("--runs-dir", default=None, help="folder for the training runs (default: a temporary folder)")
    ap.add_argument("--out", default=f"{DEFAULT_OUT}/cbtm_parallel.json", help="result JSON file")
    ap.add_argument("overrides", nargs="*", help="extra c-BTM spec overrides, e.g. experts.steps=300")
    args = ap.parse_args(argv)
    runs = args.runs_dir or tempfile.mkdtemp(prefix="cbtm_par_")
    n_gpu = 0 if args.tiny else torch.cuda.device_count()
    over = [f"out_dir={runs}", "dense.train=false"] + (TINY if args.tiny else H100["cbtm"]) + args.overrides
    arms = [("parallel", max(n_gpu, 2), True), ("sequential", 1, False)]
    parallel, sequential = [train_and_eval(name, over, workers, one_gpu_each=each)
                            for name, workers, each in cases(arms, "cbtm-parallel", lambda a: f"next: {a[0]}")]
    rows = [parallel, sequential]
    headline = {"experts": parallel["experts"], "gpus": n_gpu, "parallel_wall_s": parallel["train_wall_s"],
                "sequential_wall_s": sequential["train_wall_s"],
                "speedup": sequential["train_wall_s"] / parallel["train_wall_s"],
                "mixture_ppl_parallel": parallel["mixture_ppl"], "mixture_ppl_sequential": sequential["mixture_ppl"]}
    device = torch.device("cuda" if n_gpu else "cpu")
    extra = {"note": "CPU smoke test (tiny experts, 2 CPU processes): not a measurement"} if args.tiny else {}
    out = Path(args.out)
    write_result("cbtm_parallel", headline, rows, device, out_dir=out.parent, extra=extra, filename=out.name)
    print_table(rows, ["name", "experts", "workers", "gpus", "train_wall_s", "sum_expert_s", "mixture_ppl"])
    print(f"headline: {headline}\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
