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

Routing is the paper's top-k (``gates.top_k``); ``gates.top_p`` or ``gates.threshold`` (at most one; null by
default) route each token to a varying number of experts instead (``compose/routing.py``), ``top_k`` then
only sets the k of joint gate training. ``prepare`` (base + experts) and ``routed_model`` are shared with
``modformer bench routing-budget``.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from modformer.compose import gates as G
from modformer.compose.common import accuracy, train_run, trainable, write_json
from modformer.compose.routing import check_threshold, check_top_k, check_top_p
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
    "gates": {"steps": 100, "lr": 1e-2, "top_k": 2, "top_p": None, "threshold": None, "temperature": 1.0,
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


def routing_of(g: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """(``ExpertLinear`` routing settings, row label) of the spec's ``gates`` section: top-k unless ``top_p`` or
    ``threshold`` is set. ValueError (one line, naming the key) for a bad value or both set."""
    check_top_k(g["top_k"], "gates.top_k")
    if g["top_k"] is None:
        raise ValueError("gates.top_k must be an integer >= 1, got None")
    top_p, tau = g.get("top_p"), g.get("threshold")
    if top_p is not None and tau is not None:
        raise ValueError(f"gates.top_p and gates.threshold are exclusive, got both ({top_p!r}, {tau!r})")
    if top_p is not None:
        return {"routing": "top_p", "top_p": check_top_p(top_p, "gates.top_p")}, f"top-p {top_p}"
    if tau is not None:
        return {"routing": "threshold", "threshold": check_threshold(tau, "gates.threshold")}, f"threshold {tau}"
    return {"routing": "top_k"}, f"top-{g['top_k']}"


@dataclasses.dataclass
class Prepared:
    """What every routed variant shares: the data, the trained base and the experts' deltas."""

    out: Path
    device: str
    seed: int
    tasks: list[str]
    per_task: list[Any]        # one dataset per expert's task
    mixture: Any               # the union of the tasks
    base: torch.nn.Module
    deltas: list[dict[str, Any]]
    train_cfg: Any             # the experts' (and gates') TrainConfig
    expert_seconds: float

    def routing_inputs(self, spec: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Held-out mixture inputs (B, T) and each row's expert index (B,)."""
        from modformer.data.compose_tasks import TASK_NAMES, task_of

        x_val, _ = self.mixture.get_batch("val", 0, torch.Generator())
        expert_of = torch.tensor([self.tasks.index(TASK_NAMES[int(i)])
                                  for i in task_of(x_val, spec["data"]["n_symbols"])])
        return x_val, expert_of


def prepare(spec: dict[str, Any]) -> Prepared:
    """Train (or reuse) the base on ``base_tasks`` and one expert per task of ``experts.tasks``."""
    from modformer.config import TrainConfig

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
    t0 = time.perf_counter()
    deltas = [_train_expert(base, d, e, tcfg, seed + j) for j, d in enumerate(per_task)]
    return Prepared(out, device, seed, tasks, per_task, mixture, base, deltas, tcfg, time.perf_counter() - t0)


def routed_model(spec: dict[str, Any], p: Prepared) -> torch.nn.Module:
    """The base with every expert attached (fresh gates), routed as ``gates`` says, on the run's device."""
    g = spec["gates"]
    routing, _ = routing_of(g)
    return G.attach_experts(p.base, p.deltas, int(g["top_k"]), "token", float(g["temperature"]), p.seed,
                            **routing).to(p.device)


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

    g = spec["gates"]
    _, label = routing_of(g)                       # a bad routing setting fails before anything trains
    for variant in g["variants"]:
        how, _, granularity = variant.partition("/")
        if how not in ("independent", "joint") or granularity not in ("token", "prefix"):
            raise ValueError(f"gates.variants: {variant!r} is not (independent|joint)/(token|prefix)")
    prep = prepare(spec)
    out, device, seed, tasks = prep.out, prep.device, prep.seed, prep.tasks
    per_task, mixture, base, e, tcfg = prep.per_task, prep.mixture, prep.base, spec["experts"], prep.train_cfg
    rows: list[dict[str, Any]] = []

    def row(method: str, acc: tuple[float, list[float]], **kw: Any) -> dict[str, Any]:
        rows.append({"method": method, "acc": acc[0], **{f"acc_{t}": a for t, a in zip(tasks, acc[1])}, **kw})
        write_json(out / "partial.json", {"rows": rows})  # incremental
        return rows[-1]

    model = routed_model(spec, prep)
    G.set_mode(model, "base")
    row("base alone", _mean_acc(model, per_task))
    oracle = row("oracle routing (own expert)", _mean_acc(model, per_task, set_expert=True),
                 expert_seconds=prep.expert_seconds)
    x_val, expert_of = prep.routing_inputs(spec)
    for variant in g["variants"]:
        how, granularity = variant.split("/")
        model = routed_model(spec, prep)
        G.set_mode(model, "route", granularity=granularity)
        t0 = time.perf_counter()
        G.train_gates(model, per_task, tcfg, int(g["steps"]), float(g["lr"]), joint=how == "joint",
                      mixture=mixture, seed=seed)
        G.set_mode(model, "route", granularity=granularity)
        seconds = time.perf_counter() - t0
        routing = G.routing_accuracy(model, x_val.to(device), expert_of)
        row(f"PHATGOOSE {variant} {label}", _mean_acc(model, per_task), gate_seconds=seconds,
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
