"""``modformer prune`` and ``modformer lora``: compress a run's newest checkpoint.

    modformer prune RUN_DIR --method {magnitude,heads,neurons,layers} --amount F [--finetune-steps N] [--out DIR]
    modformer prune RUN_DIR --method heads --importance l0 [--l0-lambda 0.05] (--amount F | --l0-closed)
    modformer lora RUN_DIR --task 'data.options.op="-"' [--rank 4] [--targets qkv,out,up,down] [--steps N] [--out DIR]

Both evaluate before and after on the run's validation split (the trainer's eval settings), print
a summary table (``--json``: one JSON line) and write the result beside the model (``prune.json`` /
``modformer.json``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modformer.cli_args import float_in, int_in, plain_name
from modformer.console import note
from modformer.utils import atomic_write_text

if TYPE_CHECKING:
    from torch import nn


def _eval(model: nn.Module, data: Any, cfg: Any) -> dict[str, float]:
    from modformer.compress.finetune import evaluate

    t = cfg.train
    bs = t.eval_batch_size or (t.batch_size if t.batch_size > 0 else 1024)
    return evaluate(model, data, "val", bs, 0 if data.kind == "task" else t.eval_batches)


def _latency(model: nn.Module, data: Any, cfg: Any, iters: int = 5) -> float:
    """Median seconds of one forward over an evaluation batch."""
    import torch

    from modformer.bench.common import time_fn

    x, _ = next(iter(data.iter_eval("val", cfg.train.eval_batch_size or 512, 1)))
    model.eval()
    with torch.no_grad():
        return time_fn(lambda: model(x), torch.device("cpu"), warmup=2, iters=iters)


def cmd_prune(args: argparse.Namespace) -> int:
    from modformer.compress import structured, unstructured
    from modformer.compress.finetune import batches, finetune_run
    from modformer.runs import run_config, run_dataset, run_model
    from modformer.saving import save

    if args.l0_closed and (args.method != "heads" or args.importance != "l0"):
        raise ValueError("--l0-closed needs --method heads --importance l0")
    if args.amount is None and not args.l0_closed:
        raise ValueError("--amount is required (unless --l0-closed)")
    cfg = run_config(args.run_dir)
    model, data = run_model(args.run_dir).eval(), run_dataset(args.run_dir)
    note("prune", f"{args.run_dir}: evaluating before pruning")
    before = {**_eval(model, data, cfg), "params": structured.count_params(model),
              "latency_s": _latency(model, data, cfg)}
    info: dict[str, Any] = {}
    l0_opts = {"steps": args.l0_steps, "lam": args.l0_lambda, "lr": args.l0_lr, "joint": args.l0_joint}
    if args.method == "magnitude":
        info["sparsity"] = unstructured.magnitude_prune(model, args.amount, args.scope)
    elif args.l0_closed:
        from modformer.compress.l0 import prune_closed_heads, train_head_gates

        scoring = batches(data, "train", args.score_batch_size, args.score_batches)
        gates, log = train_head_gates(model, scoring, **l0_opts)
        info = {"removed": {str(k): v for k, v in gates.closed().items() if v}, "l0_log": log,
                "gates": [z.tolist() for z in gates.deterministic()]}
        model = prune_closed_heads(model, gates)
    else:
        scoring = batches(data, "train", args.score_batch_size, args.score_batches)
        model, info = structured.prune_structured(model, args.method, args.amount, scoring, args.importance,
                                                  l0_opts if args.importance == "l0" else None)
        info.pop("scores", None)
    note("prune", f"{args.method}: {'closed L0 gates' if args.l0_closed else args.amount} pruned; evaluating")
    pruned = _eval(model, data, cfg)
    tag = "l0closed" if args.l0_closed else f"{args.amount:g}"
    out = Path(args.out) if args.out else Path(args.run_dir) / f"pruned_{args.method}_{tag}"
    finetune_dir = None
    if args.finetune_steps:
        finetune_dir = out / "finetune"
        note("prune", f"fine-tuning {args.finetune_steps} steps -> {finetune_dir}")
        finetune_run(model, data, cfg, args.finetune_steps, finetune_dir, lr=args.lr)
    if args.method == "magnitude":
        unstructured.make_permanent(model)
        info["sparsity"] = unstructured.sparsity_of(model)
    after = {**_eval(model, data, cfg), "params": structured.count_params(model),
             "latency_s": _latency(model, data, cfg)}
    save(model, out)
    result = {"run": str(args.run_dir), "method": args.method, "amount": args.amount, "out": str(out),
              "before": before, "pruned": pruned, "finetune_steps": args.finetune_steps,
              "finetune_run": str(finetune_dir) if finetune_dir else None, "after": after,
              **info, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    atomic_write_text(out / "prune.json", json.dumps(result, indent=2))
    if "removed" in result:                  # the full lists are in prune.json
        result["removed"] = {k: len(v) for k, v in result["removed"].items()}
    if args.json:
        print(json.dumps(result))
    else:
        from modformer.console import print_summary

        shown = {k: v for k, v in result.items() if k in ("out", "sparsity", "removed", "finetune_steps",
                                                          "finetune_run") and v is not None}
        print_summary(f"prune {args.run_dir}: {args.method} {tag} (details: {out / 'prune.json'})", values=shown,
                      columns={"before": before, "pruned": pruned, "after": after})
    return 0


def cmd_lora(args: argparse.Namespace) -> int:
    import peft  # noqa: F401  (the optional package this command needs: missing, it fails here in one line)

    from modformer.compress import lora
    from modformer.compress.finetune import finetune_run
    from modformer.config import apply_overrides
    from modformer.data import build_dataset
    from modformer.runs import run_config, run_model
    from modformer.saving import save

    cfg = apply_overrides(run_config(args.run_dir), args.task)
    data = build_dataset(cfg.data)
    base = run_model(args.run_dir).eval()
    if data.vocab_size > base.cfg.vocab_size:
        raise ValueError(f"the task's vocabulary ({data.vocab_size}) is larger than the model's "
                         f"({base.cfg.vocab_size})")
    note("lora", f"{args.run_dir}: evaluating the base model on the task")
    base_eval = _eval(base, data, cfg)
    targets = [t for t in args.targets.split(",") if t]
    if not targets:
        raise ValueError(f"--targets must name at least one module (e.g. qkv,out), got {args.targets!r}")
    pm = lora.add_lora(base, r=args.rank, alpha=args.alpha, dropout=args.dropout, targets=targets,
                       adapter_name=args.name)
    trainable, total, frac = lora.trainable_fraction(pm)
    note("lora", f"training a rank-{args.rank} adapter on {', '.join(targets)} ({trainable:,} parameters) "
                 f"for {args.steps} steps")
    out = Path(args.out) if args.out else Path(args.run_dir) / "adapters" / args.name
    if args.steps:
        finetune_run(pm, data, cfg, args.steps, out / "finetune", lr=args.lr, saved=lora.merged_copy)
    after = _eval(pm, data, cfg)
    meta = {"base_run": str(Path(args.run_dir).resolve()), "task": args.task, "rank": args.rank,
            "alpha": args.alpha if args.alpha is not None else 2 * args.rank, "targets": targets,
            "steps": args.steps, "finetune_run": str(out / "finetune") if args.steps else None,
            "trainable_params": trainable, "total_params": total,
            "trainable_fraction": frac, "base_on_task": base_eval, "adapter_on_task": after}
    lora.save_adapter(pm, out, args.name, meta)
    if args.merge:
        save(lora.merged_model(pm), out / "merged")
        meta["merged"] = str(out / "merged")
    if args.json:
        print(json.dumps({"out": str(out), **meta}))
    else:
        from modformer.console import print_summary

        shown = {"out": str(out), **{k: meta[k] for k in ("task", "rank", "alpha", "targets", "steps",
                                                          "trainable_params", "trainable_fraction", "merged",
                                                          "finetune_run") if meta.get(k) is not None}}
        print_summary(f"lora {args.run_dir}: adapter {args.name!r}", values=shown,
                      columns={"base on task": base_eval, "with adapter": after})
    return 0


def add_parsers(sub: Any) -> None:
    """Register ``prune`` and ``lora`` on the CLI's subparsers."""
    p = sub.add_parser("prune", help="prune a run's newest checkpoint (magnitude | heads | neurons | layers)")
    p.add_argument("run_dir", help="run folder (runs/NAME); its newest checkpoint is pruned")
    p.add_argument("--method", required=True, choices=["magnitude", "heads", "neurons", "layers"],
                   help="magnitude: zero the smallest weights; heads | neurons | layers: remove them physically")
    p.add_argument("--amount", type=float_in("[0, 1)"), default=None,
                   help="fraction removed: of all weights (magnitude) or of heads / neurons / layers")
    p.add_argument("--scope", default="global", choices=["global", "layer"],
                   help="magnitude: one ranking or per matrix")
    p.add_argument("--importance", default="gradient", choices=["gradient", "ablation", "magnitude", "l0"],
                   help="unit scores: gradient (Michel et al. 2019), ablation (heads), magnitude (neurons), "
                        "l0 (heads: learned hard-concrete gates, Voita et al. 2019)")
    p.add_argument("--l0-lambda", type=float_in(">= 0"), default=0.05, help="l0: weight of the expected-L0 penalty")
    p.add_argument("--l0-steps", type=int_in(">= 1"), default=300,
                   help="l0: gate training steps (over the scoring batches)")
    p.add_argument("--l0-lr", type=float_in("> 0"), default=0.05, help="l0: Adam lr of the gates")
    p.add_argument("--l0-joint", action="store_true", help="l0: train the model with the gates (default frozen)")
    p.add_argument("--l0-closed", action="store_true",
                   help="l0: remove exactly the heads whose gates closed (instead of --amount); open gates "
                        "are folded into the out-projection")
    p.add_argument("--finetune-steps", type=int_in(">= 0"), default=0, help="train this many steps after pruning")
    p.add_argument("--lr", type=float_in("> 0"), default=None, help="fine-tuning lr (default: the run's train.lr)")
    p.add_argument("--score-batches", type=int_in(">= 1"), default=8, help="training batches the importance uses")
    p.add_argument("--score-batch-size", type=int_in(">= 1"), default=512, help="rows per importance batch")
    p.add_argument("--out", default=None, help="output folder (default RUN_DIR/pruned_METHOD_AMOUNT)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line (for scripts), not a table")
    p.set_defaults(fn=cmd_prune)

    q = sub.add_parser("lora", help="train a LoRA adapter (HF PEFT) on a task from a run's newest checkpoint")
    q.add_argument("run_dir", help="run folder (runs/NAME); the adapter trains on its newest checkpoint")
    q.add_argument("--task", nargs="+", default=[], metavar="KEY=VALUE",
                   help='overrides of the run config for the new task, e.g. \'data.options.op="-"\' '
                        'train.lr=3e-3 (quote "-": values are YAML)')
    q.add_argument("--rank", type=int_in(">= 1"), default=4, help="LoRA rank r of each adapted matrix")
    q.add_argument("--alpha", type=float_in("> 0"), default=None, help="LoRA alpha (default 2 * rank)")
    q.add_argument("--dropout", type=float_in("[0, 1)"), default=0.0, help="LoRA dropout on the adapter input")
    q.add_argument("--targets", default="qkv,out,up,down", help="comma-separated module names")
    q.add_argument("--steps", type=int_in(">= 0"), default=300, help="adapter training steps")
    q.add_argument("--lr", type=float_in("> 0"), default=None, help="default: the run's (or --task's) train.lr")
    q.add_argument("--name", type=plain_name, default="default", help="adapter name (a plain folder name)")
    q.add_argument("--merge", action="store_true", help="also save the merged model to OUT/merged")
    q.add_argument("--out", default=None, help="adapter folder (default RUN_DIR/adapters/NAME)")
    q.add_argument("--json", action="store_true", help="print the result as one JSON line (for scripts), not a table")
    q.set_defaults(fn=cmd_lora)
