"""High unstructured sparsity on the grokked modular-addition model (CPU): gradual magnitude pruning
while fine-tuning, then a recovery phase with a decaying learning rate.

One AdamW optimizer (the run's recipe) lives through the whole run, so its moments are not reset at
each pruning step. Sparsity follows Zhu & Gupta's cubic schedule (``polynomial_sparsity``) from the
current one to ``--sparsity`` over ``--prune-steps`` steps, re-pruning every ``--every`` steps by
magnitude (``magnitude_prune``: masks only ever add zeros); then ``--recover-steps`` steps with the
masks fixed and the learning rate decayed (cosine) from ``--lr`` to 0. ``--rewind`` resets the
survivors to the grokked weights after the last pruning step (rewinding to the dense solution, as
learning-rate rewinding in Renda et al. 2020 but with weights), before recovery. Accuracy is on the
whole validation split; the final model is the one reported (no checkpoint is picked by validation
accuracy). Writes OUT/prune_sparse.json.

    modformer bench prune-sparse --run RUN_DIR [--sparsity 0.9] [--prune-steps 2000] [--recover-steps 1500]
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

import modformer as mf
from modformer.bench.common import DEFAULT_OUT, print_table, write_result
from modformer.cli import HelpFormatter
from modformer.compress import evaluate, magnitude_prune, make_permanent, polynomial_sparsity, sparsity_of
from modformer.compress.unstructured import rewind
from modformer.train.optim import build_optimizer


def train_steps(model: torch.nn.Module, opt: torch.optim.Optimizer, data: object, steps: int, batch: int,
                smoothing: float, lr_at: object, on_step: object, g: torch.Generator) -> None:
    """``steps`` optimizer steps; ``lr_at(i)`` sets the lr, ``on_step(i)`` runs before step i (pruning)."""
    model.train()
    for i in range(steps):
        on_step(i)
        for group in opt.param_groups:
            group["lr"] = lr_at(i)
        x, y = data.get_batch("train", batch, g)
        loss = F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten(), ignore_index=-100,
                               label_smoothing=smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="modformer bench prune-sparse", description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter,
                                epilog=("examples:\n"
                                        "  modformer bench prune-sparse --run runs/grokking --prune-steps 2500"))
    p.add_argument("--run", required=True, help="the grokked run (modformer bench prune trains one)")
    p.add_argument("--sparsity", type=float, default=0.9, help="final weight sparsity")
    p.add_argument("--scope", default="global", choices=["global", "layer"],
                   help="magnitude ranking: global or per layer")
    p.add_argument("--prune-steps", type=int, default=2000, help="steps of the gradual (polynomial) sparsity schedule")
    p.add_argument("--every", type=int, default=20, help="steps between pruning events")
    p.add_argument("--lr", type=float, default=3e-3, help="learning rate while pruning")
    p.add_argument("--recover-steps", type=int, default=1500, help="training steps after the final sparsity")
    p.add_argument("--recover-lr", type=float, default=None, help="peak lr of the recovery (default --lr)")
    p.add_argument("--recover-smoothing", type=float, default=None,
                   help="label smoothing while recovering (default: the run's)")
    p.add_argument("--rewind", action="store_true", help="reset survivors to the grokked weights before recovery")
    p.add_argument("--eval-every", type=int, default=250, help="steps between evaluations")
    p.add_argument("--seed", type=int, default=0, help="seed")
    p.add_argument("--name", default="prune_sparse", help="result file name, without .json")
    p.add_argument("--out", default=DEFAULT_OUT, help="result folder (benchmarks/results: the committed answer)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from modformer.runs import run_config, run_dataset, run_model

    model, data, tcfg = run_model(args.run).eval(), run_dataset(args.run), run_config(args.run).train
    dense = copy.deepcopy(model.state_dict())
    base = evaluate(model, data)
    print(f"base: val acc {base['acc']:.4f}")
    g = torch.Generator().manual_seed(args.seed)
    opt = build_optimizer(model, tcfg)
    rows: list[dict] = []
    t0 = time.perf_counter()

    def log(phase: str, step: int) -> None:
        r = {"phase": phase, "step": step, "sparsity": sparsity_of(model), **evaluate(model, data),
             "seconds": time.perf_counter() - t0}
        rows.append(r)
        print_table([r])

    def prune_at(i: int) -> None:
        if i % args.every == 0:
            magnitude_prune(model, polynomial_sparsity(i + args.every, 0, args.prune_steps, args.sparsity),
                            args.scope)
        if i and i % args.eval_every == 0:
            log("prune", i)

    train_steps(model, opt, data, args.prune_steps, tcfg.batch_size, tcfg.label_smoothing, lambda i: args.lr,
                prune_at, g)
    magnitude_prune(model, args.sparsity, args.scope)
    log("pruned", args.prune_steps)
    if args.rewind:
        rewind(model, dense)
        opt = build_optimizer(model, tcfg)
        log("rewound", args.prune_steps)

    def recover_lr(i: int) -> float:
        peak = args.lr if args.recover_lr is None else args.recover_lr
        return 0.5 * peak * (1 + math.cos(math.pi * i / args.recover_steps))

    def recover_log(i: int) -> None:
        if i and i % args.eval_every == 0:
            log("recover", args.prune_steps + i)

    smoothing = tcfg.label_smoothing if args.recover_smoothing is None else args.recover_smoothing
    train_steps(model, opt, data, args.recover_steps, tcfg.batch_size, smoothing, recover_lr,
                recover_log, g)
    make_permanent(model)
    final = evaluate(model, data)
    log("final", args.prune_steps + args.recover_steps)
    with tempfile.TemporaryDirectory() as d:
        mf.save(model, d)
        reloaded = mf.load(d)
        assert abs(sparsity_of(reloaded) - sparsity_of(model)) < 1e-9
        final_reloaded = evaluate(reloaded, data)["acc"]
    full = [r["sparsity"] for r in rows if r["acc"] >= base["acc"]]
    headline = {"final_sparsity": sparsity_of(model), "final_acc": final["acc"], "final_acc_reloaded": final_reloaded,
                "sparsity_full_acc": max(full, default=0.0), "base_acc": base["acc"]}
    n_val = sum(int((y != -100).sum()) for _, y in data.iter_eval("val", 4096))
    headline["wrong_pairs"] = round((1 - final["acc"]) * n_val)
    print(headline)
    write_result(args.name, headline, rows, torch.device("cpu"), args.out,
                 extra={"threads": 1, "run": str(args.run), "settings": vars(args), "val_pairs": n_val})
    return 0


if __name__ == "__main__":
    sys.exit(main())
