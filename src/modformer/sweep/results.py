"""Sweep results: per-trial records, the table (CSV + JSONL), the best config, plots.

A record is a trial's summary.json (final/best figures, ``params``, ``wall_s``, ``first_target_step``...)
plus derived costs: ``tokens`` (trained), ``flops_per_token`` (6N + attention, ``GPT.flops_per_token``),
``flops`` (total training FLOPs), ``flops_to_target`` and ``tokens_to_target`` (to the run's early-stop
target, when reached) and ``status`` (ok | failed, with ``error``).
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modformer.utils import atomic_write, atomic_write_text

if TYPE_CHECKING:
    from modformer.sweep.scheduler import Sweep
    from modformer.sweep.spec import SweepSpec

DERIVED = ("tokens", "flops_per_token", "flops", "flops_to_target", "tokens_to_target", "trial_seconds")
PARETO_X = ("params", "flops", "wall_s")


def metric_value(record: dict[str, Any] | None, metric: str) -> float | None:
    """A finite number for ``metric`` in a record, else None (missing, failed, not reached, NaN)."""
    if not record or record.get("status") == "failed":
        return None
    v = record.get(metric)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def leaderboard(rows: list[dict[str, Any]], metric: str, mode: str, top: int = 10) -> list[dict[str, Any]]:
    """The closing table of a sweep: the ``top`` trials by ``metric`` (best first; failed / unmeasured last),
    each with its parameters, status, steps, metric and seconds."""
    sign = 1 if mode == "min" else -1
    ranked = sorted(rows, key=lambda r: (metric_value(r, metric) is None, sign * (metric_value(r, metric) or 0.0)))
    params = [k for k in (ranked[0] if ranked else {}) if "." in k]          # the swept keys (train.lr, ...)
    return [{"rank": i + 1, "trial": r.get("trial"), **{k: r.get(k) for k in params}, "status": r.get("status"),
             "steps": r.get("steps"), metric: metric_value(r, metric), "seconds": r.get("trial_seconds")}
            for i, r in enumerate(ranked[:top])]


def run_costs(run_dir: Path, steps: int) -> dict[str, float]:
    """Tokens per step and FLOPs per token of a run, from its saved config (model built on 'meta')."""
    import torch

    from modformer import registry
    from modformer.config import RunConfig, from_dict
    from modformer.saving import build_model

    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    import yaml

    cfg = from_dict(RunConfig, yaml.safe_load(path.read_text()))
    if "task" in registry.available() and cfg.data.name in registry.available("task"):
        from modformer.data import build_dataset

        data = build_dataset(cfg.data)
        seq_len = data.seq_len
        batch = cfg.train.batch_size if cfg.train.batch_size > 0 else data.split_size("train")
    else:
        seq_len, batch = cfg.data.seq_len, cfg.train.batch_size
    with torch.device("meta"):
        model = build_model(cfg.model)
    fpt = float(model.flops_per_token(seq_len))
    return {"tokens_per_step": float(batch * seq_len), "flops_per_token": fpt,
            "tokens": float(batch * seq_len * steps), "flops": fpt * batch * seq_len * steps,
            "non_embedding_params": float(model.num_params(non_embedding=True))}


def trial_record(run_dir: Path, spec: SweepSpec, steps: int, returncode: int = 0, error: str = "") -> dict[str, Any]:
    """One finished (or failed) trial at a rung of ``steps``."""
    rec: dict[str, Any] = {"rung_steps": steps, "status": "ok" if returncode == 0 else "failed"}
    path = run_dir / "summary.json"
    if returncode == 0 and path.is_file():
        rec.update({k: v for k, v in json.loads(path.read_text()).items() if not isinstance(v, (dict, list))})
    elif returncode == 0:
        rec["status"] = "failed"
        error = error or "no summary.json written"
    if rec["status"] == "failed":
        rec["error"] = error
        rec["returncode"] = returncode
    try:
        costs = run_costs(run_dir, int(rec.get("steps", steps)))
    except Exception as e:   # noqa: BLE001 - costs are extras; never lose a result over them
        costs = {"costs_error": str(e)[:200]}
    rec.update(costs)
    if "flops_per_token" in costs and isinstance(rec.get("first_target_step"), (int, float)):
        rec["tokens_to_target"] = costs["tokens_per_step"] * rec["first_target_step"]
        rec["flops_to_target"] = costs["flops_per_token"] * rec["tokens_to_target"]
    return rec


def _scalar(v: Any) -> Any:
    return v if isinstance(v, (int, float, str, bool)) or v is None else json.dumps(v)


def result_rows(sweep: Sweep) -> list[dict[str, Any]]:
    """One row per trial that ran: id, parameters, then its last rung's record."""
    rows = []
    for t in sweep.trials:
        rec = sweep.last_record(t)
        if rec is None:
            continue
        rows.append({"trial": t.id, **{k: _scalar(v) for k, v in t.params.items()},
                     **{k: _scalar(v) for k, v in rec.items()}})
    return rows


def write_table(rows: list[dict[str, Any]], folder: Path) -> None:
    atomic_write_text(folder / "results.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(folder / "results.csv", buf.getvalue())


def read_table(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a results.jsonl or results.csv (CSV numbers parsed)."""
    path = Path(path)
    if not path.is_file():
        from modformer.config import ConfigError

        raise ConfigError(f"results file not found: {path}")
    if path.suffix == ".jsonl":
        return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    rows = []
    for r in csv.DictReader(path.open()):
        out = {}
        for k, v in r.items():
            try:
                out[k] = float(v) if v not in ("", None) else None
            except ValueError:
                out[k] = v
        rows.append(out)
    return rows


def write_best(sweep: Sweep) -> Path | None:
    """best.yaml: the base config with the best trial's overrides, ready for ``modformer train``."""
    from modformer.config import apply_overrides, save_yaml
    from modformer.sweep.space import format_value

    best = sweep.best()
    if best is None:
        return None
    trial, rec = best
    cfg = apply_overrides(sweep.spec.base_config(), [f"{k}={format_value(v)}" for k, v in trial.overrides.items()]
                          + [f"train.steps={rec.get('rung_steps', sweep.rungs[-1])}"])
    cfg.name, cfg.out_dir = f"{sweep.spec.name}_best", "runs"
    save_yaml(cfg, sweep.folder / "best.yaml")
    return sweep.folder / "best.yaml"


def pareto_front(points: list[tuple[float, float]], mode: str = "min") -> list[int]:
    """Indices of points not dominated in (x smaller, y better), sorted by x."""
    sign = 1.0 if mode == "min" else -1.0
    order = sorted(range(len(points)), key=lambda i: (points[i][0], sign * points[i][1]))
    front, best = [], math.inf
    for i in order:
        y = sign * points[i][1]
        if y < best:
            front.append(i)
            best = y
    return front


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def plot_results(rows: list[dict[str, Any]], keys: list[str], metric: str, mode: str, folder: Path) -> list[Path]:
    """plots/metric_vs_<key>.png for each key and plots/pareto.png (metric vs params / FLOPs / time)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if metric_value(r, metric) is not None]
    out: list[Path] = []
    if not ok:
        return out
    for key in keys:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        xs = [r.get(key) for r in ok]
        ys = [metric_value(r, metric) for r in ok]
        if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs):
            ax.scatter(xs, ys, s=18)
            if min(xs) > 0 and max(xs) / min(xs) > 20:
                ax.set_xscale("log")
        else:
            labels = sorted({str(x) for x in xs})
            ax.scatter([labels.index(str(x)) for x in xs], ys, s=18)
            ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = folder / "plots" / f"metric_vs_{key.replace('.', '_')}.png"
        _save(fig, path)
        out.append(path)
    axes_x = [x for x in PARETO_X if any(metric_value(r, x) is not None for r in ok)]
    if axes_x:
        fig, axes = plt.subplots(1, len(axes_x), figsize=(4.5 * len(axes_x), 3.5), squeeze=False)
        for ax, xk in zip(axes[0], axes_x):
            pts = [(metric_value(r, xk), metric_value(r, metric)) for r in ok if metric_value(r, xk) is not None]
            ax.scatter(*zip(*pts), s=16, alpha=0.6)
            front = [pts[i] for i in pareto_front(pts, mode)]
            ax.plot(*zip(*front), "r.-", label="Pareto front")
            ax.set_xscale("log")
            ax.set_xlabel(xk)
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = folder / "plots" / "pareto.png"
        _save(fig, path)
        out.append(path)
    return out


def write_results(sweep: Sweep) -> list[dict[str, Any]]:
    """Table, best config and plots of a sweep's current records; returns the rows."""
    rows = result_rows(sweep)
    if not rows:
        return rows
    write_table(rows, sweep.folder)
    write_best(sweep)
    try:
        plot_results(rows, [p for p in sweep.spec.space], sweep.spec.metric, sweep.spec.mode, sweep.folder)
    except Exception as e:   # noqa: BLE001 - a plotting failure must not lose the table
        sweep.log(f"[{sweep.spec.name}] plots failed: {e}")
    return rows
