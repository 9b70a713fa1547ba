"""Circuits of LoRA adapters (issue 28, study 2): where an adapter's weight delta concentrates, and whether the
components it changes most explain the new behaviour on their own (ablation).

Two adapters, each on a model with a known circuit:

- **grokking**: the grokked modular-addition model (configs/grokking.yaml, trained here for ``--grok-steps`` or
  ``--grok-run``) gets a LoRA adapter (rank ``--rank`` on qkv, out, up, down) for subtraction a - b (mod 113).
- **induction**: the 2-layer attention-only induction model (``interp.toy_induction``, trained here, or
  ``--induction-run`` such as configs/induction_2l.yaml) gets an adapter on qkv and out for a *skip copy*: on a
  repeated span predict the token two after the earlier copy of the current token, not the next one. The expected
  circuit: the layer-0 previous-token head attends two back instead of one (its QK), so the induction head's keys
  match one token later. The adapter also gets the learned position table (``wpe``, PEFT's Embedding LoRA) when the
  model has one: on the toy model (shortformer positions) an adapter on qkv and out alone stayed at 0.07-0.08
  accuracy after 600-800 steps (rank 4 and 8, lr 5e-3 and 2e-2), with ``wpe`` it reached 0.51 in 200 steps.

For each: accuracy of the new behaviour (and the old) with the base, the adapter, the adapter's components ranked by
weight-delta size (``interp.adapter_circuits``: per head QK and OV, per MLP), each removed alone, only the top k kept
and the top k removed; per-head bilinear deltas (``interp.deltas``); for the induction model the layer-0 heads'
attention to one and two tokens back before and after. Writes OUT/circuits_lora.json.

    modformer bench circuits-lora                      # CPU, 5-25 min on 2 shared cores (by load)
    modformer bench circuits-lora --grok-steps 200 --induction-steps 300 --lora-steps 50 \
        --induction-lora-steps 20                     # smoke test
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import tempfile
import time
from typing import Any

import torch

from modformer.bench.common import DEFAULT_OUT, print_table, write_result
from modformer.cli import HelpFormatter
from modformer.compress import evaluate, finetune, lora
from modformer.config import DataConfig, TrainConfig
from modformer.interp import heads
from modformer.interp.adapter_circuits import ablation_study
from modformer.interp.deltas import head_deltas
from modformer.interp.toy_induction import RepeatedSpans, induction_model


def head_delta_rows(base: torch.nn.Module, tuned: torch.nn.Module) -> list[dict[str, Any]]:
    """Per head: relative change of its QK and OV bilinear forms (``interp.deltas.head_deltas``)."""
    d = head_deltas(base, tuned)
    L, H = d["qk"].shape
    return [{"name": f"L{i}H{h}", "qk": round(float(d["qk"][i, h]), 4), "ov": round(float(d["ov"][i, h]), 4)}
            for i in range(L) for h in range(H)]


def train_adapter(base: torch.nn.Module, data: Any, targets: tuple[str, ...], rank: int, steps: int, lr: float,
                  batch_size: int, train_cfg: TrainConfig) -> tuple[torch.nn.Module, float]:
    """A LoRA adapter on a copy of ``base`` trained for ``steps``; returns the merged model and the seconds."""
    t0 = time.perf_counter()
    pm = lora.add_lora(copy.deepcopy(base), r=rank, alpha=2.0 * rank, targets=targets)
    finetune(pm, data, dataclasses.replace(train_cfg, weight_decay=0.0, label_smoothing=0.0), steps, lr=lr,
             batch_size=batch_size)
    return lora.merged_model(pm).eval(), time.perf_counter() - t0


def grokking_part(args: argparse.Namespace, tmp: str) -> dict[str, Any]:
    from modformer.bench.studies.prune import grokked_run
    from modformer.data import build_dataset
    from modformer.runs import run_config, run_model

    run = args.grok_run or grokked_run(tmp, args.grok_steps)
    rc = run_config(run)
    base = run_model(run).eval()
    add = build_dataset(rc.data)
    sub = build_dataset(DataConfig(name="modular", options={**rc.data.options, "op": "-"}))
    tuned, seconds = train_adapter(base, sub, ("qkv", "out", "up", "down"), args.rank, args.lora_steps,
                                   args.lora_lr, rc.train.batch_size, rc.train)
    study = ablation_study(base, tuned, lambda m: evaluate(m, sub)["acc"], ks=tuple(args.ks))
    return {"task": "modular subtraction a - b (mod p) from the addition model", "run": str(run),
            "targets": ["qkv", "out", "up", "down"], "rank": args.rank, "steps": args.lora_steps,
            "adapter_seconds": round(seconds, 1), "old_task_acc": {"base": evaluate(base, add)["acc"],
                                                                   "adapter": evaluate(tuned, add)["acc"]},
            "head_deltas": head_delta_rows(base, tuned), **study}


def accuracy(model: torch.nn.Module, batches: list) -> float:
    """Argmax accuracy over the target tokens of ``batches``."""
    correct = n = 0
    with torch.no_grad():
        for x, y in batches:
            keep = y != -100
            correct += int(((model(x).argmax(-1) == y) & keep).sum())
            n += int(keep.sum())
    return correct / max(n, 1)


def offsets(model: torch.nn.Module, length: int) -> dict[str, list[float]]:
    """Layer-0 heads' mean attention to 1 and 2 tokens back on repeated random tokens."""
    idx = heads.repeated_random_tokens(model.cfg.vocab_size, length, 16, seed=3)
    pats = heads.stack_patterns(heads.attention_patterns(model, idx), model.cfg.n_layer)
    return {f"back_{k}": [round(float(v), 4) for v in heads.offset_attention(pats, k)[0]] for k in (1, 2)}


def induction_part(args: argparse.Namespace) -> dict[str, Any]:
    base, data, info = induction_model(args.induction_run, args.induction_steps, args.seed,
                                       save_to=args.save_induction)
    skip = RepeatedSpans(data.vocab_size, data.seq_len, data.min_span, data.max_span, shift=2, seed=args.seed)
    val_skip = list(skip.iter_eval("val", 64, 4))
    val_next = list(data.iter_eval("val", 64, 4))
    targets = ("qkv", "out", "wpe") if getattr(base.position, "wpe", None) is not None else ("qkv", "out")
    tuned, seconds = train_adapter(base, skip, targets, args.rank, args.induction_lora_steps,
                                   args.induction_lora_lr,
                                   64, TrainConfig(lr=args.induction_lora_lr, batch_size=64, weight_decay=0.0))
    study = ablation_study(base, tuned, lambda m: accuracy(m, val_skip), ks=tuple(args.ks))
    probe = min(16, data.seq_len // 2)
    s = heads.head_scores(base, length=probe)
    return {"task": "skip copy: on a repeated span predict the token two after the earlier copy", "model": info,
            "targets": list(targets), "rank": args.rank, "steps": args.induction_lora_steps,
            "adapter_seconds": round(seconds, 1),
            "base_heads": {"prev_token_L0": [round(float(v), 4) for v in s["prev_token"][0]],
                           "induction_L1": [round(float(v), 4) for v in s["induction"][1]]},
            "layer0_offsets": {"base": offsets(base, probe), "adapter": offsets(tuned, probe)},
            "old_task_acc": {"base": accuracy(base, val_next), "adapter": accuracy(tuned, val_next)},
            "head_deltas": head_delta_rows(base, tuned), **study}


def summary_rows(name: str, part: dict[str, Any]) -> list[dict[str, Any]]:
    rows = [{"model": name, "what": "base", "new_task_acc": part["base"]},
            {"model": name, "what": "full adapter", "new_task_acc": part["full"]}]
    rows += [{"model": name, "what": f"only top {t['k']}: {', '.join(t['kept'])}", "new_task_acc": t["only_top_k"],
              "without_them": t["without_top_k"]} for t in part["top_k"]]
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="modformer bench circuits-lora", description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter,
                                epilog="examples:\n  modformer bench circuits-lora --parts grokking")
    p.add_argument("--grok-run", default=None, help="a trained grokking run (default: train configs/grokking.yaml)")
    p.add_argument("--grok-steps", type=int, default=1000, help="training steps of the grokking model made here")
    p.add_argument("--induction-run", default=None,
                   help="a trained 2-layer induction run or saved model folder (default: train the toy model)")
    p.add_argument("--save-induction", default=None, help="save the toy induction model here (mf.save folder)")
    p.add_argument("--induction-steps", type=int, default=2500, help="training steps of the toy induction model")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank")
    p.add_argument("--lora-steps", type=int, default=1000, help="adapter steps on the grokking model")
    p.add_argument("--induction-lora-steps", type=int, default=600, help="adapter steps on the induction model")
    p.add_argument("--lora-lr", type=float, default=1e-2, help="adapter lr on the grokking model")
    p.add_argument("--induction-lora-lr", type=float, default=5e-3, help="adapter lr on the induction model")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8], help="top-k sizes to keep / remove")
    p.add_argument("--parts", nargs="+", default=["grokking", "induction"], choices=["grokking", "induction"],
                   help="which models to adapt")
    p.add_argument("--seed", type=int, default=0, help="seed")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (1: fastest for these tiny models)")
    p.add_argument("--out", default=DEFAULT_OUT, help="result folder (benchmarks/results: the committed answer)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if "grokking" in args.parts:
            result["grokking"] = grokking_part(args, tmp)
            print_table(summary_rows("grokking", result["grokking"]))
        if "induction" in args.parts:
            result["induction"] = induction_part(args)
            print_table(summary_rows("induction", result["induction"]))
    headline = {}
    for name, part in result.items():
        comps = part["components"]
        headline[name] = {"new_task_acc_base": part["base"], "new_task_acc_adapter": part["full"],
                          "largest_components": [c["name"] for c in comps[:3]],
                          "minimal_top_k_for_90pct": part["minimal_k"], "n_components": part["n_components"],
                          "acc_without_top_component": comps[0]["without"] if comps else None}
    rows = [r for name, part in result.items() for r in summary_rows(name, part)]
    path = write_result("circuits_lora", headline, rows, "cpu", args.out, extra=result)
    print(headline)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
