"""Run logging: metrics.jsonl (one JSON object per line), TensorBoard events, and live progress."""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class MetricsLogger:
    """Appends ``{"step", "split", "loss", ..., "wall_s"}`` rows to metrics.jsonl (+ TensorBoard)."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, enabled: bool = True) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.writer = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tb"))
            except ImportError:   # tensorboard not installed: JSONL only
                self.writer = None

    def truncate_after(self, step: int) -> None:
        """On resume: drop rows logged after the checkpoint so the file matches an unbroken run."""
        if not (self.enabled and self.path.is_file()):
            return
        rows = [r for r in read_metrics(self.path) if r["step"] <= step]
        from modformer.utils import atomic_write_text

        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in rows))

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for k, v in row.items():
                if k not in ("step", "split") and isinstance(v, (int, float)):
                    self.writer.add_scalar(f"{row['split']}/{k}", v, row["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def steady_tokens_per_s(train_rows: list[dict[str, Any]]) -> float | None:
    """Median training tokens/s of the log windows after the first (which holds compilation and warm-up);
    of all windows when there is only one. ``train_rows``: the train rows of ``metrics.jsonl``."""
    tps = [r["tokens_per_s"] for r in train_rows]
    return statistics.median(tps[1:] or tps) if tps else None


def warmup_seconds(rows: list[dict[str, Any]], tokens_per_step: int) -> float | None:
    """One-off start-up time (torch.compile, autotuning) inside a run's first log window: that window's
    duration minus the time the later windows' median rate would take for it. ``rows``: the train rows of
    ``metrics.jsonl`` (``step``, ``tokens_per_s``); None with fewer than two windows."""
    train = [r for r in rows if r.get("split", "train") == "train" and r.get("tokens_per_s")]
    if len(train) < 2:
        return None
    rate = statistics.median(r["tokens_per_s"] for r in train[1:])
    first = train[0]["step"] * tokens_per_step
    return max(first / train[0]["tokens_per_s"] - first / rate, 0.0)


class ProgressDisplay:
    """Rich progress bar (step, loss, metric, tokens/s, ETA) on a terminal; plain lines otherwise."""

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self.console = Console(stderr=True)
        self.enabled = enabled
        self.live = enabled and self.console.is_terminal
        self.total = total
        self.t0 = time.perf_counter()
        self.start = start
        if self.live:
            self.bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                TimeRemainingColumn(), console=self.console)
            self.task = self.bar.add_task("train", total=total, completed=start, info="")
            self.bar.start()

    def update(self, step: int, info: str) -> None:
        if self.live:
            self.bar.update(self.task, completed=step, info=info)

    def message(self, text: str) -> None:
        """A line that stays (evaluation results); with no terminal, this is the progress log."""
        if not self.enabled:
            return
        if self.live:
            self.bar.console.print(text, highlight=False)
        else:
            print(text, file=sys.stderr, flush=True)

    def eta(self, step: int) -> str:
        done = step - self.start
        if done <= 0:
            return "?"
        left = (time.perf_counter() - self.t0) / done * (self.total - step)
        return f"{left:.0f}s"

    def close(self) -> None:
        if self.live:
            self.bar.stop()
