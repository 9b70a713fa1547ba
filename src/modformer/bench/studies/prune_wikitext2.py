"""Pruning a small word-level WikiText-2 model (CPU): validation perplexity vs fraction removed.

Trains a small GPT from configs/wikitext2.yaml (shrunk by the overrides below; the trainer as usual,
one thread), then one-shot (no fine-tuning) curves for global magnitude pruning, heads (gradient,
ablation), FFN neurons (gradient) and layers, plus heads removed by jointly trained L0 gates.
Perplexity on the first --eval-batches validation windows. Writes OUT/prune_wikitext2.json.

    modformer bench prune-wikitext2 [--steps 600] [--eval-batches 40]
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from modformer.bench.common import CONFIGS, DEFAULT_OUT, cases, print_table, write_result
from modformer.cli import HelpFormatter
from modformer.compress import count_params, evaluate, magnitude_prune, prune_structured
from modformer.compress.finetune import batches
from modformer.compress.l0 import prune_closed_heads, train_head_gates

SMALL = ["model.n_layer=2", "model.n_head=4", "model.d_model=128", "model.max_seq_len=64", "data.seq_len=64",
         "model.dropout=0.1", "model.attn_dropout=0.0", "train.batch_size=16", "train.warmup_steps=50",
         "train.compile=false", "train.threads=1", "train.progress=false", "train.tensorboard=false",
         "train.eval_batches=20", "train.sample_tokens=0", "train.ema_decay=0"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="modformer bench prune-wikitext2", description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter,
                                epilog="examples:\n  modformer bench prune-wikitext2 --steps 400 --eval-batches 30")
    p.add_argument("--run", default=None, help="a trained run (default: train one)")
    p.add_argument("--steps", type=int, default=600, help="training steps of the small model")
    p.add_argument("--eval-batches", type=int, default=40, help="validation windows of 16 x 64 words")
    p.add_argument("--l0-lambda", type=float, default=0.1, help="L0 penalty of the head gates")
    p.add_argument("--out", default=DEFAULT_OUT, help="result folder (benchmarks/results: the committed answer)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from modformer.config import load_config
    from modformer.runs import run_dataset, run_model
    from modformer.train.trainer import Trainer

    tmp = tempfile.TemporaryDirectory()
    t0 = time.perf_counter()
    if args.run is None:
        cfg = load_config(CONFIGS / "wikitext2.yaml", [
            *SMALL, "name=wt2_small", f"out_dir={tmp.name}", f"train.steps={args.steps}",
            f"train.eval_every={args.steps}"])
        Trainer(cfg, overwrite=True).fit()
        args.run = str(Path(tmp.name) / "wt2_small")
    train_s = time.perf_counter() - t0
    model, data = run_model(args.run).eval(), run_dataset(args.run)
    n0 = count_params(model)

    def ppl(m: torch.nn.Module) -> float:
        return math.exp(evaluate(m, data, "val", 16, args.eval_batches)["loss"])

    base = ppl(model)
    print(f"base: {n0} params, val ppl {base:.1f} ({train_s:.0f}s training)")
    score = batches(data, "train", 16, 8)
    rows: list[dict] = []

    def row(method: str, frac: float, m: torch.nn.Module, **extra: object) -> None:
        rows.append({"method": method, "fraction_removed": frac, "params": count_params(m), "ppl": ppl(m),
                     "param_reduction": 1 - count_params(m) / n0, **extra})
        print_table([rows[-1]])

    for s in cases([0.2, 0.4, 0.5, 0.6, 0.8], "prune-wikitext2 magnitude", lambda s: f"next: sparsity {s:g}"):
        m = copy.deepcopy(model)
        row("magnitude_oneshot", magnitude_prune(m, s), m)
    one_shot = [("heads", "gradient", (0.25, 0.5, 0.75)), ("heads", "ablation", (0.25, 0.5, 0.75)),
                ("neurons", "gradient", (0.25, 0.5, 0.75, 0.9)), ("layers", "gradient", (0.5,))]
    for method, imp, amounts in cases(one_shot, "prune-wikitext2 structured", lambda m: f"next: {m[0]} by {m[1]}"):
        for a in amounts:
            m, _ = prune_structured(model, method, a, score, imp)
            row(f"{method}_{imp}_oneshot", a, m)
    m = copy.deepcopy(model)
    gates, log = train_head_gates(m, score, steps=200, lam=args.l0_lambda, joint=True, model_lr=1e-4)
    small = prune_closed_heads(m, gates)
    row("heads_l0_joint", sum(len(v) for v in gates.closed().values()) / 8, small, l0_lambda=args.l0_lambda,
        heads_kept=[b.attn.n_head for b in small.blocks])
    headline = {"base_ppl": base, "params": n0, "train_steps": args.steps, "train_seconds": train_s,
                **{f"{r['method']}_{r['fraction_removed']:g}_ppl": r["ppl"] for r in rows}}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    plot(rows, base, Path(args.out) / "prune_wikitext2.png")
    write_result("prune_wikitext2", headline, rows, torch.device("cpu"), args.out,
                 extra={"threads": 1, "overrides": SMALL, "eval_windows": args.eval_batches * 16, "seq_len": 64})
    return 0


def plot(rows: list[dict], base_ppl: float, path: Path) -> Path:
    """Validation perplexity (log scale) vs fraction removed, one line per method."""
    from modformer.bench.studies.prune import plot as plot_pruning  # the same figure as for accuracy

    return plot_pruning(rows, base_ppl, path, metric="ppl", ylabel="validation perplexity (word level)",
                        title="one-shot pruning of a small WikiText-2 model (no fine-tuning)", log=True,
                        xlabel="fraction removed (weights / heads / neurons / layers)")


if __name__ == "__main__":
    sys.exit(main())
