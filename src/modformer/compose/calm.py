"""``modformer compose calm``: the CALM key-value arithmetic experiment (Bansal et al. 2024, section 4.1).

1. anchor: a run on ``kv_anchor`` (arithmetic over numbers, no keys);
2. augmenting: a run on ``kv_aug`` (key -> value memory for every key, no arithmetic);
3. CALM (``models/composed.py``): both frozen, bridges trained on ``kv_arith`` over the training keys;
4. baselines on the same data and steps: the anchor fully fine-tuned, and LoRA on the anchor with
   (about) the bridges' parameter count;

all evaluated on arithmetic over held-out keys (``kv_arith`` val); writes ``calm.json``.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from modformer.compose.common import accuracy, train_run, trainable, write_json
from modformer.compose.spec import resolve_device
from modformer.utils import atomic_write

_SMALL = {"n_layer": 2, "d_model": 128, "n_head": 4, "d_ff": 512, "max_seq_len": 8, "attn_backend": "eager"}
DEFAULTS: dict[str, Any] = {
    "name": "calm",
    "out_dir": "runs/compose",
    "device": "auto",
    "seed": 0,
    "data": {"p": 53, "n_keys": 300, "key_len": 3, "n_letters": 8, "train_keys": 0.5, "n_examples": 20000,
             "n_val": 2000, "aug_examples": 20000, "modular": False, "seed": 0},
    # anchor / augmenting: RunConfig mappings (the data section is filled in)
    "anchor": {"model": dict(_SMALL),
               "train": {"steps": 2000, "batch_size": 256, "lr": 3e-3, "weight_decay": 0.1, "schedule": "constant",
                         "warmup_steps": 50, "eval_every": 100, "eval_batch_size": 2048, "eval_batches": 1,
                         "early_stop_metric": "val/acc", "early_stop_target": 0.99, "progress": False,
                         "tensorboard": False}},
    "augmenting": {"model": dict(_SMALL),
                   "train": {"steps": 2000, "batch_size": 256, "lr": 3e-3, "weight_decay": 0.1,
                             "schedule": "constant", "warmup_steps": 20, "eval_every": 100, "eval_batches": 2,
                             "eval_batch_size": 1024, "early_stop_metric": "val/acc", "early_stop_target": 0.995,
                             "progress": False, "tensorboard": False}},
    # optimizer: adamw | sgd (momentum = SGD's Nesterov momentum); weight_decay on the bridges; readout: states
    # (the paper) | vocab (also the augmenting model's next-token distribution as an anchor soft token, see CALM)
    "calm": {"every": 2, "connections": None, "n_head": 4, "steps": 600, "lr": 3e-3, "batch_size": 256,
             "optimizer": "adamw", "momentum": 0.9, "weight_decay": 0.0, "readout": "states"},
    "baselines": {"finetune": True, "lora": True, "finetune_lr": 1e-3, "lora_lr": 3e-3,
                  "lora_targets": ["qkv", "out", "up", "down"]},
    # base: null, or a RunConfig mapping (model defaults to the anchor's) trained on ``kv_mix`` first; the anchor
    # and the augmenting model are then fine-tuned from it (``train.init_from``), as CALM's PaLM2 models share
    # their pre-training. Both must then have the base's model shape.
    "base": None,
    "retrain": False,
}


def _datasets(d: dict[str, Any]) -> tuple[Any, Any, Any, dict[str, Any]]:
    from modformer.config import DataConfig
    from modformer.data import build_dataset

    common = {k: d[k] for k in ("p", "n_keys", "key_len", "n_letters", "modular", "seed")}
    aug_opts = {**common, "n_examples": d["aug_examples"]}
    arith = build_dataset(DataConfig(name="kv_arith", options={**common, "train_keys": d["train_keys"],
                                                                 "n_examples": d["n_examples"], "n_val": d["n_val"]}))
    return (build_dataset(DataConfig(name="kv_anchor", options=common)),
            build_dataset(DataConfig(name="kv_aug", options=aug_opts)), arith, {"common": common, "aug": aug_opts})


def _from_shared_base(spec: dict[str, Any], out: Path, opts: dict[str, Any], device: str,
                      ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train the shared base on ``kv_mix``; return the anchor and augmenting runs set to start from it."""
    from modformer.registry import ConfigError

    base = copy.deepcopy(spec["base"])
    base.setdefault("model", copy.deepcopy(spec["anchor"]["model"]))
    for name in ("anchor", "augmenting"):
        if spec[name].get("model") != base["model"]:
            raise ConfigError(f"calm base: {name}.model must equal base.model to start from the base's weights")
    train_run(base, "base", out, "kv_mix", opts["aug"], device, spec["retrain"])
    runs = []
    for name in ("anchor", "augmenting"):
        r = copy.deepcopy(spec[name])
        r.setdefault("train", {})["init_from"] = str(out / "runs" / "base")
        runs.append(r)
    return runs[0], runs[1]


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """The whole experiment; returns (and writes ``out_dir/name/calm.json``) headline + rows."""
    from modformer.compress import lora
    from modformer.compress.finetune import finetune
    from modformer.config import TrainConfig
    from modformer.models.composed import CALM

    out = Path(spec["out_dir"]) / spec["name"]
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(spec["device"])
    torch.manual_seed(spec["seed"])
    anchor_data, aug_data, arith, opts = _datasets(spec["data"])
    t0 = time.perf_counter()
    anchor_run, aug_run = spec["anchor"], spec["augmenting"]
    if spec["base"]:
        anchor_run, aug_run = _from_shared_base(spec, out, opts, device)
    anchor = train_run(anchor_run, "anchor", out, "kv_anchor", opts["common"], device, spec["retrain"])
    augmenting = train_run(aug_run, "augmenting", out, "kv_aug", opts["aug"], device, spec["retrain"])
    rows: list[dict[str, Any]] = []

    def row(method: str, model: torch.nn.Module, n_train: int, seconds: float, **kw: Any) -> dict[str, Any]:
        r = {"method": method, "heldout_key_acc": accuracy(model, arith, "val"),
             "train_key_acc": accuracy(model, arith, "train"), "trainable_params": n_train, "seconds": seconds, **kw}
        rows.append(r)
        write_json(out / "partial.json", {"rows": rows})  # incremental
        return r

    row("anchor alone", anchor, 0, time.perf_counter() - t0, own_task_acc=accuracy(anchor, anchor_data))
    row("augmenting alone", augmenting, 0, 0.0, own_task_acc=accuracy(augmenting, aug_data))
    c = spec["calm"]
    tcfg = TrainConfig(batch_size=int(c["batch_size"]), lr=float(c["lr"]), weight_decay=0.0, grad_clip=1.0)
    bridge_cfg = dataclasses.replace(tcfg, optimizer=str(c["optimizer"]), weight_decay=float(c["weight_decay"]),
                                     betas=(float(c["momentum"]), tcfg.betas[1]))
    t0 = time.perf_counter()
    calm = CALM(anchor, augmenting, c["connections"], int(c["every"]), int(c["n_head"]),
                readout=str(c["readout"])).to(device)
    torch.manual_seed(spec["seed"])
    losses = finetune(calm, arith, bridge_cfg, int(c["steps"]), seed=spec["seed"])
    n_calm = trainable(calm)
    row("CALM (anchor + augmenting)", calm, n_calm, time.perf_counter() - t0, connections=calm.connections,
        final_train_loss=losses[-1] if losses else None)
    bridges = {k: v.detach().contiguous().cpu() for k, v in calm.bridges.state_dict().items()}
    atomic_write(out / "bridges.safetensors", lambda tmp: save_file(bridges, tmp))
    b = spec["baselines"]
    if b["finetune"]:
        t0 = time.perf_counter()
        ft = copy.deepcopy(anchor).train()
        for p in ft.parameters():
            p.requires_grad_(True)
        finetune(ft, arith, dataclasses.replace(tcfg, lr=float(b["finetune_lr"])), int(c["steps"]), seed=spec["seed"])
        row("anchor fine-tuned", ft, trainable(ft), time.perf_counter() - t0)
    if b["lora"]:
        t0 = time.perf_counter()
        per_rank = trainable(lora.add_lora(copy.deepcopy(anchor), r=1, targets=b["lora_targets"]))
        rank = max(1, round(n_calm / per_rank))
        pm = lora.add_lora(copy.deepcopy(anchor), r=rank, targets=b["lora_targets"])
        finetune(pm, arith, dataclasses.replace(tcfg, lr=float(b["lora_lr"])), int(c["steps"]), seed=spec["seed"])
        row(f"anchor + LoRA r={rank}", pm, trainable(pm), time.perf_counter() - t0, rank=rank)
    def acc_of(pred: Any) -> float | None:
        return next((r["heldout_key_acc"] for r in rows if pred(r["method"])), None)

    headline = {"composed_acc": acc_of(lambda m: m.startswith("CALM")),
                "anchor_acc": acc_of(lambda m: m == "anchor alone"),
                "augmenting_acc": acc_of(lambda m: m == "augmenting alone"),
                "finetune_acc": acc_of(lambda m: m == "anchor fine-tuned"), "lora_acc": acc_of(lambda m: "LoRA" in m),
                "composed_train_key_acc": rows[2]["train_key_acc"], "chance": 1.0 / spec["data"]["p"]}
    result = {"headline": headline, "rows": rows, "spec": spec}
    write_json(out / "calm.json", result)
    return result
