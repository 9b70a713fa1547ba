"""Summarise a finished architecture-search sweep into OUT/<name>.json.

    modformer bench archsearch archsearch runs/sweeps/archsearch_small [more sweep folders ...]

Headline: the trial that reached the early-stop target (val acc >= 0.99) with the fewest training
FLOPs, the smallest model (parameters) that reached it, and how many trials reached it at all.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from modformer.bench.common import DEFAULT_OUT, print_table, write_result
from modformer.cli import HelpFormatter
from modformer.sweep.results import read_table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="modformer bench archsearch", description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter,
                                epilog=("examples:\n"
                                        "  modformer bench archsearch my_search runs/sweeps/archsearch"))
    p.add_argument("name", help="result name (NAME.json)")
    p.add_argument("sweep_dirs", nargs="+", help="folders of the sweep's trials")
    p.add_argument("--out", default=DEFAULT_OUT, help="result folder (benchmarks/results: the committed answer)")
    p.add_argument("--note", default="one seed per configuration; CPU seconds measured on a shared 2-core machine",
                   help="note stored in the result")
    args = p.parse_args(argv)
    import yaml

    specs = [yaml.safe_load((Path(d) / "sweep.yaml").read_text()) for d in args.sweep_dirs]
    rows = []
    for d in args.sweep_dirs:
        rows += [{**r, "sweep_dir": Path(d).name} for r in read_table(Path(d) / "results.jsonl")]
    keys = list(dict.fromkeys(k for spec in specs for k in spec["space"]))
    cols = ["sweep_dir", "trial", *keys, "params", "final_val_acc", "first_target_step", "flops_to_target", "wall_s",
            "first_target_wall_s", "status"]
    slim = [{k: r.get(k) for k in cols} for r in rows]
    print_table(slim, cols)
    grokked = [r for r in slim if isinstance(r["flops_to_target"], (int, float))]

    def cfg(r: dict | None) -> dict | None:
        return None if r is None else {k: r.get(k) for k in keys + ["params", "first_target_step", "flops_to_target"]}

    fastest = min(grokked, key=lambda r: r["flops_to_target"]) if grokked else None
    smallest = min(grokked, key=lambda r: (r["params"], r["flops_to_target"])) if grokked else None
    headline = {"trials": len(slim), "reached_target": len(grokked),
                "fastest_per_flop": cfg(fastest), "smallest_that_groks": cfg(smallest),
                "metric": specs[0]["metric"], "sweep": specs[0]["name"], "overrides": specs[0].get("overrides"),
                "note": args.note}
    import torch

    print(f"headline: {headline}")
    print(f"wrote {write_result(args.name, headline, slim, torch.device('cpu'), args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
