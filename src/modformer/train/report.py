"""End-of-run artefacts: plots/loss.png, plots/metric.png, summary.json and report.md."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from modformer.train.logging import read_metrics
from modformer.utils import atomic_write, atomic_write_text


def plot_metrics(run_dir: Path, metric: str = "acc") -> list[Path]:
    """Train/val curves of loss and ``metric`` against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
    out = []
    for key, name in (("loss", "loss.png"), (metric, "metric.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for split in ("train", "val", "test"):
            pts = [(r["step"], r[key]) for r in rows if r.get("split") == split and key in r]
            if pts:
                ax.plot(*zip(*pts), label=split, marker="." if len(pts) < 50 else None)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        if key == "loss":
            ax.set_yscale("log")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = run_dir / "plots" / name
        atomic_write(path, lambda tmp, fig=fig: fig.savefig(tmp, format="png", dpi=110))
        plt.close(fig)
        out.append(path)
    return out


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))


def write_report(run_dir: Path, config: dict[str, Any], summary: dict[str, Any],
                 samples: list[str] | None = None) -> Path:
    """A short markdown report: headline figures, curves, config and sample generations."""
    lines = [f"# Run `{config.get('name', run_dir.name)}`", ""]
    lines += ["| figure | value |", "| --- | --- |"]
    for k, v in summary.items():
        if isinstance(v, (int, float, str)) or v is None:
            lines.append(f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |")
    lines += ["", "![loss](plots/loss.png) ![metric](plots/metric.png)", ""]
    if samples:
        lines += ["## Samples", ""]
        for s in samples:
            lines += ["```", s, "```", ""]
    lines += ["## Config", "", "```yaml", yaml.safe_dump(json.loads(json.dumps(config)), sort_keys=False).rstrip(),
              "```", ""]
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path
