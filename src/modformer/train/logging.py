"""Run logging: metrics.jsonl (one JSON object per line), TensorBoard events, and live progress."""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import threading
import time
from collections.abc import Callable
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

_TB_NOTE_SHOWN = False


class MetricsLogger:
    """Appends ``{"step", "split", "loss", ..., "wall_s"}`` rows to metrics.jsonl (+ TensorBoard).

    Rows go through ``utils.append_text`` (all or nothing), so a failed write leaves no partial line and
    ends the run with one line (``no space left on device while writing RUN/metrics.jsonl``). TensorBoard
    is secondary: a full disk while writing its events also ends the run with that one line (the run could
    not checkpoint either), any other TensorBoard failure disables TensorBoard with one warning line and
    training continues on metrics.jsonl. TensorBoard's writer thread reports its errors to us on the next
    call, so its own traceback is silenced.
    """

    def __init__(self, run_dir: Path, tensorboard: bool = True, enabled: bool = True) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.tb_dir = run_dir / "tb"
        self.enabled = enabled
        self.writer = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:   # tensorboard not installed (an extra): JSONL only, said once per process
                global _TB_NOTE_SHOWN
                if not _TB_NOTE_SHOWN:
                    _TB_NOTE_SHOWN = True
                    print("note: tensorboard is not installed, so metrics go to metrics.jsonl only "
                          "(pip install 'modformer[tensorboard]', or train.tensorboard=false)", file=sys.stderr)
                return
            _quiet_tensorboard_thread()
            self._tb(lambda: setattr(self, "writer", SummaryWriter(str(self.tb_dir))))

    def _tb(self, call: Callable[[], Any]) -> None:
        """Run a TensorBoard call; disk full -> WriteError, other failures -> TensorBoard off + a warning."""
        try:
            call()
        except (OSError, RuntimeError) as e:
            from modformer.utils import write_failure

            err = write_failure(e, self.tb_dir)
            writer, self.writer = self.writer, None
            if writer is not None:
                with contextlib.suppress(Exception):
                    writer.close()
            if err.reason == "no space left on device":
                raise err from None
            print(f"warning: TensorBoard disabled ({err}); metrics.jsonl continues", file=sys.stderr, flush=True)

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
        from modformer.utils import append_text

        append_text(self.path, json.dumps(row) + "\n")
        if self.writer is not None:
            def add() -> None:
                for k, v in row.items():
                    if k not in ("step", "split") and isinstance(v, (int, float)):
                        self.writer.add_scalar(f"{row['split']}/{k}", v, row["step"])

            self._tb(add)

    def close(self) -> None:
        """Flush and close TensorBoard; never raises (it runs while another error may be propagating)."""
        writer, self.writer = self.writer, None
        if writer is not None:
            try:
                writer.close()
            except Exception as e:   # noqa: BLE001 - reported, not raised: see the docstring
                print(f"warning: TensorBoard events may be incomplete ({type(e).__name__}: {e})",
                      file=sys.stderr, flush=True)


def _quiet_tensorboard_thread() -> None:
    """TensorBoard writes from a daemon thread that prints a traceback when a write fails, then hands the
    same error to the next ``add_scalar``/``close`` call, where ``MetricsLogger`` reports it in one line.
    Silence only that thread's traceback (other threads keep the previous hook)."""
    if getattr(threading.excepthook, "_modformer", False):
        return
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if type(args.thread).__name__ == "_AsyncWriterThread":
            return
        previous(args)

    hook._modformer = True  # type: ignore[attr-defined]
    threading.excepthook = hook


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
    """Progress of a long loop, one look for every command (train, distill, ...).

    On a terminal: a rich bar (step, the latest info such as train loss, elapsed, ETA) that moves every step
    (``advance``). Elsewhere (logs, CI, nohup): plain ``train step 40/500  loss 1.23 ...  ETA 1m05s`` lines
    on stderr at each ``update``, at most one per ``plain_every_s`` seconds (the first and last always).
    ``banner`` prints the start-up facts, ``message`` a line that stays (evaluations).
    """

    def __init__(self, total: int, start: int, enabled: bool, label: str = "train",
                 plain_every_s: float = 10.0, unit: str = "step") -> None:
        self.console = Console(stderr=True)
        self.enabled = enabled
        self.live = enabled and self.console.is_terminal
        self.total, self.start, self.label, self.unit = total, start, label, unit
        self.t0 = time.perf_counter()
        self.plain_every_s = plain_every_s
        self._last_plain: float | None = None
        self._info = ""
        if self.live:
            self.bar = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                TimeRemainingColumn(), console=self.console)
            self.task = self.bar.add_task(label, total=total, completed=start, info="")
            self.bar.start()

    def banner(self, title: str, facts: dict[str, Any]) -> None:
        """``title`` and one indented ``key  value`` line per fact (parameters, device, run folder, data)."""
        if not self.enabled:
            return
        width = max((len(k) for k in facts), default=0)
        self.message("\n".join([title, *(f"  {k:<{width}}  {v}" for k, v in facts.items())]))

    def advance(self, step: int) -> None:
        """Called every step: moves the bar (terminal only; costs no device sync)."""
        if self.live:
            self.bar.update(self.task, completed=step)

    def update(self, step: int, info: str) -> None:
        """New figures (train loss, tokens/s) at ``step``: shown in the bar, or as a plain line."""
        self._info = info
        if self.live:
            self.bar.update(self.task, completed=step, info=info)
            return
        now = time.perf_counter()
        due = self._last_plain is None or now - self._last_plain >= self.plain_every_s or step >= self.total
        if self.enabled and due:
            self._last_plain = now
            parts = [f"{self.label} {self.unit} {step}/{self.total}", info, f"ETA {self.eta(step)}"]
            print("  ".join(p for p in parts if p), file=sys.stderr, flush=True)

    def message(self, text: str) -> None:
        """A line that stays (evaluation results); with no terminal, this is the progress log."""
        if not self.enabled:
            return
        if self.live:
            self.bar.console.print(text, highlight=False)
        else:
            print(text, file=sys.stderr, flush=True)

    def eta(self, step: int) -> str:
        """Time left at the mean rate since start, as ``42s``, ``3m05s`` or ``2h14m``; ``?`` before a step."""
        done = step - self.start
        if done <= 0:
            return "?"
        return duration((time.perf_counter() - self.t0) / done * max(self.total - step, 0))

    def close(self) -> None:
        if self.live:
            self.bar.stop()


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h14m``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def run_banner(trainer: Any) -> tuple[str, dict[str, Any]]:
    """The start-up facts of a training run: what is trained, where, on what data, for how long."""
    cfg, data, t = trainer.cfg, trainer.data, trainer.cfg.train
    device = str(trainer.device)
    if trainer.device.type == "cpu":
        import torch

        n = torch.get_num_threads()
        device += f" ({n} thread{'s' if n != 1 else ''}{', deterministic' if trainer.cfg.train.deterministic else ''})"
    unit = "examples" if data.kind == "task" else "tokens"
    sizes = ", ".join(f"{s} {data.split_size(s):,}" for s in data.splits)
    steps = f"{t.steps:,}" + (f" (resuming at {trainer.step:,})" if trainer.step else "")
    batch = "full batch" if t.batch_size <= 0 else f"batch {t.batch_size:,}"
    params = {id(p): p for p in trainer.raw_model.parameters()}.values()
    total, trainable = sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)
    facts = {"parameters": f"{total:,}" + (f" ({trainable:,} trainable)" if trainable != total else ""),
             "device": f"{device}, {str(trainer.dtype)[6:]}",
             "run folder": str(trainer.run_dir),
             "data": f"{cfg.data.name}: {sizes} {unit}; seq_len {data.seq_len}, vocab {data.vocab_size}",
             "steps": f"{steps}, {batch}, eval every {t.eval_every}"}
    if trainer.world.size > 1:
        facts["processes"] = str(trainer.world.size)
    return f"modformer train {cfg.name}", facts
