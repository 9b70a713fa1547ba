"""FP8's loss curve beside bf16's: one recipe trained at ``train.precision=bf16`` and at each FP8 precision
(``fp8``: tensorwise scales, e5m2 gradients; ``fp8_rowwise``: row scales, e4m3 gradients), same seed.

Both runs draw the same batches (the data generator is seeded by ``train.seed``) from the same initial weights; the
only difference is the precision of the linear layers' matmuls. The gap is relative, of the mean training loss over
the last ``min(100, steps // 5)`` steps: ``(fp8 - bf16) / bf16`` (positive = FP8 worse). The issue's goal is
|gap| <= 1% over the first 500 steps of the GPT-2-124M WikiText-2 recipe.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from modformer.bench.common import cases
from modformer.config import load_config
from modformer.train.logging import read_metrics


def train_losses(config: str, steps: int, precision: str, sets: list[str], device: str, out_dir: Path,
                 log_every: int) -> list[tuple[int, float]]:
    """``(step, mean training loss of the window ending there)`` of one run of ``config`` at ``precision``."""
    from modformer.train.trainer import Trainer

    cfg = load_config(config, [f"train.steps={steps}", f"train.precision={precision}", f"train.eval_every={steps}",
                               "train.eval_batches=1", f"train.log_every={log_every}", "train.progress=false",
                               "train.tensorboard=false", "train.sample_tokens=0", "train.checkpoint_every=0",
                               "train.early_stop_metric=null", "train.early_stop_target=null",
                               f"train.device={device}", f"out_dir={out_dir}", f"name=fp8_gap_{precision}", *sets])
    Trainer(cfg, overwrite=True).fit()
    return [(r["step"], r["loss"]) for r in read_metrics(out_dir / cfg.name / "metrics.jsonl")
            if r["split"] == "train"]


def summarise(name: str, curve: list[tuple[int, float]], steps: int) -> dict[str, Any]:
    tail = min(100, max(steps // 5, 1))
    last = [loss for step, loss in curve if step > steps - tail]
    return {"variant": name, "steps": steps, "first_loss": curve[0][1] if curve else None,
            "loss_last_100": sum(last) / len(last) if last else None, "tail_steps": tail,
            "curve": [{"step": s, "loss": round(v, 5)} for s, v in curve]}


def fp8_loss_gap(config: str, steps: int, sets: list[str], device: str, log_every: int = 10,
                 precisions: tuple[str, ...] = ("fp8",)) -> tuple[float | None, list[dict[str, Any]]]:
    """``(relative gap of the first FP8 precision, rows)``: the bf16 run's and each FP8 run's summary (with its whole
    logged curve); each FP8 row carries its own ``relative_gap``."""
    with tempfile.TemporaryDirectory(prefix="fp8-gap-") as tmp:
        rows = [summarise(f"loss curve {p}", train_losses(config, steps, p, sets, device, Path(tmp), log_every), steps)
                for p in cases(["bf16", *precisions], "fp8-gap", lambda p: f"next: {p} run")]
    ref = rows[0]["loss_last_100"]
    rows[0]["relative_gap"] = 0.0
    for r in rows[1:]:
        r["relative_gap"] = (r["loss_last_100"] - ref) / ref if ref and r["loss_last_100"] is not None else None
    return rows[1]["relative_gap"], rows
