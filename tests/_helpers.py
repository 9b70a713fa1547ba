"""Helpers shared by the trainer tests (not fixtures, so a plain module)."""

from __future__ import annotations


def strip(rows: list[dict]) -> list[dict]:
    """Metric rows without the timing fields, which differ between otherwise identical runs."""
    return [{k: v for k, v in r.items() if k not in ("wall_s", "tokens_per_s")} for r in rows]


class Kill(Exception):
    """Raised by ``kill_at`` to simulate a run dying mid-training."""


def kill_at(step: int):
    """A trainer callback that raises ``Kill`` after optimizer step ``step``."""
    def cb(trainer, s):
        if s == step:
            raise Kill
    return cb
