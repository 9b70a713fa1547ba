"""c-BTM (Gururangan et al. 2023): cluster a corpus, train one expert per cluster, mix them by distance.

``modformer compose cbtm CONFIG.yaml`` runs four stages into ``out_dir/name/``:

1. ``cluster``: documents of the training split (``data/shard.py``) -> tf-idf -> SVD -> balanced k-means
   (``compose/cluster.py``); writes ``clusters/`` and ``assignments.json``.
2. ``plan``: one ordinary run config per expert (``experts/expertI.yaml``, data = corpus ``cbtm_shard``
   of cluster I) plus the dense baseline (``experts/dense.yaml``: the whole corpus, k times the steps, so
   the same total training tokens), and ``jobs.txt`` with one ``modformer train`` command per line: the
   experts are independent runs, to be launched anywhere (any GPUs or hosts) in parallel.
3. ``train``: runs the jobs here, ``experts.workers`` processes at a time (finished runs are skipped); on a
   host with several GPUs each job gets a GPU of its own (``experts.one_gpu_each``, default true).
4. ``eval``: perplexity of the mixture ``p(x_t | x_<t) = sum_j w_j p_j(x_t | x_<t)`` with
   ``w = softmax(-||e - c_j||^2 / T)`` (top-k optional), ``e`` the embedding of the ``eval.context``
   tokens before each evaluation window (uniform weights for the first window), against the dense
   model, the uniform ensemble and each expert alone; writes ``cbtm.json``. ``eval.top_p`` and
   ``eval.threshold`` (lists, default none) add mixtures whose number of experts varies per window
   (``compose/routing.py``); every mixture row reports ``experts_used``, its mean number of experts.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modformer.compose.cluster import Clusterer
from modformer.compose.routing import check_threshold, check_top_k, check_top_p, experts_used, mixture_weights
from modformer.compose.spec import resolve_device
from modformer.utils import atomic_write_text

DEFAULTS: dict[str, Any] = {
    "name": "cbtm",
    "out_dir": "runs/compose",
    "device": "auto",
    "run": {},                    # the expert recipe: a RunConfig mapping (model, data, train)
    "cluster": {"k": 4, "dim": 64, "doc_len": 1024, "max_features": 8192, "iters": 50, "seed": 0},
    "experts": {"steps": 200, "workers": 1, "one_gpu_each": True},
    "dense": {"train": True, "steps": None},           # None: k * experts.steps (same total tokens)
    "eval": {"temperature": 0.1, "top_k": [2, 1, None], "top_p": [], "threshold": [], "context": 256,
             "max_tokens": 50000, "batch_size": 32, "split": "val"},
}


def check_eval(spec: dict[str, Any]) -> None:
    """ValueError (one line, naming the key) unless ``eval.top_k`` / ``top_p`` / ``threshold`` are lists of
    valid settings (top_k: integers >= 1 or null; top_p: numbers in (0, 1]; threshold: numbers in [0, 1])."""
    e = spec["eval"]
    for key, check in (("top_k", check_top_k), ("top_p", check_top_p), ("threshold", check_threshold)):
        values = e.get(key, [])
        if not isinstance(values, list):
            raise ValueError(f"eval.{key} must be a list (e.g. [0.9]), got {values!r}")
        for v in values:
            check(v, f"eval.{key}")


def _run_config(spec: dict[str, Any]) -> Any:
    from modformer.config import RunConfig, from_dict

    return from_dict(RunConfig, copy.deepcopy(spec["run"]))


def cluster_stage(spec: dict[str, Any], out: Path) -> dict[str, Any]:
    """Fit the clusters on the training documents; write ``clusters/`` and ``assignments.json``."""
    from modformer.data import build_dataset
    from modformer.data.shard import documents

    rc = _run_config(spec)
    c = spec["cluster"]
    data = build_dataset(rc.data)
    docs = documents(data, "train", int(c["doc_len"]))
    t0 = time.perf_counter()
    cl, labels = Clusterer.fit(docs, data.vocab_size, int(c["k"]), int(c["dim"]), int(c["max_features"]),
                               int(c["iters"]), int(c["seed"]))
    cl.save(out / "clusters")
    atomic_write_text(out / "assignments.json",
                      json.dumps({"doc_len": int(c["doc_len"]), "clusters": labels.tolist()}))
    info = {"documents": len(docs), "sizes": torch.bincount(labels, minlength=cl.k).tolist(),
            "seconds": time.perf_counter() - t0}
    tasks = getattr(data, "doc_tasks", {}).get("train")
    if tasks:                                            # known domains: how pure is each cluster?
        info["purity"] = purity(labels.tolist(), tasks)
    return info


def purity(labels: list[int], truth: list[str]) -> float:
    """Fraction of documents whose cluster's majority domain is their own."""
    best = 0
    for c in set(labels):
        members = [t for lab, t in zip(labels, truth) if lab == c]
        best += max(members.count(t) for t in set(members))
    return best / max(len(labels), 1)


def plan_stage(spec: dict[str, Any], out: Path) -> dict[str, Path]:
    """Write one run config per expert and the dense baseline, and ``jobs.txt``; returns {name: yaml}."""
    from modformer.config import save_yaml

    rc = _run_config(spec)
    k, steps = int(spec["cluster"]["k"]), int(spec["experts"]["steps"])
    device = spec["device"]
    configs: dict[str, Path] = {}
    (out / "experts").mkdir(parents=True, exist_ok=True)
    for i in range(k):
        cfg = copy.deepcopy(rc)
        cfg.name, cfg.out_dir = f"expert{i}", str((out / "runs").resolve())
        cfg.data.options = {"source": {"name": rc.data.name, "options": dict(rc.data.options)},
                            "assignments": str((out / "assignments.json").resolve()), "cluster": i}
        cfg.data.name = "cbtm_shard"
        cfg.train.steps, cfg.train.device = steps, device
        configs[cfg.name] = out / "experts" / f"{cfg.name}.yaml"
        save_yaml(cfg, configs[cfg.name])
    if spec["dense"]["train"]:
        cfg = copy.deepcopy(rc)
        cfg.name, cfg.out_dir = "dense", str((out / "runs").resolve())
        cfg.train.steps = int(spec["dense"]["steps"] or k * steps)
        cfg.train.device = device
        configs["dense"] = out / "experts" / "dense.yaml"
        save_yaml(cfg, configs["dense"])
    jobs = [f"modformer train {p.resolve()} --overwrite" for p in configs.values()]
    atomic_write_text(out / "jobs.txt", "\n".join(jobs) + "\n")
    return configs


def train_stage(configs: dict[str, Path], out: Path, workers: int = 1,
                gpus: list[int] | None = None) -> dict[str, float]:
    """Run the jobs, ``workers`` processes at a time; a run with a summary.json is skipped. Returns seconds.

    With ``gpus`` (device indices) every job runs on a GPU of its own (``CUDA_VISIBLE_DEVICES``), at most
    one job per GPU at a time, so ``workers`` is capped at ``len(gpus)``."""
    (out / "logs").mkdir(parents=True, exist_ok=True)
    pending = [n for n in configs if not (out / "runs" / n / "summary.json").is_file()]
    running: dict[str, tuple[subprocess.Popen, float, Any, int | None]] = {}
    seconds: dict[str, float] = {}
    slots = max(min(workers, len(gpus)) if gpus else workers, 1)
    while pending or running:
        while pending and len(running) < slots:
            name = pending.pop(0)
            gpu = next(g for g in gpus if g not in {r[3] for r in running.values()}) if gpus else None
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu)} if gpu is not None else None
            log = open(out / "logs" / f"{name}.log", "w")  # noqa: SIM115 (closed when the process ends)
            cmd = [sys.executable, "-m", "modformer.cli", "train", str(configs[name].resolve()), "--overwrite"]
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            running[name] = (proc, time.perf_counter(), log, gpu)
        time.sleep(0.2)
        for name, (proc, t0, log, _) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[name]
            if proc.returncode != 0:
                for p, _, lg, _ in running.values():
                    p.kill()
                    lg.close()
                tail = (out / "logs" / f"{name}.log").read_text()[-2000:]
                raise RuntimeError(f"training {name} failed (exit {proc.returncode}); log: "
                                   f"{out / 'logs' / f'{name}.log'}\n{tail}")
            seconds[name] = time.perf_counter() - t0
    return seconds


@torch.no_grad()
def target_logprobs(model: torch.nn.Module, windows: list[tuple[torch.Tensor, torch.Tensor]],
                    device: str) -> torch.Tensor:
    """log p(y_t) of every target (N, T) over evaluation windows (0 where y = -100)."""
    model.eval().to(device)
    out = []
    for x, y in windows:
        logp = torch.log_softmax(model(x.to(device)).float(), -1)
        out.append(logp.gather(-1, y.clamp_min(0).to(device)[..., None])[..., 0].masked_fill(y.to(device) < 0, 0))
    return torch.cat(out).cpu()


def eval_windows(data: Any, split: str, batch_size: int, max_tokens: int) -> tuple[list, list[int]]:
    """Consecutive evaluation windows covering the first ``max_tokens`` tokens, and each window's start."""
    t = data.seq_len
    max_batches = max(1, -(-max_tokens // (t * batch_size))) if max_tokens else 0
    windows = list(data.iter_eval(split, batch_size, max_batches))
    n = sum(x.shape[0] for x, _ in windows)
    return windows, [i * t for i in range(n)]


def context_weights(cl: Clusterer, stream: np.ndarray, starts: list[int], context: int, temperature: float,
                    top_k: int | None, top_p: float | None = None, threshold: float | None = None) -> torch.Tensor:
    """(N, K) expert weights of each window from the ``context`` tokens before it (uniform with none); top-k,
    or top-p / threshold routing (``mixture_weights``)."""
    docs = [stream[max(0, s - context):s] for s in starts]
    w = mixture_weights(cl.embed(docs), cl.centres, temperature, top_k, top_p=top_p, threshold=threshold)
    empty = torch.tensor([len(d) == 0 for d in docs])
    w[empty] = 1.0 / cl.k
    return w


def mixture_nll(logps: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean NLL of ``log sum_j w_j p_j``: logps (K, N, T), weights (N, K), mask (N, T)."""
    logw = weights.clamp_min(1e-30).log().T[..., None]                  # (K, N, 1)
    mixed = torch.logsumexp(logps + logw, 0)                            # (N, T)
    return float(-(mixed * mask).sum() / mask.sum())


def eval_stage(spec: dict[str, Any], out: Path) -> dict[str, Any]:
    """Perplexities of the expert mixture (each top-k), uniform ensemble, each expert, and dense."""
    import math

    from modformer.data import build_dataset
    from modformer.runs import run_model

    rc, e = _run_config(spec), spec["eval"]
    device = resolve_device(spec["device"])
    data = build_dataset(rc.data)
    cl = Clusterer.load(out / "clusters")
    windows, starts = eval_windows(data, e["split"], int(e["batch_size"]), int(e["max_tokens"]))
    mask = torch.cat([(y >= 0) for _, y in windows]).float()
    experts = [target_logprobs(run_model(out / "runs" / f"expert{i}"), windows, device) for i in range(cl.k)]
    logps = torch.stack(experts)                                          # (K, N, T)
    n_tok = int(mask.sum())
    rows = []

    def row(method: str, nll: float, **kw: Any) -> None:
        rows.append({"method": method, "nll": nll, "ppl": math.exp(nll), "tokens": n_tok, **kw})

    stream = data.stream(e["split"])
    tokens = mask.sum(-1)                                                 # (N,) each window's share of the mean
    settings = [(f"c-BTM top-{k or cl.k}", {"top_k": k}, {"top_k": k or cl.k}) for k in e["top_k"]]
    settings += [(f"c-BTM top-p {p}", {"top_k": None, "top_p": p}, {"top_p": p}) for p in e.get("top_p", [])]
    settings += [(f"c-BTM threshold {t}", {"top_k": None, "threshold": t}, {"threshold": t})
                 for t in e.get("threshold", [])]
    for method, routing, info in settings:
        w = context_weights(cl, stream, starts, int(e["context"]), float(e["temperature"]), **routing)
        row(method, mixture_nll(logps, w, mask), **info, experts_used=experts_used(w, tokens))
    row("uniform ensemble", mixture_nll(logps, torch.full((mask.shape[0], cl.k), 1.0 / cl.k), mask))
    for i in range(cl.k):
        row(f"expert{i} alone", float(-(logps[i] * mask).sum() / mask.sum()))
    if (out / "runs" / "dense" / "checkpoints").is_dir():
        dense = target_logprobs(run_model(out / "runs" / "dense"), windows, device)
        row("dense (same tokens)", float(-(dense * mask).sum() / mask.sum()))
    return {"rows": rows, "split": e["split"], "tokens": n_tok}


def mixture_ppl(spec: dict[str, Any], rows: list[dict[str, Any]]) -> float:
    """Perplexity of the c-BTM mixture with the first ``eval.top_k`` setting (the headline figure)."""
    top = spec["eval"]["top_k"][0] or spec["cluster"]["k"]
    return next(r["ppl"] for r in rows if r["method"] == f"c-BTM top-{top}")


def run(spec: dict[str, Any], stages: tuple[str, ...] = ("cluster", "plan", "train", "eval")) -> dict[str, Any]:
    """All stages of ``modformer compose cbtm``; returns (and writes) ``cbtm.json``'s content."""
    check_eval(spec)
    out = Path(spec["out_dir"]) / spec["name"]
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"spec": spec}
    if "cluster" in stages:
        result["cluster"] = cluster_stage(spec, out)
    configs = plan_stage(spec, out) if "plan" in stages or "train" in stages else {}
    if "train" in stages:
        n_gpu = torch.cuda.device_count()
        gpus = list(range(n_gpu)) if spec["experts"].get("one_gpu_each", True) and n_gpu > 1 else None
        t0 = time.perf_counter()
        result["train_seconds"] = train_stage(configs, out, int(spec["experts"]["workers"]), gpus)
        result["train_wall_seconds"] = time.perf_counter() - t0
        result["train_gpus"] = gpus
    if "eval" in stages:
        result.update(eval_stage(spec, out))
    result["jobs"] = str(out / "jobs.txt")
    atomic_write_text(out / "cbtm.json", json.dumps(result, indent=2, default=str))
    return result
