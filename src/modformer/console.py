"""What long commands print besides their progress bar: one-line notes on stderr while they work, and a
closing summary table on stdout (``--json`` gives scripts one JSON line instead)."""

from __future__ import annotations

import sys
from typing import Any


def note(command: str, text: str) -> None:
    """``[prune] scoring heads on 8 batches`` on stderr: the user sees what a silent stretch is doing."""
    print(f"[{command}] {text}", file=sys.stderr, flush=True)


def fmt(value: Any) -> str:
    """A cell: floats with 4 significant digits, large integers with thousands separators, lists by length."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    if isinstance(value, (list, tuple)):
        return ", ".join(fmt(v) for v in value) if len(value) <= 6 else f"{len(value)} values"
    return str(value)


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys: ``{"before": {"loss": 1}}`` -> ``{"before.loss": 1}``."""
    out: dict[str, Any] = {}
    for k, v in values.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def print_summary(title: str, values: dict[str, Any] | None = None,
                  columns: dict[str, dict[str, Any]] | None = None) -> None:
    """A table on stdout: ``values`` as ``key | value`` rows, then ``columns`` (e.g. before / after) as one row
    per metric and one column per name; a metric missing from a column shows ``-``."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console(file=sys.stdout, width=max(Console(file=sys.stdout).width, 100))
    console.print(title, style="bold", highlight=False)
    if values:
        table = Table(box=box.SIMPLE, show_header=False, pad_edge=False)
        table.add_column(style="bold")
        table.add_column(overflow="fold")
        for k, v in flatten(values).items():
            table.add_row(k, fmt(v))
        console.print(table)
    if columns:
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
        table.add_column("metric", style="bold")
        for name in columns:
            table.add_column(name, justify="right")
        metrics = list(dict.fromkeys(k for col in columns.values() for k in col))
        for m in metrics:
            table.add_row(m, *(fmt(col[m]) if m in col else "-" for col in columns.values()))
        console.print(table)
