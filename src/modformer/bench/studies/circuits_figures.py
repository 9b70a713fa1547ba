"""The circuits pages' figures, drawn from a ``modformer bench circuits`` result (no model needed).

Per-head scores only: the copying score of each 1-layer head (sum(lambda) / sum|lambda| of its OV eigenvalues), the
2-layer model's previous-token (layer 0) and prefix-matching (layer 1) scores, where the best induction head's
attention goes, and its score by probe length. Figures that need the weights (the OV eigenvalues themselves,
attention patterns) come from ``modformer circuits RUN_DIR`` on a trained run (``plots/``); ``--runs RUNS`` copies
them from the ``--runs-dir`` of the circuits run that wrote the result (``circuits_1l_ov_eigenvalues.png``,
``circuits_2l_ov_eigenvalues.png``, ``circuits_2l_patterns.png``).

    modformer bench circuits-figures benchmarks/results/circuits.json --out docs/studies/figures [--runs RUNS]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from modformer.cli import HelpFormatter


def _bars(ax: Any, values: list[float], label: str, threshold: float | None = None) -> None:
    ax.bar(range(len(values)), values, color=["tab:blue" if v > (threshold or 0.5) else "tab:gray" for v in values])
    ax.set_xticks(range(len(values)), [f"H{i}" for i in range(len(values))], fontsize=7)
    ax.set_ylabel(label)
    if threshold is not None:
        ax.axhline(threshold, color="k", lw=0.8, ls="--")


def copying_figure(row: dict[str, Any], path: Path, threshold: float) -> Path:
    """1 layer: each head's OV copying score, the heads above ``threshold`` (copying) in blue."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 2.6))
    _bars(ax, row["copying_scores"], "OV copying score", threshold)
    ax.set_ylim(-1, 1)
    ax.set_title(f"1 layer: {row['copying_heads']} of {row['n_heads']} heads copy (score > {threshold})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def induction_figure(row: dict[str, Any], path: Path) -> Path:
    """2 layers: previous-token scores of layer 0, prefix-matching scores of layer 1, the best induction head's
    attention split, and its prefix matching by probe length."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(8, 5))
    _bars(axes[0, 0], row["prev_token_scores_l0"], "previous-token score")
    axes[0, 0].set_title("layer 0: previous-token heads", fontsize=9)
    _bars(axes[0, 1], row["induction_scores_l1"], "prefix matching")
    axes[0, 1].set_title("layer 1: prefix matching (32 tokens, repeated)", fontsize=9)
    best = max(range(len(row["induction_scores_l1"])), key=lambda h: row["induction_scores_l1"][h])
    split = {k: v[best] for k, v in row["induction_breakdown_l1"].items()}
    axes[1, 0].barh(list(split), list(split.values()), color="tab:orange")
    axes[1, 0].invert_yaxis()
    axes[1, 0].set_xlabel("share of attention")
    axes[1, 0].set_title(f"where L1H{best} attends on the repeat", fontsize=9)
    lengths = row["best_induction_by_probe_length"]
    axes[1, 1].plot([int(k) for k in lengths], list(lengths.values()), marker="o")
    axes[1, 1].set_xscale("log", base=2)
    axes[1, 1].set_xlabel("probe length (random tokens)")
    axes[1, 1].set_ylabel("best prefix matching")
    axes[1, 1].set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="modformer bench circuits-figures", description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter,
                                epilog="examples:\n  modformer bench circuits-figures")
    p.add_argument("result", help="a circuits result JSON (benchmarks/results/circuits.json)")
    p.add_argument("--out", default="runs/bench/figures", help="folder for the PNGs")
    p.add_argument("--runs", default=None,
                   help="the --runs-dir of the `modformer bench circuits` call that wrote RESULT: also copy its "
                        "models' OV-eigenvalue and attention-pattern plots (drawn from the trained weights)")
    args = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    result = json.loads(Path(args.result).read_text())
    rows = {r["model"]: r for r in result["rows"]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    threshold = result.get("settings", {}).get("copy_threshold", 0.5)
    files = [copying_figure(rows["attn_only_1l"], out / "circuits_1l_copying.png", threshold),
             induction_figure(rows["attn_only_2l"], out / "circuits_2l_induction.png")]
    if args.runs:
        import shutil

        for model, plot in (("1l", "ov_eigenvalues"), ("2l", "ov_eigenvalues"), ("2l", "patterns")):
            src = Path(args.runs) / f"attn_only_{model}" / "circuits" / "plots" / f"{plot}.png"
            if not src.is_file():
                raise SystemExit(f"{src} is missing: --runs must be the --runs-dir of a finished circuits run")
            files.append(Path(shutil.copyfile(src, out / f"circuits_{model}_{plot}.png")))
    print("\n".join(map(str, files)))
    return 0
