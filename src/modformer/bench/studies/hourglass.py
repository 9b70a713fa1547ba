"""Hourglass vs a tuned RoPE GPT (issues 6 and 25): training time to the GPT's best validation loss.

The protocol is BENCHMARKS.md's rule for efficiency claims. Per corpus two shipped configs, same data, context,
tokens per step, optimiser, compile setting and non-embedding parameters (within 2%, checked):

- Tiny Shakespeare (char, T=2048): ``configs/gpt_rope_baseline_shakespeare.yaml`` (8-layer GPT, RoPE, pre-norm)
  vs ``configs/hourglass_shakespeare_alternate.yaml`` (alternating local/global token layers, RoPE);
- WikiText-2 (word, T=2048): ``configs/hourglass_wikitext2_gpt.yaml`` vs ``configs/hourglass_wikitext2.yaml``.

1. Learning-rate sweep: each model at every ``--lrs`` value (seed 0; ``min_lr`` keeps the config's ratio to lr).
2. Seeds: each model at its own best lr (lowest best val loss) for seeds 1 .. ``--seeds`` - 1 (seed 0 is the
   sweep run).
3. Per seed s: the target is GPT seed s's best val loss; ``time_ratio`` = GPT's training seconds to that loss /
   the hourglass's seconds to first reach it (first evaluation at or below; null if never). Training seconds
   exclude evaluation and the one-off torch.compile warm-up (``warmup_s``: the first log window's excess over
   the median rate), so a cold and a warm Inductor cache count alike; the ratio with compile time included is
   reported too.

Headline: ``time_ratio_vs_tuned_gpt`` (median over seeds), ``time_ratio_vs_tuned_gpt_min`` / ``_max``, ``seeds``,
``baseline`` ("rope, lr swept"), the tuned lrs, the best val losses, tokens/s of both and their ratio, parameter
counts; ``--profile`` adds the hourglass's per-component time split (``hourglass_profile.py``) and the GPT's
forward + backward time at the same batch. ``--variants`` adds one-seed rows of hourglass ablations at the
hourglass's tuned lr, compared with GPT seed 0. Every finished run rewrites the result file, so a run stopped by
a time limit leaves what it finished; ``--budget-s`` skips runs that would not fit (the longest run so far as
the estimate); ``--reuse RESULT`` continues an earlier result (its runs are not rerun, e.g. to add an lr to the
sweep or variants in a second call on a machine with a per-command time limit).

Examples:
    modformer bench hourglass --budget-s 560 --profile --out benchmarks/results    # the canonical result (H200)
    modformer bench hourglass --tiny --out /tmp/hg.json                          # CPU smoke test, not a measurement
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from modformer.bench.common import CONFIGS, DEFAULT_OUT, cases, print_table, write_result
from modformer.cli import HelpFormatter
from modformer.config import load_config
from modformer.saving import unwrap
from modformer.train.logging import read_metrics, steady_tokens_per_s, warmup_seconds
from modformer.train.trainer import Trainer

CORPORA = {"shakespeare": {"gpt": "gpt_rope_baseline_shakespeare", "hourglass": "hourglass_shakespeare_alternate"},
           "wikitext2": {"gpt": "hourglass_wikitext2_gpt", "hourglass": "hourglass_wikitext2"}}
MODELS = ("gpt", "hourglass")
PARAMS_TOLERANCE = 0.02      # the "same parameters within 2%" (non-embedding)

# hourglass ablations (--variants): overrides of model.model_options
ABLATIONS: dict[str, dict] = {
    "base_global": {"schedule": "global", "encoder_layers": [1, 0], "decoder_layers": [1], "latent_layers": 5},
    "local_tokens": {"schedule": "local"},
    "local_first": {"schedule": "local_first"},
    "last_k": {"compression": "last_k"},
    "attention_upsampling": {"upsampling": "attention"},
    "k2_g8": {"group_len": 8, "n_latents": 2},
    "g8": {"group_len": 8},
    "g2": {"group_len": 2},
    "latent_loss": {"latent_loss": 0.1},
    "denseformer": {"denseformer": True},
    "local_eager": {"local_backend": "eager"},
    "local_tokens_eager": {"schedule": "local", "local_backend": "eager"},   # every token layer local, cheap
}
TINY = ["model.d_model=32", "model.n_head=2", "model.n_layer=2", "train.eval_batches=2", "train.log_every=1",
        "train.device=cpu", "train.threads=1", "train.compile=false", "train.warmup_steps=1"]
QUIET = ["train.checkpoint_every=0", "train.progress=false", "train.tensorboard=false", "train.sample_tokens=0"]


def run_one(name: str, config: Path, overrides: list[str], runs_dir: Path) -> dict:
    """Train one configuration; its row with the validation curve against training seconds and FLOPs."""
    cfg = load_config(config, overrides)
    cfg.name, cfg.out_dir = name, str(runs_dir)
    started = time.perf_counter()
    trainer = Trainer(cfg, overwrite=True)
    device = trainer.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    curve: list[dict] = []
    eval_seconds = [0.0]
    evaluate = trainer.evaluate
    t0 = time.perf_counter()

    def timed_evaluate(split: str, max_batches: int | None = None, **kw: object) -> dict:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = evaluate(split, max_batches, **kw)
        if split == "val":
            curve.append({"step": trainer.step, "train_s": start - t0 - eval_seconds[0], "loss": out["loss"]})
        eval_seconds[0] += time.perf_counter() - start
        return out

    trainer.evaluate = timed_evaluate
    trainer.fit()
    model = unwrap(trainer.raw_model)
    seq, batch = cfg.data.seq_len, cfg.train.batch_size
    fpt = model.flops_per_token(seq)
    for point in curve:
        point["flops"] = point["step"] * batch * seq * fpt
    train_rows = [r for r in read_metrics(trainer.run_dir / "metrics.jsonl") if r["split"] == "train"]
    best = min(curve, key=lambda p: p["loss"]) if curve else None
    return {"name": name, "model": cfg.model.model, "model_options": cfg.model.model_options,
            "position": cfg.model.position, "norm_placement": cfg.model.norm_placement,
            "lr": cfg.train.lr, "min_lr": cfg.train.min_lr, "seed": cfg.train.seed, "compile": cfg.train.compile,
            "params": model.num_params(), "params_non_embedding": model.num_params(non_embedding=True),
            "flops_per_token": fpt, "seq_len": seq, "batch_size": batch, "steps": trainer.step,
            "tokens": trainer.step * batch * seq,
            "val_loss": curve[-1]["loss"] if curve else None, "best_val_loss": best["loss"] if best else None,
            "train_s": curve[-1]["train_s"] if curve else None, "eval_s": eval_seconds[0],
            "warmup_s": warmup_seconds(train_rows, batch * seq) or 0.0,
            "tokens_per_s": steady_tokens_per_s(train_rows),
            "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None,
            "run_wall_s": time.perf_counter() - started, "curve": curve}


def first_reach(curve: list[dict], target: float, key: str) -> float | None:
    """``key`` (train_s or flops) at the first evaluation with loss <= target; None if none reaches it."""
    for p in curve:
        if p["loss"] <= target + 1e-9:
            return p[key]
    return None


def compare(gpt: dict, hg: dict) -> dict:
    """Hourglass row vs GPT row: time (without / with compile warm-up) and FLOPs to GPT's best val loss.

    If the hourglass never gets there, ``time_ratio_at_hourglass_best`` says how the two compare at the
    hourglass's own best loss (below 1: GPT gets there sooner)."""
    target = gpt["best_val_loss"]
    t_gpt, t_hg = first_reach(gpt["curve"], target, "train_s"), first_reach(hg["curve"], target, "train_s")
    f_gpt, f_hg = first_reach(gpt["curve"], target, "flops"), first_reach(hg["curve"], target, "flops")
    w_gpt, w_hg = gpt["warmup_s"], hg["warmup_s"]
    own = hg["best_val_loss"]
    o_gpt, o_hg = first_reach(gpt["curve"], own, "train_s"), first_reach(hg["curve"], own, "train_s")
    reached = t_gpt is not None and t_hg is not None
    own_reached = o_gpt is not None and o_hg is not None
    return {"target_loss": target, "gpt_s_to_target": t_gpt - w_gpt if t_gpt is not None else None,
            "hourglass_s_to_target": t_hg - w_hg if reached else None,
            "time_ratio": (t_gpt - w_gpt) / (t_hg - w_hg) if reached else None,
            "time_ratio_incl_compile": t_gpt / t_hg if reached else None,
            "flops_ratio": f_gpt / f_hg if f_gpt and f_hg else None,
            "time_ratio_at_hourglass_best": (o_gpt - w_gpt) / (o_hg - w_hg) if own_reached else None}


def best_lr(rows: list[dict], arm: str) -> float | None:
    """The swept lr with the lowest best val loss for ``arm`` (None before any sweep run finished)."""
    sweep = [r for r in rows if r["arm"] == arm and r["role"] == "sweep" and r["best_val_loss"] is not None]
    return min(sweep, key=lambda r: r["best_val_loss"])["lr"] if sweep else None


def tuned(rows: list[dict], arm: str) -> dict[int, dict]:
    """``arm``'s runs at its best lr, by seed."""
    lr = best_lr(rows, arm)
    return {r["seed"]: r for r in rows if r["arm"] == arm and r["role"] in ("sweep", "seed") and r["lr"] == lr}


def _median(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarise(rows: list[dict], lrs: list[float]) -> tuple[dict, list[dict]]:
    """Headline and per-seed comparisons from the rows finished so far (see the module docstring)."""
    gpt, hg = tuned(rows, "gpt"), tuned(rows, "hourglass")
    seeds = sorted(set(gpt) & set(hg))
    pairs = [{"seed": s, **compare(gpt[s], hg[s])} for s in seeds]
    ratios = [p["time_ratio"] for p in pairs]
    reached = all(r is not None for r in ratios) and bool(ratios)
    tps = {arm: _median([r["tokens_per_s"] for r in runs.values()]) for arm, runs in (("gpt", gpt), ("hourglass", hg))}
    params = {arm: next(iter(runs.values()))["params_non_embedding"] if runs else None
              for arm, runs in (("gpt", gpt), ("hourglass", hg))}
    head = {"baseline": "rope, lr swept", "seeds": len(seeds), "lrs_swept": lrs,
            "lr_gpt": best_lr(rows, "gpt"), "lr_hourglass": best_lr(rows, "hourglass"),
            "time_ratio_vs_tuned_gpt": statistics.median(ratios) if reached else None,
            "time_ratio_vs_tuned_gpt_min": min(ratios) if reached else None,
            "time_ratio_vs_tuned_gpt_max": max(ratios) if reached else None,
            "time_ratio_vs_tuned_gpt_per_seed": ratios,
            "time_ratio_vs_tuned_gpt_incl_compile": _median([p["time_ratio_incl_compile"] for p in pairs]),
            "flops_ratio_vs_tuned_gpt": _median([p["flops_ratio"] for p in pairs]),
            "time_ratio_at_hourglass_best": _median([p["time_ratio_at_hourglass_best"] for p in pairs]),
            "best_val_loss_gpt": _median([gpt[s]["best_val_loss"] for s in seeds]),
            "best_val_loss_hourglass": _median([hg[s]["best_val_loss"] for s in seeds]),
            "best_val_loss_gpt_per_seed": [gpt[s]["best_val_loss"] for s in seeds],
            "best_val_loss_hourglass_per_seed": [hg[s]["best_val_loss"] for s in seeds],
            "tokens_per_s_gpt": tps["gpt"], "tokens_per_s_hourglass": tps["hourglass"],
            "tokens_per_s_ratio": tps["hourglass"] / tps["gpt"] if tps["gpt"] and tps["hourglass"] else None,
            "params_non_embedding_gpt": params["gpt"], "params_non_embedding_hourglass": params["hourglass"],
            "params_ratio": params["hourglass"] / params["gpt"] if params["gpt"] and params["hourglass"] else None,
            "sweep": {arm: {str(r["lr"]): r["best_val_loss"] for r in rows if r["arm"] == arm and r["role"] == "sweep"}
                      for arm in MODELS},
            "goal_2x_met": (statistics.median(ratios) >= 2.0) if reached else False}
    return head, pairs


def profile(config: Path, overrides: list[str], runs_dir: Path, gpt_config: Path) -> dict:
    """The hourglass's per-component forward + backward times at the study's batch (as configured and with the
    ``local_eager`` variant's local attention), and the GPT's total."""
    from modformer.bench.studies.hourglass_profile import component_split, total_time

    out: dict = {}
    eager_local = [f"model.model_options.{k}={v}" for k, v in ABLATIONS["local_eager"].items()]
    for arm, path, extra in (("hourglass", config, []), ("hourglass_local_eager", config, eager_local),
                             ("gpt", gpt_config, [])):
        cfg = load_config(path, [*overrides, *extra, "train.compile=false"])
        cfg.name, cfg.out_dir = f"profile_{arm}", str(runs_dir)
        trainer = Trainer(cfg, overwrite=True)
        trainer.lock.release()
        model = trainer.raw_model
        gen = torch.Generator().manual_seed(0)
        batch = torch.randint(cfg.model.vocab_size, (cfg.train.batch_size, cfg.data.seq_len + 1), generator=gen)
        batch = batch.to(trainer.device)
        idx, targets = batch[:, :-1], batch[:, 1:]
        out[arm] = (component_split(model, idx, targets, trainer._autocast) if arm != "gpt"
                    else {"total": total_time(model, idx, targets, trainer._autocast), "batch": list(idx.shape)})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="modformer bench hourglass", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--corpus", default="shakespeare", choices=sorted(CORPORA), help="training text")
    p.add_argument("--lrs", default="5e-4,1e-3,2e-3,4e-3", help="peak learning rates swept for both models")
    p.add_argument("--seeds", type=int, default=3, help="seeds at each model's best lr (seed 0 = the sweep run)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the configs')")
    p.add_argument("--seq-len", type=int, default=None, help="context (default: the configs'); batch keeps tokens")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    p.add_argument("--variants", default="", help="comma list of hourglass ablations: " + ", ".join(ABLATIONS))
    p.add_argument("--profile", action="store_true", help="per-component time split of the hourglass (at the end)")
    p.add_argument("--budget-s", type=float, default=0.0, help="skip runs that would end past this many seconds")
    p.add_argument("--reuse", default=None, metavar="RESULT",
                   help="an earlier result of this study: its runs (same corpus, names) count as done, not rerun")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny models, 6 steps, T=64")
    p.add_argument("--out", default=f"{DEFAULT_OUT}/hourglass.json", help="result JSON file")
    p.add_argument("--runs-dir", default=None, help="folder for the training runs (default: a temporary folder)")
    args = p.parse_args(argv)
    try:
        lrs = [float(x) for x in args.lrs.split(",")]
    except ValueError:
        p.error(f"--lrs: comma list of numbers, got {args.lrs!r}")
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(ABLATIONS))
    if unknown:
        p.error(f"--variants: unknown {unknown}; choose from {', '.join(ABLATIONS)}")
    if args.seeds < 1:
        p.error("--seeds must be >= 1")
    runs_dir = Path(args.runs_dir or tempfile.mkdtemp(prefix="hourglass_runs_"))
    configs = {arm: CONFIGS / f"{name}.yaml" for arm, name in CORPORA[args.corpus].items()}
    common = list(TINY) if args.tiny else []
    common += QUIET
    steps = args.steps or (6 if args.tiny else None)
    seq_len = args.seq_len or (64 if args.tiny else None)
    if steps:
        common += [f"train.steps={steps}", f"train.eval_every={max(steps // 30, 1)}"]
    if seq_len:
        ref = load_config(configs["gpt"])
        batch = 2 if args.tiny else max(ref.data.seq_len * ref.train.batch_size // seq_len, 1)
        common += [f"data.seq_len={seq_len}", f"model.max_seq_len={seq_len}", f"train.batch_size={batch}"]
    common += args.set
    base = {arm: load_config(path, common) for arm, path in configs.items()}
    min_lr_ratio = {arm: cfg.train.min_lr / cfg.train.lr for arm, cfg in base.items()}
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    out = Path(args.out)
    rows: list[dict] = []
    skipped: list[str] = []
    earlier: dict = {}
    if args.reuse:
        try:
            earlier = json.loads(Path(args.reuse).read_text())
        except (OSError, ValueError) as e:
            p.error(f"--reuse: cannot read {args.reuse}: {e}")
        rows = [{**r, "reused_from": r.get("reused_from") or args.reuse} for r in earlier.get("rows", [])
                if r.get("corpus") == args.corpus and r.get("role") in ("sweep", "seed", "variant")]
    extra: dict = {"settings": {"corpus": args.corpus, "configs": {a: str(c) for a, c in configs.items()},
                                "overrides": common, "lrs": lrs, "seeds": args.seeds, "variants": variants,
                                "reused_from": args.reuse, "reused_command": earlier.get("command")}}
    if args.tiny:
        extra["note"] = "CPU smoke test with tiny models: not a measurement"
    t_start = time.perf_counter()

    def fits() -> bool:
        longest = max((r["run_wall_s"] for r in rows), default=0.0)
        return not args.budget_s or time.perf_counter() - t_start + longest <= args.budget_s

    def train(arm: str, role: str, lr: float, seed: int, opts: dict | None = None, label: str = "") -> None:
        name = f"{args.corpus}_{label or arm}_lr{lr:g}_s{seed}"
        if any(r["name"] == name for r in rows):
            return
        if not fits():
            skipped.append(name)
            print(f"== skip {name} (budget)", flush=True)
            return
        overrides = [*common, f"train.lr={lr}", f"train.min_lr={lr * min_lr_ratio[arm]}", f"train.seed={seed}"]
        if opts:
            overrides.append(f"model.model_options={json.dumps(opts)}")
        print(f"== {name}", flush=True)
        row = run_one(name, configs[arm], overrides, runs_dir)
        rows.append({**row, "arm": arm, "role": role, "variant": label or None, "corpus": args.corpus})
        save()

    def save() -> Path:
        head, pairs = summarise(rows, lrs)
        params = [head["params_non_embedding_gpt"], head["params_non_embedding_hourglass"]]
        if all(params) and abs(params[1] / params[0] - 1) > PARAMS_TOLERANCE:
            head["params_warning"] = f"non-embedding parameters differ by more than {PARAMS_TOLERANCE:.0%}"
        gpt0 = tuned(rows, "gpt").get(0)
        for r in rows:
            if r["role"] == "variant" and gpt0:
                r.update({f"{k}_vs_gpt_seed0": v for k, v in compare(gpt0, r).items()})
        return write_result("hourglass", head, rows, device, out_dir=out.parent, filename=out.name,
                            extra={**extra, "pairs": pairs, "skipped": skipped})

    for arm, lr in cases(list(itertools.product(MODELS, lrs)), "hourglass sweep",
                         lambda c: f"next: {c[0]} lr {c[1]:g}"):
        train(arm, "sweep", lr, 0)
    for seed, arm in cases(list(itertools.product(range(1, args.seeds), MODELS)), "hourglass seeds",
                           lambda c: f"next: {c[1]} seed {c[0]}"):
        lr = best_lr(rows, arm)
        if lr is not None:
            train(arm, "seed", lr, seed)
    hg_lr = best_lr(rows, "hourglass")
    for name in cases(variants, "hourglass variants", lambda v: f"next: {v}"):
        if hg_lr is not None:
            opts = {**copy.deepcopy(base["hourglass"].model.model_options), **ABLATIONS[name]}
            train("hourglass", "variant", hg_lr, 0, opts, label=name)
    if earlier.get("profile") and not args.profile:
        extra["profile"] = {**earlier["profile"], "reused_from": args.reuse}
    if args.profile:
        if fits():
            try:
                extra["profile"] = profile(configs["hourglass"], common, runs_dir, configs["gpt"])
            except Exception as e:   # noqa: BLE001 - the training results stand; the failure is recorded
                extra["profile"] = {"error": f"{type(e).__name__}: {e}"}
        else:
            skipped.append("profile")
    path = save()
    print_table([{k: v for k, v in r.items() if k not in ("curve", "model_options")} for r in rows],
                ["name", "params_non_embedding", "lr", "seed", "best_val_loss", "train_s", "warmup_s",
                 "tokens_per_s", "peak_mem_gib"])
    print(json.dumps(json.loads(path.read_text())["headline"], indent=1))
    if "profile" in extra:
        print(json.dumps(extra["profile"], indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
