"""Routing with a varying number of experts (issue 29): top-p / threshold vs fixed top-k at equal average compute.

Fixed top-k gives every token (c-BTM: every evaluation window) the same k experts. Top-p keeps, per token, the
fewest most-probable experts whose routing probability reaches p; threshold keeps every expert of probability
>= tau (``compose/routing.py``). Both spend more experts where the router is unsure and fewer where it is sure.
Compute is counted in experts used: the mean number of experts with a nonzero weight (c-BTM: per window,
token-weighted, each expert one LM forward; PHATGOOSE: per (token, ExpertLinear), each one LoRA delta).

Two setups, trained once as ``modformer compose`` trains them (the same builders):

- c-BTM (``configs/compose_cbtm_taskmix.yaml`` by default, no dense baseline): clusters, one expert LM per
  cluster, then the mixture's validation NLL for every routing setting from the same per-expert log-probs;
- PHATGOOSE (``configs/compose_gates.yaml``): a base, one LoRA expert per task, gates of one variant (default
  joint/prefix) trained once with top-2; then loss and answer accuracy (mean over tasks) for every routing.

Each setup evaluates fixed top-k for k = 1..K, a grid of top-p and threshold values, and, for every interior k,
the top-p and threshold settings whose mean experts used match k within +-0.1 (found by bisection). Equal-compute
comparison: a variable setting's metric minus fixed top-k's at the same experts used (the top-k curve linearly
interpolated between the neighbouring k), with the paired standard error over evaluation windows (c-BTM) or
examples (PHATGOOSE). ``better`` / ``worse`` means beyond 2 standard errors, else ``tie``.

Examples:
    modformer bench routing-budget --device cpu --out benchmarks/results       # the CPU study (~10 minutes)
    modformer bench routing-budget --tiny --out /tmp/rb                         # smoke test (seconds)
    modformer bench routing-budget --setups cbtm --cbtm-config configs/compose_cbtm.yaml --cbtm experts.steps=300
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from modformer.bench.common import CONFIGS, DEFAULT_OUT, cases, parse_with_preset, print_table, write_result
from modformer.cli import HelpFormatter

# c-BTM's distance softmax (T = 0.1) is nearly one-hot: its interesting top-p values lie close to 1 and its
# thresholds far below 0.1, while PHATGOOSE's softmax (T = 1, 4 experts) is flat: the grids cover both
TOP_P = [0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 0.9999]
THRESHOLD = [0.4, 0.3, 0.2, 0.1, 0.05, 0.01, 1e-3, 1e-4, 1e-5]
# CPU scale of the committed run: the compose configs as they are, without the baselines this study does not
# use (c-BTM's dense model, the multitask LoRA), and 100 c-BTM validation documents instead of 40 (eval only)
CBTM_CPU = ["dense.train=false", "run.data.options.val_docs=100"]
GATES_CPU = ["multitask.enabled=false"]
CBTM_TINY = ["cluster.k=3", "cluster.dim=4", "cluster.doc_len=56", "experts.steps=2", "dense.train=false",
             "run.model.n_layer=1", "run.model.d_model=16", "run.model.n_head=2", "run.model.max_seq_len=28",
             "run.data.seq_len=28", "run.data.options.doc_examples=4", "run.data.options.train_docs=12",
             "run.data.options.val_docs=3", "run.data.options.tasks=[copy,sort,reverse]", "run.train.batch_size=16",
             "run.train.eval_batches=1", "eval.context=28"]
GATES_TINY = ["base.model.n_layer=1", "base.model.d_model=16", "base.model.n_head=2", "base.train.steps=3",
              "base.train.batch_size=16", "data.n_examples=40", "data.length=3", "experts.tasks=[reverse,sort,copy]",
              "experts.steps=2", "experts.batch_size=16", "gates.steps=2", "multitask.enabled=false"]


# ---- equal-compute comparison -------------------------------------------------------------------
def interpolate(xs: list[float], ys: list[torch.Tensor], x: float) -> tuple[torch.Tensor, float, float]:
    """Fixed top-k's per-unit values at ``x`` experts used: linear between the neighbouring k (xs increasing,
    clamped at the ends). Returns (values, k below, k above) with k as the experts-used coordinates."""
    if x <= xs[0]:
        return ys[0], xs[0], xs[0]
    for i in range(1, len(xs)):
        if x <= xs[i]:
            a = (x - xs[i - 1]) / max(xs[i] - xs[i - 1], 1e-12)
            return (1 - a) * ys[i - 1] + a * ys[i], xs[i - 1], xs[i]
    return ys[-1], xs[-1], xs[-1]


def paired(diff: torch.Tensor, weight: torch.Tensor) -> tuple[float, float]:
    """Weighted mean of per-unit differences and its standard error (units: windows or examples)."""
    w = weight.double() / weight.double().sum()
    d = diff.double()
    mean = float((w * d).sum())
    n = d.numel()
    var = float((w * (d - mean).square()).sum()) * n / max(n - 1, 1)
    return mean, math.sqrt(var * float(w.square().sum()))


def verdict(delta: float, se: float, lower_is_better: bool) -> str:
    """better / worse (beyond 2 standard errors and 1e-6) / tie, for the variable routing against fixed top-k."""
    if abs(delta) <= max(2 * se, 1e-6):
        return "tie"
    return "better" if (delta < 0) == lower_is_better else "worse"


def bisect(used: Callable[[float], float], param: Callable[[float], float], target: float, tol: float = 0.1,
           iters: int = 24) -> float | None:
    """A routing parameter whose experts used is within ``tol`` of ``target`` (None if none is found), by
    bisection over x in [-12, 0] with ``param(x)`` the parameter (experts used must fall as x grows: top-p
    1 - 10^x, threshold 10^x, so settings near p = 1 or tau = 0 are reachable)."""
    lo, hi = -12.0, 0.0
    best, best_err = None, float("inf")
    for _ in range(iters):
        mid = (lo + hi) / 2
        n = used(param(mid))
        if abs(n - target) < best_err:
            best, best_err = param(mid), abs(n - target)
        if best_err <= tol / 4:
            break
        if n > target:
            lo = mid
        else:
            hi = mid
    return best if best_err <= tol else None


# ---- c-BTM --------------------------------------------------------------------------------------
class CbtmEval:
    """Per-expert log-probs of the validation windows and the context embeddings: every routing setting's
    mixture NLL and experts used come from these (no model runs per setting)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        from modformer.compose import cbtm
        from modformer.compose.cluster import Clusterer
        from modformer.compose.spec import resolve_device
        from modformer.data import build_dataset
        from modformer.runs import run_model

        out = Path(spec["out_dir"]) / spec["name"]
        rc, e = cbtm._run_config(spec), spec["eval"]
        data = build_dataset(rc.data)
        self.cl = Clusterer.load(out / "clusters")
        windows, starts = cbtm.eval_windows(data, e["split"], int(e["batch_size"]), int(e["max_tokens"]))
        self.mask = torch.cat([(y >= 0) for _, y in windows]).float()                   # (N, T)
        device = resolve_device(spec["device"])
        self.logps = torch.stack([cbtm.target_logprobs(run_model(out / "runs" / f"expert{i}"), windows, device)
                                  for i in range(self.cl.k)])                           # (K, N, T)
        stream, ctx = data.stream(e["split"]), int(e["context"])
        docs = [stream[max(0, s - ctx):s] for s in starts]
        self.emb, self.empty = self.cl.embed(docs), torch.tensor([len(d) == 0 for d in docs])
        self.temperature = float(e["temperature"])
        self.tokens = self.mask.sum(-1)                                                  # (N,)
        self.k = self.cl.k

    def weights(self, routing: str, value: float | None) -> torch.Tensor:
        """(N, K) mixture weights of each window (uniform for a window without context, as c-BTM's eval)."""
        from modformer.compose.routing import mixture_weights

        kw = {"top_k": int(value)} if routing == "top_k" else {routing: value}
        w = mixture_weights(self.emb, self.cl.centres, self.temperature, **kw)
        w[self.empty] = 1.0 / self.k
        return w

    def measure(self, routing: str, value: float | None) -> dict[str, Any]:
        from modformer.compose.cbtm import mixture_nll
        from modformer.compose.routing import experts_used

        w = self.weights(routing, value)
        logw = w.clamp_min(1e-30).log().T[..., None]
        per_window = -(torch.logsumexp(self.logps + logw, 0) * self.mask).sum(-1) / self.tokens.clamp_min(1)
        nll = mixture_nll(self.logps, w, self.mask)
        return {"experts_used": experts_used(w, self.tokens), "nll": nll, "ppl": math.exp(nll),
                "_units": per_window}

    def used(self, routing: str, value: float) -> float:
        from modformer.compose.routing import experts_used

        return experts_used(self.weights(routing, value), self.tokens)


def run_cbtm(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from modformer.compose import cbtm
    from modformer.compose.spec import load_spec

    spec = load_spec(args.cbtm_config, cbtm.DEFAULTS,
                     [f"out_dir={args.runs}", f"device={args.device}", "name=rb_cbtm", *args.cbtm])
    t0 = time.perf_counter()
    shutil.rmtree(Path(spec["out_dir"]) / spec["name"] / "runs", ignore_errors=True)   # the train stage skips
    cbtm.run(spec, stages=("cluster", "plan", "train"))                                # finished runs: start afresh
    ev = CbtmEval(spec)
    train_s = time.perf_counter() - t0
    corpus = spec["run"]["data"]["name"]
    rows = sweep("cbtm", ev.k, ev.measure, ev.used, args, metrics=[("nll", True)],
                 weight=ev.tokens, describe=f"c-BTM {corpus}")
    info = {"corpus": corpus, "experts": ev.k, "windows": int(ev.mask.shape[0]), "tokens": int(ev.mask.sum()),
            "temperature": ev.temperature, "train_seconds": train_s}
    return rows, info


# ---- PHATGOOSE ----------------------------------------------------------------------------------
@torch.no_grad()
def gates_measure(model: torch.nn.Module, per_task: list[Any], device: str) -> dict[str, Any]:
    """Mean over tasks of answer-token loss and accuracy, experts used per (token, module) (and per (answer
    token, module): where the loss is counted), and per-example loss / accuracy (the paired units)."""
    from modformer.compose import gates as G

    mods = list(G.expert_linears(model).values())
    for m in mods:
        m.record = True
    model.eval()
    losses, accs, ex_loss, ex_acc = [], [], [], []
    used, slots, used_ans, slots_ans = 0, 0, 0, 0
    try:
        for data in per_task:
            loss_sum, correct, n = 0.0, 0, 0
            for x, y in data.iter_eval("val", 1024):
                x, y = x.to(device), y.to(device)
                logits = model(x).float()
                mask = y != -100
                nll = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100,
                                      reduction="none").view_as(y)
                hit = (logits.argmax(-1) == y) & mask
                loss_sum, correct, n = loss_sum + float(nll.sum()), correct + int(hit.sum()), n + int(mask.sum())
                per = mask.sum(-1).clamp_min(1)
                ex_loss.append((nll.sum(-1) / per).cpu())
                ex_acc.append((hit.sum(-1) / per).cpu())
                for m in mods:
                    n_used = (m.last_weights != 0).sum(-1)                       # (B, T)
                    used, slots = used + int(n_used.sum()), slots + n_used.numel()
                    used_ans, slots_ans = used_ans + int(n_used[mask].sum()), slots_ans + int(mask.sum())
            losses.append(loss_sum / max(n, 1))
            accs.append(correct / max(n, 1))
    finally:
        for m in mods:
            m.record, m.last_top, m.last_weights = False, None, None
    return {"experts_used": used / max(slots, 1), "experts_used_answers": used_ans / max(slots_ans, 1),
            "loss": sum(losses) / len(losses), "acc": sum(accs) / len(accs),
            "_units": torch.cat(ex_loss), "_units_acc": torch.cat(ex_acc)}


def run_gates(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from modformer.compose import gates as G
    from modformer.compose import gates_run
    from modformer.compose.spec import load_spec

    spec = load_spec(args.gates_config, gates_run.DEFAULTS,
                     [f"out_dir={args.runs}", f"device={args.device}", "name=rb_gates", *args.gates])
    how, _, granularity = args.gates_variant.partition("/")
    if how not in ("independent", "joint") or granularity not in ("token", "prefix"):
        raise ValueError(f"--gates-variant: {args.gates_variant!r} is not (independent|joint)/(token|prefix)")
    t0 = time.perf_counter()
    prep = gates_run.prepare(spec)
    model = gates_run.routed_model(spec, prep)
    g = spec["gates"]
    G.set_mode(model, "route", granularity=granularity)
    G.train_gates(model, prep.per_task, prep.train_cfg, int(g["steps"]), float(g["lr"]), joint=how == "joint",
                  mixture=prep.mixture, seed=prep.seed)
    train_s = time.perf_counter() - t0
    n_exp = len(prep.deltas)

    def route(routing: str, value: float | None) -> None:
        settings: dict[str, Any] = {"routing": routing}
        settings[routing] = int(value) if routing == "top_k" else value
        G.set_mode(model, "route", granularity=granularity, **settings)

    def measure(routing: str, value: float | None) -> dict[str, Any]:
        route(routing, value)
        r = gates_measure(model, prep.per_task, prep.device)
        return r

    def used(routing: str, value: float) -> float:
        return measure(routing, value)["experts_used"]

    rows = sweep("gates", n_exp, measure, used, args, metrics=[("loss", True), ("acc", False)], weight=None,
                 describe=f"PHATGOOSE {args.gates_variant}")
    x_val, expert_of = prep.routing_inputs(spec)
    G.set_mode(model, "route", granularity=granularity, routing="top_k", top_k=int(g["top_k"]))
    routing = G.routing_accuracy(model, x_val.to(prep.device), expert_of)
    info = {"variant": args.gates_variant, "experts": n_exp, "tasks": prep.tasks, "train_seconds": train_s,
            "gate_train_top_k": int(g["top_k"]), "routing_top1": routing["routing_top1"],
            "val_examples": int(sum(d.split_size("val") for d in prep.per_task))}
    return rows, info


# ---- the sweep ----------------------------------------------------------------------------------
def sweep(setup: str, n_exp: int, measure: Callable[[str, float | None], dict[str, Any]],
          used: Callable[[str, float], float], args: argparse.Namespace, metrics: list[tuple[str, bool]],
          weight: torch.Tensor | None, describe: str) -> list[dict[str, Any]]:
    """Fixed top-k for k = 1..n_exp, the top-p / threshold grids and the matched settings; each row gets its
    equal-compute difference to fixed top-k (``delta_<metric>``, ``se_<metric>``, ``vs_top_k``)."""
    settings: list[tuple[str, float | None, str]] = [("top_k", k, "grid") for k in range(1, n_exp + 1)]
    settings += [("top_p", p, "grid") for p in args.top_p]
    settings += [("threshold", t, "grid") for t in args.threshold]
    targets = list(range(2, n_exp)) if args.matched else []
    settings += [(m, float(k), "matched") for k in targets for m in ("top_p", "threshold")]
    rows: list[dict[str, Any]] = []
    topk: list[dict[str, Any]] = []

    def label(c: tuple[str, float | None, str]) -> str:
        return f"next: {c[0]} {c[1]:g}" + (" (matched)" if c[2] == "matched" else "")

    for routing, value, kind in cases(settings, f"routing-budget {setup}", label):
        target = None
        if kind == "matched":                      # the parameter whose experts used is value +- 0.1
            target = value
            param = (lambda x: max(1 - 10 ** x, 1e-6)) if routing == "top_p" else (lambda x: 10 ** x)
            value = bisect(lambda v, r=routing: used(r, v), param, target)
            if value is None:
                rows.append({"setup": setup, "routing": routing, "param": None, "kind": kind, "target_experts": target,
                             "note": "no setting within +-0.1 of the target"})
                continue
        r = measure(routing, value)
        row = {"setup": setup, "routing": routing, "param": value if routing != "top_k" else int(value), "kind": kind,
               **({"target_experts": target} if target is not None else {}),
               **{k: v for k, v in r.items() if not k.startswith("_")}}
        row["_units"], row["_units_acc"] = r["_units"], r.get("_units_acc")
        if routing == "top_k":
            topk.append(row)
        rows.append(row)
    xs = [r["experts_used"] for r in topk]
    w = weight if weight is not None else torch.ones_like(topk[0]["_units"])
    for row in rows:
        if row["routing"] == "top_k" or "experts_used" not in row:
            continue
        for metric, lower in metrics:
            key = "_units" if metric in ("nll", "loss") else "_units_acc"
            ref, k_lo, k_hi = interpolate(xs, [r[key] for r in topk], row["experts_used"])
            delta, se = paired(row[key] - ref, w)
            ref_metric = interpolate(xs, [torch.tensor(r[metric]) for r in topk], row["experts_used"])[0]
            row[f"top_k_{metric}_same_compute"] = float(ref_metric)
            row[f"delta_{metric}"], row[f"se_{metric}"] = delta, se
            row[f"vs_top_k_{metric}"] = verdict(delta, se, lower)
    for row in rows:
        row.pop("_units", None)
        row.pop("_units_acc", None)
    print(f"{describe}:")
    print_table([r for r in rows if "experts_used" in r],
                ["routing", "param", "kind", "experts_used", *[m for m, _ in metrics],
                 *[f"delta_{m}" for m, _ in metrics], *[f"se_{m}" for m, _ in metrics]])
    return rows


def summarise(setup: str, rows: list[dict[str, Any]], metric: str, lower: bool) -> dict[str, Any]:
    """Headline figures of one setup and metric: top-k's curve, the matched comparisons, the best grid row."""
    mine = [r for r in rows if r["setup"] == setup and "experts_used" in r]
    out: dict[str, Any] = {f"{setup}_top_k_{metric}": {str(r["param"]): r[metric] for r in mine
                                                        if r["routing"] == "top_k"},
                           f"{setup}_top_k_experts_used": {str(r["param"]): r["experts_used"] for r in mine
                                                            if r["routing"] == "top_k"}}
    for routing in ("top_p", "threshold"):
        matched = [r for r in mine if r["routing"] == routing and r["kind"] == "matched"]
        out[f"{setup}_{routing}_matched_delta_{metric}"] = {
            str(int(r["target_experts"])): {"param": r["param"], "experts_used": r["experts_used"],
                                            "delta": r[f"delta_{metric}"], "se": r[f"se_{metric}"],
                                            "verdict": r[f"vs_top_k_{metric}"]} for r in matched}
    variable = [r for r in mine if r["routing"] != "top_k"]
    if variable:
        best = min(variable, key=lambda r: r[f"delta_{metric}"] if lower else -r[f"delta_{metric}"])
        out[f"{setup}_best_variable_{metric}"] = {k: best[k] for k in ("routing", "param", "kind", "experts_used",
                                                                       metric, f"delta_{metric}", f"se_{metric}",
                                                                       f"vs_top_k_{metric}")}
        counts = {v: sum(r[f"vs_top_k_{metric}"] == v for r in variable) for v in ("better", "tie", "worse")}
        out[f"{setup}_variable_vs_top_k_{metric}"] = counts
    matched = {r[f"vs_top_k_{metric}"] for r in mine if r["routing"] != "top_k" and r["kind"] == "matched"}
    state = ("mixed" if {"better", "worse"} <= matched else "better" if "better" in matched
             else "worse" if "worse" in matched else "tie")
    out[f"{setup}_matched_verdict_{metric}"] = state      # over every matched (top-p / threshold, k) comparison
    out[f"{setup}_variable_beats_top_k_{metric}"] = state == "better"
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="modformer bench routing-budget", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter,
                                epilog="examples:\n"
                                       "  modformer bench routing-budget --device cpu --out benchmarks/results\n"
                                       "  modformer bench routing-budget --tiny --out /tmp/rb\n"
                                       "  modformer bench routing-budget --setups gates --gates-variant "
                                       "independent/token --top-p 0.5 0.9")
    p.add_argument("--tiny", action="store_true", help="smoke-test scale: tiny models, a few steps, short grids "
                   "(seconds on CPU; not a measurement)")
    p.add_argument("--setups", nargs="+", default=["cbtm", "gates"], choices=["cbtm", "gates"],
                   help="which expert setups to study")
    p.add_argument("--top-p", type=float, nargs="+", default=TOP_P, help="top-p values of the grid, in (0, 1]")
    p.add_argument("--threshold", type=float, nargs="+", default=THRESHOLD,
                   help="threshold values of the grid, in [0, 1]")
    p.add_argument("--no-matched", dest="matched", action="store_false",
                   help="skip the bisection for top-p / threshold settings matching each interior k")
    p.add_argument("--cbtm-config", default=str(CONFIGS / "compose_cbtm_taskmix.yaml"),
                   help="c-BTM spec (modformer compose cbtm YAML)")
    p.add_argument("--cbtm", nargs="*", default=CBTM_CPU, metavar="KEY=VALUE",
                   help="dotted overrides of the c-BTM spec (replace the CPU-scale defaults shown)")
    p.add_argument("--gates-config", default=str(CONFIGS / "compose_gates.yaml"),
                   help="PHATGOOSE spec (modformer compose gates YAML)")
    p.add_argument("--gates", nargs="*", default=GATES_CPU, metavar="KEY=VALUE",
                   help="dotted overrides of the gates spec (replace the CPU-scale defaults shown)")
    p.add_argument("--gates-variant", default="joint/prefix",
                   help="gate training / scoring: (independent|joint)/(token|prefix)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:N")
    p.add_argument("--runs", default="runs/routing_budget",
                   help="folder of the trained models (the gates base is reused when its settings are unchanged; "
                   "experts are retrained)")
    p.add_argument("--out", default=DEFAULT_OUT, help="result folder (benchmarks/results: the committed answer)")
    p.add_argument("--result-name", default="routing_budget", help="result file name, without .json")
    p.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: torch's)")
    args = parse_with_preset(p, argv, "--tiny", cbtm=CBTM_TINY, gates=GATES_TINY, top_p=[0.5, 0.9],
                             threshold=[0.3, 0.1], device="cpu")
    for v in args.top_p:
        if not 0 < v <= 1:
            p.error(f"--top-p values must be in (0, 1], got {v}")
    for v in args.threshold:
        if not 0 <= v <= 1:
            p.error(f"--threshold values must be in [0, 1], got {v}")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    headline: dict[str, Any] = {}
    extra: dict[str, Any] = {"setups": {}, "scale": "tiny" if args.tiny else "cpu",
                             "overrides": {"cbtm": args.cbtm, "gates": args.gates}}
    if args.tiny:
        extra["note"] = "smoke test (tiny models, a few steps): not a measurement"
    if "cbtm" in args.setups:
        r, info = run_cbtm(args)
        rows += r
        extra["setups"]["cbtm"] = info
        headline.update(summarise("cbtm", rows, "nll", lower=True))
        write_result(args.result_name, headline, rows, torch.device(args.device), args.out, extra=extra)
    if "gates" in args.setups:
        r, info = run_gates(args)
        rows += r
        extra["setups"]["gates"] = info
        headline.update(summarise("gates", rows, "loss", lower=True))
        headline.update(summarise("gates", rows, "acc", lower=False))
    headline["verdict"] = verdict_text(headline, args.setups)
    headline["total_seconds"] = time.perf_counter() - t0
    path = write_result(args.result_name, headline, rows, torch.device(args.device), args.out, extra=extra)
    print(f"headline: {headline['verdict']}\nwrote {path}")
    return 0


def verdict_text(h: dict[str, Any], setups: list[str]) -> str:
    """One sentence per setup and metric: the matched-compute differences of top-p and threshold to fixed top-k
    (variable minus top-k at the same mean experts used), the verdict over them, and the best grid setting."""
    parts = []
    for setup, metric in [("cbtm", "nll"), ("gates", "loss"), ("gates", "acc")]:
        if setup not in setups:
            continue
        bits = []
        for routing in ("top_p", "threshold"):
            m = h.get(f"{setup}_{routing}_matched_delta_{metric}", {})
            if m:
                bits.append(f"{routing} " + ", ".join(f"k={k}: {v['delta']:+.4f}+-{v['se']:.4f} ({v['verdict']})"
                                                      for k, v in m.items()))
        counts = h.get(f"{setup}_variable_vs_top_k_{metric}", {})
        best = h.get(f"{setup}_best_variable_{metric}")
        best_text = (f"best variable setting {best['routing']} {best['param']:.4g} at {best['experts_used']:.3f} "
                     f"experts: {best[f'delta_{metric}']:+.4f}+-{best[f'se_{metric}']:.4f} "
                     f"({best[f'vs_top_k_{metric}']})" if best else "no variable setting")
        state = h.get(f"{setup}_matched_verdict_{metric}")
        answer = {"better": "yes", "worse": "no, worse", "tie": "no, a tie", "mixed": "mixed"}[state]
        parts.append(f"{setup} {metric}, variable minus top-k at equal experts used: matched "
                     f"{'; '.join(bits) or 'none'} -> variable routing beats fixed top-k at matched compute: {answer}; "
                     f"{best_text}; all settings better/tie/worse = {counts.get('better', 0)}/"
                     f"{counts.get('tie', 0)}/{counts.get('worse', 0)}")
    return " | ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
