"""Multi-channel attention's gain vs sequence length and model size (seed 001, issue 29).

Seed 001: "the longer the sequence ... the larger the model ... the more we will potentially gain" from ``s``
attention channels. Measured on WikiText-2 word level with ``variants-lm``'s recipe and parameter matching
(each multichannel model's ``d_ff`` chosen so its non-embedding parameters match the MHA model's): for every
model size x context T x seed, MHA and multichannel s = 2, 4 (``model.attention: multichannel``,
``attn_only: true``) train for the same steps at the same tokens per step (the batch is tokens / T), then read
the whole validation split.

Per cell: ``gain`` = MHA's final val loss minus the variant's, same size, T and seed (positive: multichannel is
better), its training FLOPs per token and tokens/s relative to MHA (``--jobs`` > 1 shares the GPU, so tokens/s
is measured under sharing, the same way for every variant). Summary per size x T x variant: the median gain
over seeds and its range. Headline: the gain at each size x T x s, and whether it grows with T (at every size
and s) and with size (at every T and s) — the seed's two claims, each ``true`` only if every seed-median step
is an increase. A plot shows gain vs T, one line per size and s.

Examples:
    modformer bench multichannel --jobs 6 --out benchmarks/results      # GPU: 2 sizes x T 256, 1024, 4096
    modformer bench multichannel --tiny --out /tmp/mc                   # CPU smoke test, not a measurement
"""

from __future__ import annotations

import argparse
import copy
import functools
import itertools
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

from modformer.bench.common import DEFAULT_OUT, map_cases, parse_with_preset, plot_ranges, print_table, write_result
from modformer.bench.studies import variants_lm
from modformer.cli import HelpFormatter

VARIANTS = ("mha", "multichannel_s2", "multichannel_s4")     # names of ``variants.VARIANTS``
BASELINE = "mha"


def parse_size(text: str) -> dict[str, int]:
    """``LAYERSxWIDTHxHEADS`` (e.g. ``4x256x4``) -> model fields."""
    try:
        n_layer, d_model, n_head = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a size is LAYERSxWIDTHxHEADS (e.g. 4x256x4), got {text!r}") from None
    if min(n_layer, d_model, n_head) < 1 or d_model % n_head:
        raise argparse.ArgumentTypeError(f"size {text!r}: positive numbers, width divisible by heads")
    return {"n_layer": n_layer, "d_model": d_model, "n_head": n_head}


def train_cell(cell: tuple[str, int, str, int], args: argparse.Namespace, runs: Path) -> dict[str, Any]:
    """Train one (size, T, variant, seed) cell with variants-lm's recipe; its row."""
    size, t, variant, seed = cell
    run_args = copy.copy(args)
    for k, v in parse_size(size).items():
        setattr(run_args, k, v)
    run_args.seq_len, run_args.batch, run_args.seed = t, max(args.tokens_per_step // t, 1), seed
    run_args.runs_dir = str(runs / f"{size}_T{t}_s{seed}")
    row = variants_lm.train_one(variant, run_args)
    print(f"{size} T={t} {variant} seed {seed}: val loss {row['final_val_loss']:.4f}", flush=True)
    return {"size": size, "seq_len": t, "seed": seed, "batch": run_args.batch, **row}


def add_gains(rows: list[dict[str, Any]]) -> None:
    """Each row's gain, FLOPs and tokens/s relative to MHA of the same size, T and seed."""
    base = {(r["size"], r["seq_len"], r["seed"]): r for r in rows if r["variant"] == BASELINE}
    for r in rows:
        b = base.get((r["size"], r["seq_len"], r["seed"]))
        ok = b is not None and r.get("final_val_loss") is not None and b.get("final_val_loss") is not None
        r["gain"] = b["final_val_loss"] - r["final_val_loss"] if ok else None
        r["flops_ratio_vs_mha"] = r["flops_per_token"] / b["flops_per_token"] if b else None
        speed = b and b.get("train_tokens_per_s") and r.get("train_tokens_per_s")
        r["tokens_per_s_ratio_vs_mha"] = r["train_tokens_per_s"] / b["train_tokens_per_s"] if speed else None


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median and range over seeds of the gain, val loss and speed, per size x T x variant."""
    out = []
    for key in dict.fromkeys((r["size"], r["seq_len"], r["variant"]) for r in rows):
        cell = [r for r in rows if (r["size"], r["seq_len"], r["variant"]) == key]

        def med(field: str, cell: list[dict[str, Any]] = cell) -> float | None:
            vals = [r[field] for r in cell if r.get(field) is not None]
            return statistics.median(vals) if vals else None
        gains = [r["gain"] for r in cell if r.get("gain") is not None]
        out.append({"size": key[0], "seq_len": key[1], "variant": key[2], "seeds": len(cell),
                    "non_embedding_params": cell[0]["non_embedding_params"],
                    "final_val_loss": med("final_val_loss"), "gain": med("gain"),
                    "gain_min": min(gains) if gains else None, "gain_max": max(gains) if gains else None,
                    "flops_ratio_vs_mha": med("flops_ratio_vs_mha"),
                    "tokens_per_s_ratio_vs_mha": med("tokens_per_s_ratio_vs_mha")})
    return out


def increasing(values: list[float | None]) -> bool | None:
    """True if every step of ``values`` is an increase, False if one is not; None with a missing value."""
    if len(values) < 2 or any(v is None for v in values):
        return None
    return all(b > a for a, b in zip(values, values[1:]))


def headline(summary: list[dict[str, Any]], sizes: list[str], seq_lens: list[int], variants: list[str]) -> dict:
    """Gain per size x T x variant, and the seed's two claims (gain grows with T; with size)."""
    gain = {(r["size"], r["seq_len"], r["variant"]): r["gain"] for r in summary}
    others = [v for v in variants if v != BASELINE]
    head: dict[str, Any] = {f"gain_{v}_{s}_T{t}": gain.get((s, t, v)) for v in others for s in sizes for t in seq_lens}
    with_t = [increasing([gain.get((s, t, v)) for t in seq_lens]) for v in others for s in sizes]
    with_size = [increasing([gain.get((s, t, v)) for s in sizes]) for v in others for t in seq_lens]
    head["gain_grows_with_T"] = None if None in with_t else all(with_t)
    head["gain_grows_with_size"] = None if None in with_size else all(with_size)
    head["best"] = max(((k, g) for k, g in gain.items() if g is not None and k[2] != BASELINE),
                       key=lambda kg: kg[1], default=(None, None))[0]
    return head


def plot(summary: list[dict[str, Any]], path: Path) -> None:
    """Gain over MHA vs T (log2), one line per size and channel count; bars: min..max over seeds."""
    lines = {f"{variant.replace('multichannel_', '')}, {size}":
             [(r["seq_len"], r["gain"], r["gain_min"], r["gain_max"]) for r in summary
              if (r["size"], r["variant"]) == (size, variant) and r["gain"] is not None]
             for size, variant in dict.fromkeys((r["size"], r["variant"]) for r in summary if r["variant"] != BASELINE)}
    plot_ranges(lines, path, "context T (tokens)", "val loss of MHA minus multichannel (nats)", size=(5.8, 3.8),
                zero_line=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="modformer bench multichannel", description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter, epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--sizes", nargs="+", default=["4x256x4", "4x512x8"], type=str,
                   help="model sizes, LAYERSxWIDTHxHEADS")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[256, 1024, 4096], help="contexts T")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, help="attention variants")
    p.add_argument("--seeds", type=int, default=1, help="seeds per cell")
    p.add_argument("--steps", type=int, default=300, help="training steps per run")
    p.add_argument("--tokens-per-step", type=int, default=16384, help="tokens per step (batch = this / T)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--dropout", type=float, default=0.2, help="dropout")
    p.add_argument("--eval-batches", type=int, default=0, help="0 = the whole validation split")
    p.add_argument("--device", default="auto", help="device: auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once, each in its own process")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: 1x32x2 and 1x64x2, T 16 and 32, 3 steps")
    p.add_argument("--runs-dir", default=None, help="keep the run folders here (default: a temporary folder)")
    p.add_argument("--out", default=DEFAULT_OUT, help="result folder (benchmarks/results: the committed answer)")
    args = parse_with_preset(p, argv, "--tiny", sizes=["1x32x2", "1x64x2"], seq_lens=[16, 32], steps=3,
                             tokens_per_step=64, eval_batches=2, device="cpu", threads=1)
    for size in args.sizes:
        try:
            parse_size(size)
        except argparse.ArgumentTypeError as e:
            p.error(f"--sizes: {e}")
    if BASELINE not in args.variants:
        p.error(f"--variants must include {BASELINE} (the gains are measured against it)")
    cells = list(itertools.product(args.sizes, args.seq_lens, args.variants, range(args.seeds)))
    config = {k: getattr(args, k) for k in ("sizes", "seq_lens", "variants", "seeds", "steps", "tokens_per_step",
                                            "lr", "dropout", "eval_batches", "jobs")}
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")

    def write(rows: list[dict[str, Any]]) -> Path:
        """The result file from the runs finished so far (rewritten after each run)."""
        add_gains(rows)
        summary = summarise(rows)
        extra = {"summary": summary, "config": config}
        if len(rows) < len(cells):
            extra["partial"] = f"{len(rows)} of {len(cells)} runs finished"
        head = headline(summary, args.sizes, args.seq_lens, args.variants)
        return write_result("multichannel", head, rows, device, args.out, extra=extra)

    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(args.runs_dir or tmp)
        rows = map_cases(functools.partial(train_cell, args=args, runs=runs), cells, "multichannel", args.jobs,
                         lambda c: f"{c[0]} T={c[1]} {c[2]} seed {c[3]}", on_result=write)
    path = write(rows)
    summary = summarise(rows)
    print_table(summary, ["size", "seq_len", "variant", "seeds", "final_val_loss", "gain", "gain_min", "gain_max",
                          "flops_ratio_vs_mha", "tokens_per_s_ratio_vs_mha"])
    png = path.with_suffix(".png")
    plot(summary, png)
    print(f"wrote {path} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
