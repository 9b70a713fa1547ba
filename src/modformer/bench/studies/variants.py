"""Attention / FFN variants (issue 5) on modular addition at roughly equal parameter count.

Every variant is trained through the Trainer on ``a + b (mod p)`` from the same seed, data split and
optimiser settings; each variant's ``d_ff`` (the MLP width; for moe the expert width, for
multichannel the base of the channel widths) is chosen so its non-embedding parameter count is the
closest to the mha baseline's. Per variant: parameters, KV-cache bytes per token (one sequence, all
layers), final / best validation accuracy and loss, steps and seconds to 99% validation accuracy
("steps to grok"), training tokens/s, the last logged aux loss and MoE capacity-overflow fraction.

    modformer bench variants                                # full budget -> OUT/variants.json
    modformer bench variants --steps 20 --p 23 --out /tmp/v.json --only mha,mla,moe  # smoke test

Options: ``--steps`` budget (early stop at ``--target`` val acc unless ``--no-early-stop``), ``--p``,
``--train-fraction``, ``--d-model``, ``--n-layer``, ``--lr``, ``--wd``, ``--device``, ``--threads``,
``--only`` (comma-separated variant names), ``--runs-dir`` (kept run folders; default a temp dir).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import modformer as mf
from modformer.bench.common import CONFIGS, DEFAULT_OUT, cases, device_name, write_result
from modformer.cli import HelpFormatter
from modformer.config import DataConfig, ModelConfig, RunConfig, TrainConfig, load_config
from modformer.train.logging import read_metrics
from modformer.train.trainer import Trainer

# name -> ModelConfig overrides on top of the baseline (2 layers, RoPE, pre-LN, GELU MLP)
VARIANTS: dict[str, dict] = {
    "mha": {},
    "gqa": {"attention": "gqa", "n_kv_heads": 2},
    "mqa": {"attention": "mqa"},
    "mla": {"attention": "mla"},
    "mla_q": {"attention": "mla", "attention_options": {"q_lora_rank": 64}},
    "mla_r32": {"attention": "mla", "attention_options": {"kv_lora_rank": 32}},   # smaller latent, smaller cache
    "moa": {"attention": "moa"},
    "talking_heads": {"attention": "talking_heads"},
    "multichannel_s2": {"attention": "multichannel", "attn_only": True, "attention_options": {"n_channels": 2}},
    "multichannel_s4": {"attention": "multichannel", "attn_only": True, "attention_options": {"n_channels": 4}},
    "multichannel_s2_mean": {"attention": "multichannel", "attn_only": True,
                             "attention_options": {"n_channels": 2, "merge": "mean"}},
    "multichannel_s2_max": {"attention": "multichannel", "attn_only": True,
                            "attention_options": {"n_channels": 2, "merge": "max"}},
    "multichannel_s2_shared": {"attention": "multichannel", "attn_only": True,
                               "attention_options": {"n_channels": 2, "shared_mlp": True}},
    "moe": {"ffn": "moe", "ffn_options": {"n_experts": 4, "top_k": 2}},
    "moe_shared": {"ffn": "moe", "ffn_options": {"n_experts": 4, "top_k": 1, "n_shared": 1}},
    "denseformer": {"model_options": {"denseformer": True}},
}


def base_model(args: argparse.Namespace) -> ModelConfig:
    if args.recipe == "grokking":                      # the grokking recipe's model: no norm, learned positions
        cfg = load_config(CONFIGS / "grokking.yaml").model
        cfg.vocab_size, cfg.d_model, cfg.n_layer, cfg.n_head = args.p + 1, args.d_model, args.n_layer, args.n_head
        cfg.d_ff = None                                # 4 x d_model, as the default base
        return cfg
    return ModelConfig(vocab_size=args.p + 1, n_layer=args.n_layer, d_model=args.d_model, n_head=args.n_head,
                       max_seq_len=4, position="rope", ffn="gelu", norm="layernorm")


def with_overrides(cfg: ModelConfig, overrides: dict, d_ff: int | None) -> ModelConfig:
    cfg = copy.deepcopy(cfg)
    for k, v in overrides.items():
        setattr(cfg, k, copy.deepcopy(v))
    cfg.d_ff = d_ff
    return cfg


def count(cfg: ModelConfig) -> int:
    return mf.build_model(cfg).num_params(non_embedding=True)


def match_params(cfg: ModelConfig, overrides: dict, target: int, step: int = 8) -> tuple[ModelConfig, int]:
    """The ``d_ff`` (multiple of ``step``) whose non-embedding parameter count is closest to ``target``."""
    def n(d_ff: int) -> int:
        return count(with_overrides(cfg, overrides, d_ff))

    lo, hi = step, step
    while n(hi) < target and hi < 64 * cfg.d_model:     # parameters grow with d_ff: bracket, then bisect
        lo, hi = hi, hi * 2
    while hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        lo, hi = (mid, hi) if n(mid) < target else (lo, mid)
    best = min((lo, hi), key=lambda d: abs(n(d) - target))
    return with_overrides(cfg, overrides, best), best


def kv_bytes_per_token(cfg: ModelConfig) -> float:
    model = mf.build_model(cfg).eval()
    cache = model.new_cache(1)
    with torch.no_grad():
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
    return cache.bytes_per_token()


def recipe_run(name: str, cfg: ModelConfig, args: argparse.Namespace, runs_dir: Path) -> RunConfig:
    """``--recipe grokking``: the training settings of configs/grokking.yaml (AdamW 7e-3, batch 512, weight
    decay 2, label smoothing 0.2: groks in ~250 steps) with the variant's model."""
    run = load_config(CONFIGS / "grokking.yaml")
    run.name, run.out_dir, run.model = name, str(runs_dir), cfg
    run.data.options = {**run.data.options, "p": args.p, "train_fraction": args.train_fraction, "seed": args.seed}
    t = run.train
    t.steps, t.device, t.threads, t.seed, t.progress, t.tensorboard = args.steps, args.device, args.threads, \
        args.seed, False, False
    t.eval_every = t.log_every = args.eval_every
    if args.no_early_stop:
        t.early_stop_metric = t.early_stop_target = None
    return run


def train(name: str, cfg: ModelConfig, args: argparse.Namespace, runs_dir: Path) -> dict:
    run = recipe_run(name, cfg, args, runs_dir) if args.recipe == "grokking" else RunConfig(
        name=name, out_dir=str(runs_dir), model=cfg,
        data=DataConfig(name="modular", options={"p": args.p, "op": "+", "train_fraction": args.train_fraction,
                                                 "seed": args.seed}),
        train=TrainConfig(steps=args.steps, batch_size=0, lr=args.lr, betas=(0.9, 0.98), weight_decay=args.wd,
                          schedule="constant", warmup_steps=min(10, args.steps // 10), grad_clip=0,
                          eval_every=args.eval_every, eval_batches=0, log_every=args.eval_every,
                          early_stop_metric=None if args.no_early_stop else "val/acc",
                          early_stop_target=None if args.no_early_stop else args.target,
                          device=args.device, threads=args.threads, seed=args.seed, progress=False,
                          tensorboard=False))
    t0 = time.perf_counter()
    summary = Trainer(run, overwrite=True).fit()
    rows = read_metrics(runs_dir / name / "metrics.jsonl")
    train_rows = [r for r in rows if r["split"] == "train"]
    tps = [r["tokens_per_s"] for r in train_rows]
    return {
        "final_val_acc": summary.get("final_val_acc"), "final_val_loss": summary.get("final_val_loss"),
        "best_val_acc": summary.get("val_acc"), "steps": summary["steps"],
        "steps_to_99": summary.get("first_target_step"), "seconds_to_99": summary.get("first_target_wall_s"),
        "train_tokens_per_s": statistics.median(tps[1:] if len(tps) > 1 else tps) if tps else None,
        "aux_loss": train_rows[-1].get("aux_loss") if train_rows else None,
        "moe_overflow_frac": (train_rows[-1]["moe_overflow"] / train_rows[-1]["moe_assignments"]
                              if train_rows and "moe_overflow" in train_rows[-1] else None),
        "wall_s": time.perf_counter() - t0,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="modformer bench variants", description=__doc__.split("\n")[0],
                                 formatter_class=HelpFormatter,
                                 epilog="examples:\n  modformer bench variants --steps 600 --eval-every 10 --threads 1")
    ap.add_argument("--recipe", choices=["default", "grokking"], default="default",
                    help="grokking: configs/grokking.yaml's model and optimiser (fast on CPU)")
    ap.add_argument("--steps", type=int, default=3000, help="training steps per variant")
    ap.add_argument("--p", type=int, default=113, help="modulus of the addition task")
    ap.add_argument("--train-fraction", type=float, default=0.3, help="share of all pairs used for training")
    ap.add_argument("--d-model", type=int, default=128, help="model width")
    ap.add_argument("--n-layer", type=int, default=2, help="layers")
    ap.add_argument("--n-head", type=int, default=4, help="attention heads")
    ap.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    ap.add_argument("--wd", type=float, default=1.0, help="weight decay")
    ap.add_argument("--eval-every", type=int, default=50, help="steps between evaluations")
    ap.add_argument("--target", type=float, default=0.99, help="val accuracy that counts as solved (and stops a run)")
    ap.add_argument("--no-early-stop", action="store_true", help="train every variant for all --steps")
    ap.add_argument("--seed", type=int, default=0, help="seed")
    ap.add_argument("--device", default="auto", help="device: auto (cuda if available), cpu, cuda, cuda:N")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--only", default=None, help="comma-separated variant names")
    ap.add_argument("--runs-dir", default=None, help="folder for the training runs (default: a temporary folder)")
    ap.add_argument("--out", default=f"{DEFAULT_OUT}/variants.json", help="result JSON file")
    args = ap.parse_args(argv)
    args.eval_every = min(args.eval_every, args.steps)
    names = args.only.split(",") if args.only else list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    runs_dir = Path(args.runs_dir or tempfile.mkdtemp(prefix="variants-"))
    base = base_model(args)
    target = count(base)
    rows = []
    for name in cases(names, "variants", lambda n: f"next: {n}"):
        cfg, d_ff = (base, None) if name == "mha" else match_params(base, VARIANTS[name], target)
        row = {"variant": name, "attention": cfg.attention, "ffn": cfg.ffn,
               "options": {k: v for k, v in VARIANTS[name].items() if k not in ("attention", "ffn")},
               "d_ff": d_ff or 4 * args.d_model, "params": mf.build_model(cfg).num_params(),
               "non_embedding_params": count(cfg), "kv_bytes_per_token": kv_bytes_per_token(cfg)}
        row.update(train(name, cfg, args, runs_dir))
        rows.append(row)
        print(f"{name}: val acc {row['final_val_acc']}, steps to {args.target} {row['steps_to_99']}", flush=True)
        write(args, rows)

    cols = ["variant", "non_embedding_params", "kv_bytes_per_token", "final_val_acc", "final_val_loss",
            "steps_to_99", "seconds_to_99", "train_tokens_per_s"]
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        cells = [f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols]
        print("| " + " | ".join(cells) + " |")
    print(f"wrote {write(args, rows)}")
    return 0


def plot(rows: list[dict], budget: int, path: Path) -> Path:
    """Bar chart: steps to the target accuracy (not reached: the budget, hatched) and KV-cache bytes per token."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["variant"] for r in rows]
    steps = [r["steps_to_99"] or budget for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    bars = a.barh(names, steps, color="tab:blue")
    for bar, r in zip(bars, rows):
        if r["steps_to_99"] is None:
            bar.set_hatch("//")
            bar.set_color("tab:gray")
    a.set_xlabel(f"steps to 99% val acc (gray: not within {budget})")
    a.invert_yaxis()
    b.barh(names, [r["kv_bytes_per_token"] for r in rows], color="tab:orange")
    b.set_xlabel("KV-cache bytes per token (fp32, all layers)")
    fig.suptitle("attention / FFN variants on modular addition (equal non-embedding parameters)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(args: argparse.Namespace, rows: list[dict]) -> Path:
    """The result JSON (rewritten after every variant, so an interrupted run keeps what it measured)."""
    device = device_name(args.device if torch.cuda.is_available() else "cpu")
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "runs_dir", "only")}
    out = Path(args.out)
    path = write_result("variants", {}, rows, device, out.parent, {"settings": settings}, filename=out.name)
    plot(rows, args.steps, path.with_suffix(".png"))
    return path


if __name__ == "__main__":
    sys.exit(main())
