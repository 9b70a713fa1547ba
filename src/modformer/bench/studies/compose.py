"""Composition of experts benchmarks (issue 10): c-BTM, PHATGOOSE gates, CALM key-value arithmetic.

    modformer bench compose gates [--device cpu] [--preset cpu|h100] [--out benchmarks/results] [key=value ...]
    modformer bench compose calm  ...
    modformer bench compose cbtm  ...     # WikiText-2 and the algorithmic task mixture

Each runs ``modformer compose METHOD`` on ``configs/compose_*.yaml`` (``--preset h100``: larger models and
more steps, sized to finish in <= 8 minutes on one H100), prints a table and writes ``OUT/{cbtm,gates,calm}.json``
(headline keys as DESIGN.md); run folders go to ``--runs`` (default runs/compose_bench; partial JSON as it goes).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

from modformer.bench.common import CONFIGS, DEFAULT_OUT, cases, print_table, write_result
from modformer.cli import HelpFormatter
from modformer.compose import calm, cbtm, gates_run
from modformer.compose.spec import load_spec

H100 = {   # overrides of the CPU configs for one H100 (bigger models, more data and steps)
    "gates": ["base.model.d_model=256", "base.model.max_seq_len=32", "base.model.n_layer=4",
              "base.train.steps=3000", "base.train.batch_size=512", "data.length=10", "data.n_examples=20000",
              "experts.steps=2000", "experts.batch_size=512", "experts.rank=8", "gates.steps=300",
              "base.train.threads=null"],
    "calm": ["data.n_keys=1000", "data.n_letters=12", "data.aug_examples=100000", "data.n_examples=100000",
             "anchor.model.d_model=256", "augmenting.model.d_model=256", "augmenting.model.n_layer=4",
             "augmenting.train.steps=6000", "anchor.train.steps=3000", "calm.steps=3000", "calm.every=2",
             "anchor.train.threads=null", "augmenting.train.threads=null"],
    "cbtm": ["run.model.d_model=384", "run.model.n_layer=4", "run.model.n_head=6", "run.model.max_seq_len=256",
             "run.data.seq_len=256", "run.train.batch_size=64", "experts.steps=600", "experts.workers=2",
             "eval.max_tokens=0", "eval.context=512", "run.train.threads=null", "run.train.dtype=bfloat16"],
    "cbtm_taskmix": ["run.model.d_model=128", "experts.steps=600", "run.data.options.train_docs=2000",
                     "run.train.threads=null"],
}
CONFIG_FILES = {"gates": "compose_gates.yaml", "calm": "compose_calm.yaml", "cbtm": "compose_cbtm.yaml",
           "cbtm_taskmix": "compose_cbtm_taskmix.yaml"}


def spec_for(name: str, args: argparse.Namespace, module: Any) -> dict[str, Any]:
    over = [f"out_dir={args.runs}", f"device={args.device}"]
    over += H100[name] if args.preset == "h100" else []
    path = Path(args.config) if args.config and name == args.method else CONFIGS / CONFIG_FILES[name]
    return load_spec(path, module.DEFAULTS, over + args.overrides)


def bench_gates(args: argparse.Namespace) -> tuple[dict, list]:
    res = gates_run.run(spec_for("gates", args, gates_run))
    return res["headline"], res["rows"]


def bench_calm(args: argparse.Namespace) -> tuple[dict, list]:
    res = calm.run(spec_for("calm", args, calm))
    return res["headline"], res["rows"]


def bench_cbtm(args: argparse.Namespace) -> tuple[dict, list]:
    headline: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    for name, prefix in cases([("cbtm_taskmix", "taskmix_"), ("cbtm", "")], "compose cbtm",
                              lambda c: f"next: {c[0]}"):
        spec = spec_for(name, args, cbtm)
        t0 = time.perf_counter()
        res = cbtm.run(spec)
        corpus = spec["run"]["data"]["name"]
        for r in res["rows"]:
            rows.append({"corpus": corpus, **r})
        by = {r["method"]: r["ppl"] for r in res["rows"]}
        headline[f"{prefix}experts_ppl"] = cbtm.mixture_ppl(spec, res["rows"])
        headline[f"{prefix}dense_ppl"] = by.get("dense (same tokens)")
        headline[f"{prefix}best_single_expert_ppl"] = min(v for k, v in by.items() if k.endswith("alone"))
        headline[f"{prefix}cluster_purity"] = res.get("cluster", {}).get("purity")
        headline[f"{prefix}seconds"] = time.perf_counter() - t0
        write_result(args.result_name or "cbtm", headline, rows, torch.device(args.device), args.out)   # incremental
    return headline, rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="modformer bench compose", description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter,
                                epilog=("examples:\n"
                                        "  modformer bench compose cbtm\n"
                                        "  modformer bench compose calm --config configs/compose_calm_base.yaml"))
    p.add_argument("method", choices=["cbtm", "gates", "calm"], help="cbtm, gates (PHATGOOSE) or calm")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the config, e.g. experts.steps=100")
    p.add_argument("--config", default=None, help="YAML instead of configs/compose_METHOD.yaml, e.g. "
                   "configs/compose_calm_base.yaml")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="device: cpu, cuda, cuda:N")
    p.add_argument("--preset", default="cpu", choices=["cpu", "h100"],
                   help="cpu: toy scale; h100: the GPU-sized overrides")
    p.add_argument("--out", default=DEFAULT_OUT, help="result folder (benchmarks/results: the committed answer)")
    p.add_argument("--runs", default="runs/compose_bench", help="run folders (models, partial JSON)")
    p.add_argument("--result-name", default=None, help="result file name (default: METHOD)")
    p.add_argument("--threads", type=int, default=None, help="torch threads on CPU")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    headline, rows = {"cbtm": bench_cbtm, "gates": bench_gates, "calm": bench_calm}[args.method](args)
    headline["total_seconds"] = time.perf_counter() - t0
    print_table([{k: v for k, v in r.items() if not isinstance(v, (list, dict))} for r in rows])
    print(headline)
    write_result(args.result_name or args.method, headline, rows, torch.device(args.device), args.out,
                 extra={"preset": args.preset, "overrides": args.overrides})
    return 0


if __name__ == "__main__":
    sys.exit(main())
