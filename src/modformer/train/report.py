"""End-of-run artefacts: plots/loss.png, plots/metric.png, summary.json and report.md.

The report names every figure as final (the last evaluation) or best (with its step), records the
environment that produced the run (versions, git commit, command line, device) and lists only the settings
that describe this run: the architecture's core fields plus every setting changed from its default (the full
config is config.yaml beside it).
"""

from __future__ import annotations

import dataclasses
import json
import platform
from pathlib import Path
from typing import Any

import yaml

from modformer.train.logging import duration, read_metrics
from modformer.utils import atomic_write, atomic_write_text

# Shown even at their default values: what a reader needs to picture the run.
CORE_SETTINGS = {
    "model": ("model", "vocab_size", "n_layer", "d_model", "n_head", "d_ff", "max_seq_len", "attention", "position",
              "norm", "ffn"),
    "data": ("name",),
    "train": ("steps", "batch_size", "lr", "optimizer", "schedule", "weight_decay"),
}
LOWER_IS_BETTER = ("loss", "ppl", "word_ppl", "raw_loss", "bpc")


def curve_figure(rows: list[dict[str, Any]], key: str, title: str) -> Any:
    """A matplotlib figure of ``key`` against step per split, titled, with whole-number step ticks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 4))
    for split in ("train", "val", "test"):
        pts = [(r["step"], r[key]) for r in rows if r.get("split") == split and key in r]
        if pts:
            ax.plot(*zip(*pts), label=split, marker="." if len(pts) < 50 else None)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(key)
    if key == "loss" and all(r[key] > 0 for r in rows if key in r):
        ax.set_yscale("log")
    if ax.lines:
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_metrics(run_dir: Path, metric: str = "acc", name: str | None = None) -> list[Path]:
    """Train/val curves of loss and ``metric`` against step, titled with the run's name."""
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
    out = []
    for key, file in (("loss", "loss.png"), (metric, "metric.png")):
        fig = curve_figure(rows, key, f"{name or run_dir.name}: {key}")
        path = run_dir / "plots" / file
        atomic_write(path, lambda tmp, fig=fig: fig.savefig(tmp, format="png", dpi=110))
        plt.close(fig)
        out.append(path)
    return out


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))


def environment(device: str) -> dict[str, str]:
    """What produced a run: package versions, the git commit of this checkout, the command line, the device."""
    import torch

    from modformer import __version__
    from modformer.bench.common import command_line, device_name, git_commit

    return {"modformer": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "git commit": git_commit() or "unknown (not a git checkout)", "command": command_line(),
            "device": device_name("cpu") if device == "cpu" else device}


def applied_settings(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` reduced to ``CORE_SETTINGS`` plus every setting that differs from its default."""
    from modformer.config import RunConfig

    defaults = dataclasses.asdict(RunConfig())
    out: dict[str, Any] = {k: v for k, v in config.items() if not isinstance(v, dict) and k != "name"
                           and v != defaults.get(k)}
    for section, values in config.items():
        if not isinstance(values, dict):
            continue
        base = defaults.get(section, {})
        kept = {k: v for k, v in values.items() if k in CORE_SETTINGS.get(section, ()) or v != base.get(k)}
        if section == "train" and not values.get("early_stop_metric"):     # no metric: the target does not apply
            kept = {k: v for k, v in kept.items() if not k.startswith("early_stop")}
        if kept:
            out[section] = kept
    return out


def _cell(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def write_report(run_dir: Path, config: dict[str, Any], summary: dict[str, Any],
                 samples: list[str] | None = None) -> Path:
    """A short markdown report: final and best figures, environment, curves, settings, sample generations."""
    steps = summary.get("steps")
    lines = [f"# Run `{config.get('name', run_dir.name)}`", "",
             f"{steps} steps in {duration(summary.get('wall_s', 0.0))} (stopped by: {summary.get('stop_reason')}); "
             f"{summary.get('params', 0):,} parameters; world size {summary.get('world_size', 1)}.", ""]
    names = [k[len("final_val_"):] for k in summary if k.startswith("final_val_")]
    if names:
        lines += [f"| validation | final (step {steps}) | best | best at step |", "| --- | --- | --- | --- |"]
        for n in names:
            best, at = summary.get(f"val_{n}"), summary.get(f"val_{n}_step")
            lines.append(f"| {n} | {_cell(summary[f'final_val_{n}'])} | {'-' if best is None else _cell(best)} | "
                         f"{'-' if at is None else at} |")
        lines.append("")
        lines.append("final = the last evaluation (the saved model); best = the best evaluation during the run "
                     f"({', '.join(LOWER_IS_BETTER[:3])}: lowest; others: highest).")
        lines.append("")
    if "first_target_step" in summary:
        lines += [f"Target first reached at step {summary['first_target_step']} "
                  f"({summary.get('first_target_wall_s', 0.0):.1f} s).", ""]
    lines += ["![loss](plots/loss.png) ![metric](plots/metric.png)", ""]
    lines += ["## Environment", "", "| | |", "| --- | --- |"]
    lines += [f"| {k} | `{v}` |" for k, v in environment(str(summary.get("device", "cpu"))).items()]
    lines.append("")
    if samples:
        lines += ["## Samples", ""]
        for s in samples:
            lines += ["```", s, "```", ""]
    settings = applied_settings(json.loads(json.dumps(config)))
    lines += ["## Settings", "", "The core architecture plus every setting changed from its default "
              "(all settings: config.yaml).", "", "```yaml",
              yaml.safe_dump(settings, sort_keys=False).rstrip(), "```", ""]
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path
