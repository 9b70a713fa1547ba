"""LoRA benchmark (CPU): modular subtraction from the grokked modular-addition model, via HF PEFT.

Full fine-tuning (every parameter, the grokking recipe's optimizer) vs LoRA adapters of several
ranks / target sets, the same number of steps and batches; validation accuracy on a - b (mod 113)
(30% of pairs for training, as the addition model). Also checks merged == unmerged outputs and the
save / load / switch round trip (subtraction adapter on, off = addition again).
Writes OUT/lora.json.

    modformer bench lora [--run RUN_DIR] [--steps 500]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

from modformer.bench.common import DEFAULT_OUT, cases, print_table, write_result
from modformer.cli import HelpFormatter
from modformer.compress import count_params, evaluate, finetune, lora
from modformer.config import DataConfig
from modformer.data import build_dataset

CONFIGS = {   # name -> (rank, targets)
    "r1_qkv_out_up_down": (1, ("qkv", "out", "up", "down")),
    "r2_up_down": (2, ("up", "down")),
    "r2_qkv_out": (2, ("qkv", "out")),
    "r3_qkv": (3, ("qkv",)),
    "r4_qkv_out_up_down": (4, ("qkv", "out", "up", "down")),
    # <= 1% of the 425,088 parameters, adapters on one layer (dotted names) and/or the (un)embedding
    "r8_qkv_l0": (8, ("blocks.0.attn.qkv",)),
    "r4_qkv_out_l0": (4, ("blocks.0.attn.qkv", "blocks.0.attn.out")),
    "r5_qkv_out_l0": (5, ("blocks.0.attn.qkv", "blocks.0.attn.out")),
    "r2_qkv_out_up_down_l0": (2, ("blocks.0.attn.qkv", "blocks.0.attn.out", "blocks.0.mlp.up", "blocks.0.mlp.down")),
    "r3_up_down_l0": (3, ("blocks.0.mlp.up", "blocks.0.mlp.down")),
    "r3_qkv_out_l0_emb_head": (3, ("blocks.0.attn.qkv", "blocks.0.attn.out", "tok_emb", "lm_head")),
    "r2_up_down_l1": (2, ("blocks.1.mlp.up", "blocks.1.mlp.down")),
}


def train_curve(model: torch.nn.Module, data: object, tcfg: object, steps: int, lr: float, every: int) -> list:
    curve = []
    for done in range(every, steps + every, every):
        finetune(model, data, tcfg, every, lr=lr, seed=done)
        curve.append((done, evaluate(model, data)["acc"]))
    return curve


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="modformer bench lora", description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter,
                                epilog=("examples:\n"
                                        "  modformer bench lora --run runs/grokking --configs r3_qkv"))
    p.add_argument("--run", default=None, help="a trained grokking run (default: train one, as modformer bench prune)")
    p.add_argument("--steps", type=int, default=500, help="fine-tuning steps of every run")
    p.add_argument("--every", type=int, default=100, help="steps between evaluations")
    p.add_argument("--lr", type=float, default=3e-3, help="full fine-tuning lr")
    p.add_argument("--lora-lr", type=float, default=1e-2, help="adapter learning rate")
    p.add_argument("--lora-wd", type=float, default=0.0, help="adapter weight decay")
    p.add_argument("--alpha-scale", type=float, default=2.0, help="LoRA alpha = this * rank")
    p.add_argument("--name", default="lora", help="OUT/NAME.json")
    p.add_argument("--configs", nargs="+", default=["r1_qkv_out_up_down", "r2_qkv_out", "r3_qkv",
                                                     "r4_qkv_out_up_down"], choices=list(CONFIGS),
                   help="LoRA configurations (rank and target modules)")
    p.add_argument("--out", default=DEFAULT_OUT, help="result folder (benchmarks/results: the committed answer)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    import dataclasses

    from modformer.runs import run_config, run_model

    tmp = tempfile.TemporaryDirectory()
    if args.run is None:
        from modformer.bench.studies.prune import grokked_run

        args.run = grokked_run(tmp.name, 1000)
    rc = run_config(args.run)
    base = run_model(args.run).eval()
    add = build_dataset(rc.data)
    sub = build_dataset(DataConfig(name="modular", options={**rc.data.options, "op": "-"}))
    n_base = count_params(base)
    rows = []
    r0 = {"method": "base (addition model)", "sub_acc": evaluate(base, sub)["acc"],
          "add_acc": evaluate(base, add)["acc"], "trainable": 0, "trainable_fraction": 0.0}
    rows.append(r0)

    t0 = time.perf_counter()
    full = copy.deepcopy(base)
    curve = train_curve(full, sub, rc.train, args.steps, args.lr, args.every)
    rows.append({"method": "full fine-tune", "sub_acc": curve[-1][1], "add_acc": evaluate(full, add)["acc"],
                 "trainable": n_base, "trainable_fraction": 1.0, "curve": curve,
                 "seconds": time.perf_counter() - t0})
    print_table([{k: v for k, v in rows[-1].items() if k != "curve"}])
    lora_cfg = dataclasses.replace(rc.train, weight_decay=args.lora_wd)
    adapters = {}
    for name in cases(args.configs, "lora", lambda n: f"next: LoRA {n}"):
        r, targets = CONFIGS[name]
        t0 = time.perf_counter()
        pm = lora.add_lora(copy.deepcopy(base), r=r, alpha=args.alpha_scale * r, targets=targets,
                           adapter_name=name.replace("_", "-"))
        trainable, _, _ = lora.trainable_fraction(pm)
        curve = train_curve(pm, sub, lora_cfg, args.steps, args.lora_lr, args.every)
        with torch.no_grad(), pm.disable_adapter():
            add_off = evaluate(pm, add)["acc"]
        rows.append({"method": f"LoRA {name}", "rank": r, "targets": list(targets), "sub_acc": curve[-1][1],
                     "add_acc_adapter_off": add_off, "trainable": trainable,
                     "trainable_fraction": trainable / n_base, "curve": curve, "seconds": time.perf_counter() - t0})
        print_table([{k: v for k, v in rows[-1].items() if k != "curve"}])
        adapters[name] = pm

    # round trip: save each adapter, load them all into one fresh base, switch, merge
    checks = {}
    with tempfile.TemporaryDirectory() as d:
        paths = {}
        x, _ = next(iter(sub.iter_eval("val", 512, 1)))
        expected = {}
        for name, pm in adapters.items():
            paths[pm.active_adapter] = lora.save_adapter(pm, Path(d) / name)
            with torch.no_grad():
                expected[pm.active_adapter] = pm(x)
        both = lora.load_adapters(copy.deepcopy(base), paths)
        diffs = []
        for adapter, out in expected.items():
            both.set_adapter(adapter)
            with torch.no_grad():
                diffs.append(float((both(x) - out).abs().max()))
                unmerged = both(x)
                both.merge_adapter()
                merged = both(x)
                both.unmerge_adapter()
            checks.setdefault("merged_vs_unmerged_max_abs", []).append(float((merged - unmerged).abs().max()))
        checks["loaded_vs_trained_max_abs"] = diffs
        checks["adapter_file_bytes"] = {n: (p / "adapter_model.safetensors").stat().st_size for n, p in paths.items()}
    print(checks)

    full_acc = rows[1]["sub_acc"]
    small = [r for r in rows[2:] if r["trainable_fraction"] <= 0.01]
    best = max(small, key=lambda r: r["sub_acc"]) if small else max(rows[2:], key=lambda r: r["sub_acc"])
    headline = {"trainable_fraction": best["trainable_fraction"],
                "relative_to_full_finetune": best["sub_acc"] / full_acc,
                "lora_acc": best["sub_acc"], "full_finetune_acc": full_acc, "lora_config": best["method"],
                "steps": args.steps}
    print_table([{k: v for k, v in r.items() if k not in ("curve", "targets")} for r in rows])
    print(headline)
    write_result(args.name, headline, rows, torch.device("cpu"), args.out,
                 extra={"checks": checks, "threads": 1, "base_params": n_base, "full_lr": args.lr,
                        "lora_lr": args.lora_lr, "lora_weight_decay": args.lora_wd, "alpha_scale": args.alpha_scale,
                        "full_weight_decay": rc.train.weight_decay})
    return 0


if __name__ == "__main__":
    sys.exit(main())
