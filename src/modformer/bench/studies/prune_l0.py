"""L0 / hard-concrete head gates (Voita et al. 2019) on the grokked modular-addition model (CPU).

For each penalty weight lambda: train one gate per head with the model frozen (and, with --joint,
jointly), count the closed gates, remove those heads physically (``prune_closed_heads``, open gates
folded into the out-projection) and measure validation accuracy of the gated and the pruned model
(they must agree), before and after an optional short fine-tune. Also one-shot accuracy when the
lowest-ranked heads by ``log_alpha`` are removed at fixed fractions, next to the gradient and
ablation rankings. Writes OUT/prune_l0.json.

    modformer bench prune-l0 --run RUN_DIR [--lambdas 0.2 1 2 5] [--steps 300]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time

import torch

from modformer.bench.common import DEFAULT_OUT, cases, print_table, write_result
from modformer.cli import HelpFormatter
from modformer.compress import count_params, evaluate, finetune, masked, prune_structured
from modformer.compress.finetune import batches
from modformer.compress.l0 import prune_closed_heads, train_head_gates


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="modformer bench prune-l0", description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter,
                                epilog="examples:\n  modformer bench prune-l0 --run runs/grokking --joint")
    p.add_argument("--run", required=True, help="the grokked run (modformer bench prune trains one)")
    p.add_argument("--lambdas", type=float, nargs="+", default=[0.2, 1.0, 2.0, 5.0], help="L0 penalty weights swept")
    p.add_argument("--rank-lambda", type=float, default=1.0, help="lambda of the gates used as a ranking")
    p.add_argument("--steps", type=int, default=300, help="gate training steps")
    p.add_argument("--lr", type=float, default=0.05, help="gate learning rate")
    p.add_argument("--joint", action="store_true", help="train the model with the gates")
    p.add_argument("--model-lr", type=float, default=1e-3, help="--joint: Adam lr of the model")
    p.add_argument("--no-ranking", action="store_true", help="skip the fixed-fraction ranking comparison")
    p.add_argument("--name", default="prune_l0", help="OUT/NAME.json")
    p.add_argument("--ft-steps", type=int, default=100, help="fine-tuning steps after closing gates")
    p.add_argument("--ft-lr", type=float, default=3e-3, help="fine-tuning learning rate")
    p.add_argument("--out", default=DEFAULT_OUT, help="result folder (benchmarks/results: the committed answer)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from modformer.runs import run_config, run_dataset, run_model

    data, tcfg = run_dataset(args.run), run_config(args.run).train
    model = run_model(args.run).eval()
    n0, base = count_params(model), evaluate(model, data)
    score = batches(data, "train", 512, 8)
    rows: list[dict] = []
    for lam in cases(args.lambdas, "prune-l0", lambda lam: f"next: lambda {lam:g}"):
        t0 = time.perf_counter()
        m = run_model(args.run).eval()
        gates, log = train_head_gates(m, score, steps=args.steps, lam=lam, lr=args.lr, joint=args.joint,
                                      model_lr=args.model_lr)
        with torch.no_grad(), masked(m, heads=gates.deterministic()):
            gated = evaluate(m, data)
        small = prune_closed_heads(m, gates)
        pruned = evaluate(small, data)
        finetune(small, data, tcfg, args.ft_steps, lr=args.ft_lr)
        rows.append({"method": "l0_closed", "lambda": lam, "joint": args.joint,
                     "heads_kept": [b.attn.n_head for b in small.blocks],
                     "closed": sum(len(v) for v in gates.closed().values()),
                     "gates": [[round(float(z), 3) for z in zs.detach()] for zs in gates.deterministic()],
                     "gated_acc": gated["acc"], "pruned_acc": pruned["acc"],
                     "acc_after_finetune": evaluate(small, data)["acc"], "params": count_params(small),
                     "param_reduction": 1 - count_params(small) / n0, "log": log,
                     "seconds": time.perf_counter() - t0})
        print_table([{k: v for k, v in rows[-1].items() if k not in ("log", "gates")}])
    model = run_model(args.run).eval()
    ranking = itertools.product(() if args.no_ranking else ("l0", "gradient", "ablation"), (0.125, 0.25, 0.375, 0.5))
    for imp, a in cases(list(ranking), "prune-l0 ranking", lambda c: f"next: {c[0]} ranking, {c[1]:g} of heads"):
        opts = {"steps": args.steps, "lam": args.rank_lambda, "lr": args.lr} if imp == "l0" else None
        m, info = prune_structured(run_model(args.run).eval() if imp == "l0" else model, "heads", a, score, imp,
                                   opts)
        rows.append({"method": f"heads_{imp}_oneshot", "fraction_removed": a, **evaluate(m, data),
                     "removed": info["removed"]})
        print_table([{k: v for k, v in rows[-1].items() if k != "removed"}])
    best = [r for r in rows if r["method"] == "l0_closed"]
    headline = {"base_acc": base["acc"],
                "max_gated_vs_pruned_acc_diff": max(abs(r["gated_acc"] - r["pruned_acc"]) for r in best),
                **{f"lambda_{r['lambda']:g}_closed_heads": r["closed"] for r in best},
                **{f"lambda_{r['lambda']:g}_pruned_acc": r["pruned_acc"] for r in best}}
    print(headline)
    write_result(args.name, headline, rows, torch.device("cpu"), args.out,
                 extra={"threads": 1, "run": str(args.run), "settings": vars(args), "base_params": n0})
    return 0


if __name__ == "__main__":
    sys.exit(main())
