"""Position encodings trained at length T, evaluated at T, 2T and 4T (seed 003's comparison, issue 29).

Each encoding (learned, sinusoidal, RoPE, ALiBi, none) trains the same small GPT on Tiny Shakespeare at
character level with context T, for several seeds; the trained model then reads the validation split in
non-overlapping windows of T, 2T and 4T characters. Per window length two losses (nats/char): ``loss`` over
every position, and ``loss_beyond`` over the positions at or beyond T only (where extrapolation happens; at T
itself it is empty). A learned table holds T positions, so a learned-position model **cannot** read a longer
window (sliding it would re-read at most T characters, which is not extrapolation): those cells are recorded
as ``null`` with the reason. Per encoding: median and spread (min, max) over seeds, and a plot of loss vs
window length.

Examples:
    modformer bench positions --jobs 5                     # GPU: T=256, 4 x 256, 2000 steps, 3 seeds
    modformer bench positions --tiny --out runs/bench      # CPU: T=64, 2 x 64, 300 steps (a few minutes)
"""

from __future__ import annotations

import argparse
import functools
import itertools
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from modformer.bench.common import DEFAULT_OUT, map_cases, parse_with_preset, plot_ranges, print_table, write_result
from modformer.cli import HelpFormatter
from modformer.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from modformer.data import build_dataset
from modformer.train.trainer import Trainer

POSITIONS = ("learned", "sinusoidal", "rope", "alibi", "none")
# Unit-amplitude sinusoids drown token embeddings of std 0.02 (the model stalls at the unigram loss; stability.md):
# Vaswani et al.'s sqrt(d) embedding scale with embeddings initialised at std d^-1/2, as the 2017 recipe does.
def position_extras(position: str, width: int) -> dict[str, object]:
    """Model fields an encoding needs beside its name (only sinusoidal: the 2017 embedding scale and init)."""
    return {"scale_embeddings": True, "embed_init_std": width ** -0.5} if position == "sinusoidal" else {}


def train_one(position: str, seed: int, args: argparse.Namespace, runs: Path) -> Trainer:
    """Train one model at context ``args.seq_len``; returns the finished Trainer (its model stays loaded)."""
    t = args.seq_len
    cfg = RunConfig(
        name=f"{position}_s{seed}", out_dir=str(runs),
        model=ModelConfig(n_layer=args.layers, d_model=args.width, n_head=args.heads, position=position,
                          max_seq_len=t if position == "learned" else max(args.factors) * t, dropout=args.dropout,
                          norm="rmsnorm", ffn="swiglu", bias=False, **position_extras(position, args.width)),
        data=DataConfig(name="shakespeare_char", seq_len=t),
        train=TrainConfig(steps=args.steps, batch_size=args.batch, lr=args.lr, min_lr=args.lr / 10,
                          warmup_steps=args.steps // 10, eval_every=args.steps, eval_batches=args.eval_batches,
                          seed=seed, device=args.device, progress=False, tensorboard=False, sample_tokens=0,
                          log_every=max(args.steps // 10, 1)))
    trainer = Trainer(cfg, overwrite=True)
    trainer.fit()
    return trainer


@torch.no_grad()
def eval_length(model: torch.nn.Module, length: int, trained_len: int, args: argparse.Namespace,
                device: torch.device) -> dict[str, float]:
    """Mean NLL over every target and over the targets at positions >= trained_len, windows of ``length``."""
    data = build_dataset(DataConfig(name="shakespeare_char", seq_len=length))
    rows = max(1, args.eval_tokens // length)
    total = beyond = 0.0
    n_total = n_beyond = 0
    model.eval()
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    for x, y in data.iter_eval("val", rows, 1):
        x, y = x.to(device), y.to(device)
        with amp:
            logits = model(x)
        nll = F.cross_entropy(logits.float().transpose(1, 2), y, ignore_index=-100, reduction="none")   # (B, T)
        valid = y != -100
        far = valid & (torch.arange(length, device=device) >= trained_len)
        total += float(nll[valid].sum())
        n_total += int(valid.sum())
        beyond += float(nll[far].sum())
        n_beyond += int(far.sum())
    return {"loss": total / max(n_total, 1), "loss_beyond": beyond / n_beyond if n_beyond else None,
            "tokens": n_total}


def measure(cell: tuple[str, int], args: argparse.Namespace, runs: Path) -> list[dict[str, Any]]:
    """Train one (encoding, seed) cell, then its loss at every evaluation window: one row per window."""
    pos, seed = cell
    device = torch.device(args.device)
    model = train_one(pos, seed, args, runs).raw_model
    rows = []
    for f in args.factors:
        length = f * args.seq_len
        row: dict[str, Any] = {"position": pos, "seed": seed, "factor": f, "window": length}
        if pos == "learned" and length > args.seq_len:
            row.update(loss=None, loss_beyond=None, tokens=0,
                       note=f"cannot: the learned table holds {args.seq_len} positions")
        else:
            row.update(eval_length(model, length, args.seq_len, args, device))
        rows.append(row)
    print_table(rows)
    return rows


def summarise(rows: list[dict[str, Any]], factors: list[int]) -> list[dict[str, Any]]:
    """Median and (min, max) over seeds per (position, window factor)."""
    out = []
    for pos in dict.fromkeys(r["position"] for r in rows):
        for f in factors:
            cell = [r for r in rows if r["position"] == pos and r["factor"] == f]
            row: dict[str, Any] = {"position": pos, "factor": f, "seeds": len(cell)}
            for key in ("loss", "loss_beyond"):
                vals = [r[key] for r in cell if r[key] is not None]
                row[f"{key}_median"] = statistics.median(vals) if vals else None
                row[f"{key}_min"], row[f"{key}_max"] = (min(vals), max(vals)) if vals else (None, None)
            if any(r.get("note") for r in cell):
                row["note"] = cell[0]["note"]
            out.append(row)
    return out


def plot(summary: list[dict[str, Any]], path: Path, t: int) -> None:
    """Median loss (error bars: min..max over seeds) vs window length, one line per encoding."""
    lines = {pos: [(r["factor"] * t, r["loss_median"], r["loss_min"], r["loss_max"]) for r in summary
                   if r["position"] == pos and r["loss_median"] is not None]
             for pos in dict.fromkeys(r["position"] for r in summary)}
    plot_ranges(lines, path, f"evaluation window (trained at T={t})", "val loss, all positions (nats/char)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="modformer bench positions", description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter, epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--positions", nargs="+", default=list(POSITIONS), choices=POSITIONS,
                   help="position encodings compared")
    p.add_argument("--seeds", type=int, default=3, help="seeds per encoding")
    p.add_argument("--seq-len", type=int, default=256, help="training context T")
    p.add_argument("--factors", type=int, nargs="+", default=[1, 2, 4], help="evaluation windows, multiples of T")
    p.add_argument("--layers", type=int, default=4, help="layers")
    p.add_argument("--width", type=int, default=256, help="model width")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--steps", type=int, default=2000, help="training steps")
    p.add_argument("--batch", type=int, default=64, help="batch size")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--dropout", type=float, default=0.1, help="dropout")
    p.add_argument("--eval-batches", type=int, default=20, help="validation batches of the in-training eval")
    p.add_argument("--eval-tokens", type=int, default=65536, help="validation characters read per window length")
    p.add_argument("--tiny", action="store_true", help="CPU scale: T=64, 2 x 64, 300 steps, batch 32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="device: cpu, cuda, cuda:N")
    p.add_argument("--jobs", type=int, default=1, help="models trained at once, each in its own process")
    p.add_argument("--runs-dir", default=None, help="keep the run folders here (default: a temporary folder)")
    p.add_argument("--plot", default=None, help="PNG path (default: next to the result)")
    p.add_argument("--out", default=DEFAULT_OUT, help="result folder (benchmarks/results: the committed answer)")
    args = parse_with_preset(p, argv, "--tiny", seq_len=64, layers=2, width=64, heads=4, steps=300, batch=32,
                             eval_batches=5, eval_tokens=16384)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(args.runs_dir or tmp)
        cells = list(itertools.product(args.positions, range(args.seeds)))
        done = map_cases(functools.partial(measure, args=args, runs=runs), cells, "positions", args.jobs,
                         lambda c: f"{c[0]} seed {c[1]}")
    rows = [row for cell in done for row in cell]
    summary = summarise(rows, args.factors)
    print_table(summary, ["position", "factor", "seeds", "loss_median", "loss_min", "loss_max",
                          "loss_beyond_median"])
    at = {r["position"]: r for r in summary if r["factor"] == 1}
    far = {r["position"]: r for r in summary if r["factor"] == max(args.factors)}
    headline = {"trained_T": args.seq_len, "seeds": args.seeds,
                **{f"{p}_loss_at_T": at[p]["loss_median"] for p in at},
                **{f"{p}_loss_at_{max(args.factors)}T": far[p]["loss_median"] for p in far}}
    config = {k: getattr(args, k) for k in ("seq_len", "layers", "width", "heads", "steps", "batch", "lr",
                                            "dropout", "eval_tokens", "factors")}
    path = write_result("positions", headline, rows, device, args.out, extra={"summary": summary, "config": config})
    png = Path(args.plot) if args.plot else path.with_suffix(".png")
    plot(summary, png, args.seq_len)
    print(f"wrote {path} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
