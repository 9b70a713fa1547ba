"""``modformer compose gates``: PHATGOOSE on task-tagged sequence transforms (``multitask``).

1. base: a run on ``base_tasks`` (default: copy), which teaches the format;
2. experts: one LoRA adapter (HF PEFT; or a full fine-tune of the target Linears, ``experts.kind: full``)
   per task of ``experts.tasks``, each on its task alone, the base frozen;
3. gates: for each variant of ``gates.variants`` (``independent`` | ``joint``) x (``token`` | ``prefix``),
   fresh gates are trained (``compose/gates.py``) and the routed model evaluated;
4. baselines: the oracle (each task with its own expert), the base alone, and a multitask LoRA (one
   adapter of rank E * r trained on the union for E times the expert steps: the same parameters and data).

Accuracy is the mean over tasks of the answer-token accuracy on each task's validation split; routing
accuracy is measured on the same held-out inputs, whose task (expert) is known. Writes ``gates.json``.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import torch

from modformer.compose import gates as G
from modformer.compose.common import accuracy, train_run, trainable, write_json
from modformer.compose.spec import resolve_device

DEFAULTS: dict[str, Any] = {
    "name": "gates",
    "out_dir": "runs/compose",
    "device": "auto",
    "seed": 0,
    "data": {"length": 6, "n_symbols": 10, "n_examples": 2000, "train_fraction": 0.9, "window": None, "seed": 0},
    # the base model: a RunConfig mapping (the data section is filled in)
    "base": {"model": {"n_layer": 2, "d_model": 128, "n_head": 4, "max_seq_len": 16},
             "train": {"steps": 600, "batch_size": 128, "lr": 2e-3, "weight_decay": 0.01, "warmup_steps": 20,
                       "eval_every": 100, "eval_batches": 1, "eval_batch_size": 1000, "progress": False,
                       "tensorboard": False}},
    "base_tasks": ["copy"],
    "experts": {"tasks": ["reverse", "sort", "increment", "cumsum"], "kind": "lora", "rank": 4,
                "targets": ["qkv", "out", "up", "down"], "steps": 400, "lr": 3e-3, "batch_size": 128},
    "gates": {"steps": 100, "lr": 1e-2, "top_k": 2, "temperature": 1.0,
              "variants": ["independent/token", "independent/prefix", "joint/token", "joint/prefix"]},
    "multitask": {"enabled": True, "lr": None},
    "retrain": False,
}


def _data(spec: dict[str, Any], tasks: list[str]) -> Any:
    from modformer.config import DataConfig
    from modformer.data import build_dataset

    return build_dataset(DataConfig(name="multitask", options={**spec["data"], "tasks": list(tasks)}))


def _train_expert(base: torch.nn.Module, data: Any, e: dict[str, Any], tcfg: Any, seed: int) -> dict[str, Any]:
    """Train one expert on ``data``; returns its deltas."""
    from modformer.compress import lora
    from modformer.compress.finetune import finetune

    torch.manual_seed(seed)
    if e["kind"] == "lora":
        pm = lora.add_lora(copy.deepcopy(base), r=int(e["rank"]), targets=e["targets"])
        finetune(pm, data, tcfg, int(e["steps"]), seed=seed)
        return G.lora_deltas(pm)
    if e["kind"] != "full":
        raise ValueError(f"experts.kind must be 'lora' or 'full', got {e['kind']!r}")
    model = copy.deepcopy(base)
    for name, p in model.named_parameters():
        p.requires_grad_(name.rsplit(".", 2)[-2] in e["targets"])
    finetune(model, data, tcfg, int(e["steps"]), seed=seed)
    return G.full_deltas(base, model, e["targets"])


def _mean_acc(model: torch.nn.Module, per_task: list[Any], set_expert: bool = False) -> tuple[float, list[float]]:
    accs = []
    for j, data in enumerate(per_task):
        if set_expert:
            G.set_mode(model, "expert", j)
        accs.append(accuracy(model, data))
    return sum(accs) / len(accs), accs


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """The whole experiment; returns (and writes ``out_dir/name/gates.json``) headline + rows."""
    from modformer.compress import lora
    from modformer.compress.finetune import finetune
    from modformer.config import TrainConfig
    from modformer.data.compose_tasks import TASK_NAMES, task_of

    out = Path(spec["out_dir"]) / spec["name"]
    out.mkdir(parents=True, exist_ok=True)
    device, seed = resolve_device(spec["device"]), int(spec["seed"])
    tasks = list(spec["experts"]["tasks"])
    per_task = [_data(spec, [t]) for t in tasks]
    mixture = _data(spec, tasks)
    base_opts = {**spec["data"], "tasks": list(spec["base_tasks"]), "window": None}   # the base sees every digit
    base = train_run(spec["base"], "base", out, "multitask", base_opts, device, spec["retrain"])
    e = spec["experts"]
    tcfg = TrainConfig(batch_size=int(e["batch_size"]), lr=float(e["lr"]), weight_decay=0.0, grad_clip=1.0)
    rows: list[dict[str, Any]] = []

    def row(method: str, acc: tuple[float, list[float]], **kw: Any) -> dict[str, Any]:
        rows.append({"method": method, "acc": acc[0], **{f"acc_{t}": a for t, a in zip(tasks, acc[1])}, **kw})
        write_json(out / "partial.json", {"rows": rows})  # incremental
        return rows[-1]

    t0 = time.perf_counter()
    deltas = [_train_expert(base, d, e, tcfg, seed + j) for j, d in enumerate(per_task)]
    expert_seconds = time.perf_counter() - t0
    g = spec["gates"]

    def routed() -> torch.nn.Module:
        return G.attach_experts(base, deltas, int(g["top_k"]), "token", float(g["temperature"]), seed).to(device)

    model = routed()
    G.set_mode(model, "base")
    row("base alone", _mean_acc(model, per_task))
    oracle = row("oracle routing (own expert)", _mean_acc(model, per_task, set_expert=True),
                 expert_seconds=expert_seconds)
    x_val, _ = mixture.get_batch("val", 0, torch.Generator())
    expert_of = torch.tensor([tasks.index(TASK_NAMES[int(i)]) for i in task_of(x_val, spec["data"]["n_symbols"])])
    for variant in g["variants"]:
        how, granularity = variant.split("/")
        if how not in ("independent", "joint") or granularity not in ("token", "prefix"):
            raise ValueError(f"gates.variants: {variant!r} is not (independent|joint)/(token|prefix)")
        model = routed()
        G.set_mode(model, "route", granularity=granularity)
        t0 = time.perf_counter()
        G.train_gates(model, per_task, tcfg, int(g["steps"]), float(g["lr"]), joint=how == "joint",
                      mixture=mixture, seed=seed)
        G.set_mode(model, "route", granularity=granularity)
        seconds = time.perf_counter() - t0
        routing = G.routing_accuracy(model, x_val.to(device), expert_of)
        row(f"PHATGOOSE {variant} top-{g['top_k']}", _mean_acc(model, per_task), gate_seconds=seconds,
            gate_params=sum(p.numel() for p in G.gate_parameters(model)), **routing)
    if spec["multitask"]["enabled"]:
        t0 = time.perf_counter()
        torch.manual_seed(seed)
        rank = int(e["rank"]) * len(tasks)
        pm = lora.add_lora(copy.deepcopy(base), r=rank, targets=e["targets"]) if e["kind"] == "lora" else None
        if pm is None:                       # full experts: one multitask fine-tune of the same Linears
            pm = copy.deepcopy(base)
            for name, p in pm.named_parameters():
                p.requires_grad_(name.rsplit(".", 2)[-2] in e["targets"])
        n = trainable(pm)
        lr = spec["multitask"]["lr"] or e["lr"]
        finetune(pm, mixture, TrainConfig(batch_size=tcfg.batch_size, lr=float(lr), weight_decay=0.0, grad_clip=1.0),
                 int(e["steps"]) * len(tasks), seed=seed)
        row(f"multitask {'LoRA r=' + str(rank) if e['kind'] == 'lora' else 'fine-tune'}", _mean_acc(pm, per_task),
            trainable_params=n, seconds=time.perf_counter() - t0)
    routed_rows = [r for r in rows if r["method"].startswith("PHATGOOSE")]
    first = routed_rows[0] if routed_rows else None
    best = max(routed_rows, key=lambda r: r["acc"]) if routed_rows else None
    multi = next((r["acc"] for r in rows if r["method"].startswith("multitask")), None)
    headline = {"routed_acc": first["acc"] if first else None, "oracle_acc": oracle["acc"],
                "relative_to_oracle": first["acc"] / oracle["acc"] if first and oracle["acc"] else None,
                "multitask_acc": multi, "routed_variant": first["method"] if first else None,
                "routing_top1": first.get("routing_top1") if first else None,
                "best_routed_acc": best["acc"] if best else None, "best_variant": best["method"] if best else None,
                "best_relative_to_oracle": best["acc"] / oracle["acc"] if best and oracle["acc"] else None}
    result = {"headline": headline, "rows": rows, "spec": spec}
    write_json(out / "gates.json", result)
    return result
