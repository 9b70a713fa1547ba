"""Pruning benchmark (CPU) on the grokked modular-addition model (configs/grokking.yaml).

* one-shot curves: validation accuracy vs fraction removed for magnitude (global), heads (gradient
  and ablation importance), neurons (gradient), layers -- no fine-tuning;
* unstructured: iterative magnitude pruning (per-matrix scope, fine-tune between rounds, Frankle &
  Carbin without rewinding to init: the survivors keep their trained values) to --sparsity, then a
  recovery fine-tune at a lower lr;
* structured: neurons then heads removed (gradient importance), a short fine-tune after each;
  parameter count and measured single-thread CPU latency of a batched forward before/after.
Writes OUT/prune.json and prune.png.

    modformer bench prune [--run RUN_DIR] [--train-steps 1000]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

import modformer as mf
from modformer.bench.common import CONFIGS, DEFAULT_OUT, cases, print_table, time_fn, write_result
from modformer.cli import HelpFormatter
from modformer.compress import (
    count_params,
    evaluate,
    finetune,
    iterative_magnitude_pruning,
    magnitude_prune,
    make_permanent,
    prune_structured,
    sparsity_of,
)
from modformer.compress.finetune import batches


def grokked_run(out_dir: str, steps: int) -> Path:
    """Train configs/grokking.yaml for ``steps`` with a cosine decay (a stable 100% model)."""
    from modformer.config import load_config
    from modformer.train.trainer import Trainer

    cfg = load_config(CONFIGS / "grokking.yaml", [
        "name=grok_add", f"out_dir={out_dir}", "train.progress=false", "train.tensorboard=false",
        f"train.steps={steps}", "train.schedule=cosine", "train.early_stop_metric=null", "train.eval_every=100",
        "train.threads=1"])
    Trainer(cfg, overwrite=True).fit()
    return Path(out_dir) / "grok_add"


def latency(model: torch.nn.Module, x: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return time_fn(lambda: model(x), torch.device("cpu"), warmup=5, iters=30)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="modformer bench prune", description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter,
                                epilog=("examples:\n"
                                        "  modformer bench prune   # trains the grokked model first\n"
                                        "  modformer bench prune --run runs/grokking --out benchmarks/results"))
    p.add_argument("--run", default=None, help="a trained grokking run (default: train one)")
    p.add_argument("--train-steps", type=int, default=1000, help="training steps of the grokked model (without --run)")
    p.add_argument("--sparsity", type=float, default=0.9, help="final weight sparsity of iterative magnitude pruning")
    p.add_argument("--imp-rounds", type=int, default=8, help="pruning rounds")
    p.add_argument("--imp-steps", type=int, default=200, help="fine-tuning steps after each round")
    p.add_argument("--imp-final-steps", type=int, default=300, help="recovery fine-tune after the last round")
    p.add_argument("--imp-final-lr", type=float, default=1e-3, help="learning rate of the final fine-tune")
    p.add_argument("--neurons", type=float, default=0.8, help="share of FFN neurons removed (structured)")
    p.add_argument("--heads", type=float, default=0.25, help="share of attention heads removed (structured)")
    p.add_argument("--ft-steps", type=int, default=200,
                   help="fine-tuning steps after the neuron stage (half of them after the head stage)")
    p.add_argument("--ft-lr", type=float, default=3e-3, help="fine-tuning learning rate")
    p.add_argument("--latency-batch", type=int, default=4096, help="batch size of the latency measurement")
    p.add_argument("--out", default=DEFAULT_OUT, help="result folder (benchmarks/results: the committed answer)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from modformer.runs import run_config, run_dataset, run_model

    tmp = tempfile.TemporaryDirectory()
    run = Path(args.run) if args.run else grokked_run(tmp.name, args.train_steps)
    model, data, tcfg = run_model(run).eval(), run_dataset(run), run_config(run).train
    base = evaluate(model, data)
    n0 = count_params(model)
    print(f"base model: {n0} params, val acc {base['acc']:.4f}")
    score = batches(data, "train", 512, 8)
    rows = []

    def row(method: str, frac: float, m: torch.nn.Module, **extra: object) -> dict:
        r = {"method": method, "fraction_removed": frac, "params": count_params(m), **evaluate(m, data), **extra}
        rows.append(r)
        return r

    t0 = time.perf_counter()
    for s in cases([0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95], "prune magnitude", lambda s: f"next: sparsity {s:g}"):
        m = copy.deepcopy(model)
        row("magnitude_oneshot", magnitude_prune(m, s), m)
    one_shot = [("heads", "gradient"), ("heads", "ablation"), ("neurons", "gradient"), ("layers", "gradient")]
    for method, imp in cases(one_shot, "prune structured", lambda m: f"next: {m[0]} by {m[1]}"):
        for a in ((0.125, 0.25, 0.375, 0.5, 0.75) if method == "heads" else (0.5,) if method == "layers"
                  else (0.25, 0.5, 0.7, 0.8, 0.9)):
            m, info = prune_structured(model, method, a, score, imp)
            row(f"{method}_{imp}_oneshot", a, m, param_reduction=1 - count_params(m) / n0)
    print_table(rows, ["method", "fraction_removed", "params", "acc", "loss"])
    print(f"one-shot curves: {time.perf_counter() - t0:.0f}s")

    # unstructured: iterative magnitude pruning with fine-tuning between rounds
    t0 = time.perf_counter()
    m = copy.deepcopy(model)
    imp_rows = iterative_magnitude_pruning(
        m, lambda x: finetune(x, data, tcfg, args.imp_steps, lr=args.ft_lr), args.sparsity, args.imp_rounds,
        scope="layer", eval_fn=lambda x: evaluate(x, data)["acc"])
    if args.imp_final_steps:
        finetune(m, data, tcfg, args.imp_final_steps, lr=args.imp_final_lr, seed=1)
        imp_rows.append({"round": "recovery", "sparsity": sparsity_of(m), "acc": evaluate(m, data)["acc"]})
    make_permanent(m)
    for r in imp_rows:
        rows.append({"method": "imp_finetune", "fraction_removed": r["sparsity"], "acc": r["acc"],
                     "round": r["round"]})
    imp_final = evaluate(m, data)
    print_table(imp_rows)
    print(f"IMP: {time.perf_counter() - t0:.0f}s")
    with tempfile.TemporaryDirectory() as d:
        mf.save(m, d)
        assert sparsity_of(mf.load(d)) >= args.sparsity - 1e-3

    # structured: neurons, fine-tune, heads, fine-tune
    t0 = time.perf_counter()
    s1, info1 = prune_structured(model, "neurons", args.neurons, score)
    acc_s1 = evaluate(s1, data)["acc"]
    finetune(s1, data, tcfg, args.ft_steps, lr=args.ft_lr)
    acc_s1_ft = evaluate(s1, data)["acc"]
    s2, info2 = prune_structured(s1, "heads", args.heads, batches(data, "train", 512, 8))
    acc_s2 = evaluate(s2, data)["acc"]
    finetune(s2, data, tcfg, args.ft_steps // 2, lr=args.ft_lr)
    final = evaluate(s2, data)
    print(f"structured: {time.perf_counter() - t0:.0f}s")
    with tempfile.TemporaryDirectory() as d:
        mf.save(s2, d)
        s2 = mf.load(d)                                   # the saved model is what gets timed
        size_before = sum(f.stat().st_size for f in Path(run, "checkpoints").glob("*/model.safetensors"))
        size_after = (Path(d) / "model.safetensors").stat().st_size
    x, _ = next(iter(data.iter_eval("val", args.latency_batch, 1)))
    lat = {}
    for name, mm in (("original", model), ("pruned", s2), ("original", model), ("pruned", s2)):
        lat.setdefault(name, []).append(latency(mm, x))
    lat0, lat1 = min(lat["original"]), min(lat["pruned"])
    x1 = x[:1]
    lat0_b1, lat1_b1 = latency(model, x1), latency(s2, x1)
    n1 = count_params(s2)
    structured = {"steps": [
        {"stage": "neurons", "fraction": args.neurons, "acc": acc_s1, "acc_after_finetune": acc_s1_ft,
         "removed_per_layer": {k: len(v) for k, v in info1["removed"].items()}},
        {"stage": "heads", "fraction": args.heads, "acc": acc_s2, "acc_after_finetune": final["acc"],
         "removed_per_layer": {k: len(v) for k, v in info2["removed"].items()}}],
        "params_before": n0, "params_after": n1, "layer_overrides": s2.cfg.layer_overrides,
        "file_bytes_after": size_after, "latency_batch": args.latency_batch,
        "latency_s_before": lat0, "latency_s_after": lat1, "latency_s_batch1_before": lat0_b1,
        "latency_s_batch1_after": lat1_b1, "threads": 1}
    rows.append({"method": "structured_neurons+heads_finetuned", "fraction_removed": 1 - n1 / n0, "params": n1,
                 **final})
    print(structured)
    headline = {"unstructured_sparsity_full_acc": max([r["sparsity"] for r in imp_rows if r["acc"] >= base["acc"]],
                                                      default=0.0),
                "unstructured_final_sparsity": imp_rows[-1]["sparsity"], "unstructured_final_acc": imp_final["acc"],
                "structured_param_reduction": 1 - n1 / n0, "structured_acc_drop": base["acc"] - final["acc"],
                "structured_speedup": lat0 / lat1, "structured_speedup_batch1": lat0_b1 / lat1_b1,
                "base_acc": base["acc"], "structured_acc": final["acc"]}
    print(headline)
    print(f"checkpoint bytes {size_before} -> {size_after}")
    write_result("prune", headline, rows, torch.device("cpu"), args.out,
                 extra={"structured": structured, "imp": imp_rows, "threads": 1,
                        "base": {"params": n0, **base, "run": str(run)}})
    plot(rows, base["acc"], Path(args.out) / "prune.png")
    return 0


def plot(rows: list[dict], base: float, path: Path, metric: str = "acc", ylabel: str = "validation accuracy",
         title: str = "pruning the grokked modular-addition model (p=113)", log: bool = False,
         xlabel: str = "fraction removed (weights / heads / neurons / layers; structured row: parameters)") -> Path:
    """``metric`` vs fraction removed, one line per method, the unpruned model as a dotted line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["fraction_removed"], r[metric]) for r in rows if r["method"] == method)
        ax.plot(*zip(*pts), marker="o", label=method)
    ax.axhline(base, color="gray", ls=":")
    if log:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
