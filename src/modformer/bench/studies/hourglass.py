"""Hourglass vs vanilla GPT (issue 6): same parameter count, same tokens, context T=2048.

For each corpus (Tiny Shakespeare char, WikiText-2 word) this trains the GPT baseline
(``configs/hourglass_<corpus>_gpt.yaml``) and the hourglass (``configs/hourglass_<corpus>.yaml``) through
the Trainer, in this process, one run after another, and records per run: parameters (total and
non-embedding), FLOPs per token (``model.flops_per_token``), the validation curve against training
seconds (evaluation time excluded: ``evaluate`` is timed and subtracted) and against training FLOPs,
median training tokens/s and peak GPU memory. Then ablation rows (hourglass only, same data):
compression (last_k), upsampling (attention), local/global schedule, K and the shortening factor.

Headline (first corpus): ``val_loss_gpt`` / ``val_loss_hourglass`` (final), ``time_ratio_vs_gpt`` = GPT's
training seconds to its best val loss / the hourglass's training seconds to reach that loss (first
evaluation at or below it; null if never reached), ``flops_ratio_vs_gpt`` likewise in FLOPs,
``time_ratio_at_hourglass_best`` (the same ratio at the hourglass's best loss), ``time_ratio_vs_gpt_excl_warmup``
(both times minus each run's one-off start-up: torch.compile and autotuning, ``warmup_s``), plus the same keys suffixed
``_<corpus>`` for every corpus.

A full run (2 corpora x 12 rows of 5000 / 1300 steps at T=2048) takes hours; on a machine with a
per-command time limit run it in pieces (``--corpus shakespeare --only gpt,hourglass``, then ablations with
``--merge``), or shorten it with ``--steps`` (the cosine schedule is stretched to the given steps).

    modformer bench hourglass                                  # both corpora + ablations (H100: long)
    modformer bench hourglass --corpus shakespeare --only gpt,hourglass --merge   # a subset, merged
    modformer bench hourglass --tiny --out /tmp/hg.json         # CPU smoke test (tiny models, a few steps)

Options: ``--corpus`` (shakespeare,wikitext2), ``--only`` (comma list of row names: gpt, hourglass and
the ablation names below), ``--steps`` / ``--seq-len`` (batch scaled to keep tokens per step),
``--set key=value`` (repeatable; applied to every run), ``--compile`` (torch.compile both), ``--merge``
(keep rows of an existing ``--out`` file that this call does not rerun), ``--runs-dir``.
Results: ``OUT/hourglass.json`` (``--out``). Each run is one process-local Trainer, so
run it on an otherwise idle GPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from modformer.bench.common import CONFIGS, DEFAULT_OUT, print_table, write_result
from modformer.config import load_config
from modformer.saving import unwrap
from modformer.train.logging import read_metrics, steady_tokens_per_s, warmup_seconds
from modformer.train.trainer import Trainer

CORPORA = {"shakespeare": "hourglass_shakespeare", "wikitext2": "hourglass_wikitext2"}

# hourglass ablations: overrides of model.model_options (parameter counts stay within a few % of the base,
# which each row reports)
ABLATIONS: dict[str, dict] = {
    "last_k": {"compression": "last_k"},
    "attention_upsampling": {"upsampling": "attention"},
    "local_tokens": {"schedule": "local"},                  # token layers attend within groups of 4 only
    "alternate_2x2": {"schedule": "alternate", "encoder_layers": [2, 0], "decoder_layers": [2],
                      "latent_layers": 3},                  # local, global token layers on each side
    "local_first_2x2": {"schedule": "local_first", "encoder_layers": [2, 0], "decoder_layers": [2],
                        "latent_layers": 3},
    "k2_g8": {"group_len": 8, "n_latents": 2},              # same latent length, 2 latents per 8 tokens
    "g8": {"group_len": 8},                                 # shorten by 8
    "g2": {"group_len": 2},                                 # shorten by 2
    "latent_loss": {"latent_loss": 0.1},
    "two_levels": {"levels": 2, "group_len": [2, 2], "n_latents": [1, 1], "encoder_layers": [1, 0, 0],
                   "decoder_layers": [1, 0]},
}
TINY = ["model.d_model=32", "model.n_head=2", "model.n_layer=2", "train.eval_batches=2", "train.log_every=1",
        "train.device=cpu", "train.threads=1", "train.sample_tokens=0"]


def run_one(name: str, config: Path, overrides: list[str], args: argparse.Namespace) -> dict:
    """Train one configuration; return its row (with the timed validation curve)."""
    cfg = load_config(config, overrides)
    cfg.name, cfg.out_dir = name, str(args.runs_dir)
    trainer = Trainer(cfg, overwrite=True)
    device = trainer.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    curve: list[dict] = []
    eval_seconds = [0.0]
    evaluate = trainer.evaluate
    t0 = time.perf_counter()

    def timed_evaluate(split: str, max_batches: int | None = None) -> dict:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = evaluate(split, max_batches)
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
    warmup = warmup_seconds(train_rows, batch * seq)      # torch.compile / autotuning in the first log window
    best = min(curve, key=lambda p: p["loss"]) if curve else None
    return {"name": name, "model": cfg.model.model, "model_options": cfg.model.model_options,
            "params": model.num_params(), "params_non_embedding": model.num_params(non_embedding=True),
            "flops_per_token": fpt, "seq_len": seq, "batch_size": batch, "steps": trainer.step,
            "tokens": trainer.step * batch * seq,
            "val_loss": curve[-1]["loss"] if curve else None, "best_val_loss": best["loss"] if best else None,
            "train_s": curve[-1]["train_s"] if curve else None, "eval_s": eval_seconds[0], "warmup_s": warmup,
            "tokens_per_s": steady_tokens_per_s(train_rows),
            "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None,
            "curve": curve}


def first_reach(curve: list[dict], target: float, key: str) -> float | None:
    """``key`` (train_s or flops) at the first evaluation with loss <= target."""
    for p in curve:
        if p["loss"] <= target + 1e-9:
            return p[key]
    return None


def run_warmup(row: dict) -> float:
    """One-off start-up time inside the first training seconds (torch.compile, autotuning): the row's
    ``warmup_s``, or for older rows the first evaluation interval's excess over the median interval."""
    if row.get("warmup_s") is not None:
        return row["warmup_s"]
    c = row["curve"]
    if len(c) < 3:
        return 0.0
    per_step = statistics.median((b["train_s"] - a["train_s"]) / (b["step"] - a["step"]) for a, b in zip(c, c[1:]))
    return max(c[0]["train_s"] - per_step * c[0]["step"], 0.0)


def compare(gpt: dict, hg: dict) -> dict:
    target = gpt["best_val_loss"]
    t_gpt, t_hg = first_reach(gpt["curve"], target, "train_s"), first_reach(hg["curve"], target, "train_s")
    w_gpt, w_hg = run_warmup(gpt), run_warmup(hg)
    f_gpt, f_hg = first_reach(gpt["curve"], target, "flops"), first_reach(hg["curve"], target, "flops")
    # if the hourglass never reaches GPT's best loss: how much sooner GPT reaches the hourglass's best
    own = hg["best_val_loss"]
    t_gpt_own, t_hg_own = first_reach(gpt["curve"], own, "train_s"), first_reach(hg["curve"], own, "train_s")
    return {"target_loss": target, "val_loss_gpt": gpt["val_loss"], "val_loss_hourglass": hg["val_loss"],
            "time_ratio_vs_gpt": t_gpt / t_hg if t_gpt and t_hg else None,
            "time_ratio_vs_gpt_excl_warmup": (t_gpt - w_gpt) / (t_hg - w_hg) if t_gpt and t_hg else None,
            "warmup_s_gpt": w_gpt, "warmup_s_hourglass": w_hg,
            "time_ratio_at_hourglass_best": t_gpt_own / t_hg_own if t_gpt_own and t_hg_own else None,
            "flops_ratio_vs_gpt": f_gpt / f_hg if f_gpt and f_hg else None,
            "tokens_per_s_ratio_vs_gpt": hg["tokens_per_s"] / gpt["tokens_per_s"]
            if hg["tokens_per_s"] and gpt["tokens_per_s"] else None}


def best_variant(done: dict[str, dict], gpt: dict | None) -> dict | None:
    """Without a base ``hourglass`` row (an ablation-only call): the variant that reached GPT's loss soonest."""
    rows = [r for name, r in done.items() if name != "gpt" and r.get("time_ratio_vs_gpt")] if gpt else []
    return max(rows, key=lambda r: r["time_ratio_vs_gpt"]) if rows else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="modformer bench hourglass", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default="shakespeare,wikitext2")
    p.add_argument("--only", default=None, help="comma list of rows: gpt, hourglass, " + ", ".join(ABLATIONS))
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None, help="context (default 2048); batch keeps tokens/step")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny models, 6 steps, T=64")
    p.add_argument("--merge", action="store_true")
    p.add_argument("--out", default=f"{DEFAULT_OUT}/hourglass.json")
    p.add_argument("--runs-dir", default=None)
    args = p.parse_args(argv)
    args.runs_dir = Path(args.runs_dir or tempfile.mkdtemp(prefix="hourglass_runs_"))
    if args.tiny:
        args.steps = args.steps or 6
        args.seq_len = args.seq_len or 64
    wanted = None if args.only is None else set(args.only.split(","))
    unknown = (wanted or set()) - {"gpt", "hourglass", *ABLATIONS}
    if unknown:
        sys.exit(f"--only: unknown rows {sorted(unknown)}")
    out = Path(args.out)
    old = json.loads(out.read_text()) if args.merge and out.is_file() else {"rows": []}
    rows: list[dict] = []
    headline: dict = {}
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    for corpus in args.corpus.split(","):
        base = CORPORA[corpus]
        common = list(TINY) if args.tiny else []
        common += ["train.checkpoint_every=0", "train.progress=false", "train.tensorboard=false"]
        if args.steps:
            common.append(f"train.steps={args.steps}")
            common.append(f"train.eval_every={max(args.steps // 6, 1)}")
        if args.seq_len:
            ref = load_config(CONFIGS / f"{base}.yaml")
            tokens = ref.data.seq_len * ref.train.batch_size
            batch = 2 if args.tiny else max(tokens // args.seq_len, 1)
            common += [f"data.seq_len={args.seq_len}", f"model.max_seq_len={args.seq_len}",
                       f"train.batch_size={batch}"]
        if args.compile:
            common.append("train.compile=true")
        common += args.set
        jobs = [("gpt", CONFIGS / f"{base}_gpt.yaml", []),
                ("hourglass", CONFIGS / f"{base}.yaml", [])]
        hg_opts = load_config(CONFIGS / f"{base}.yaml", common).model.model_options
        for name, change in ABLATIONS.items():
            opts = {**copy.deepcopy(hg_opts), **change}
            jobs.append((name, CONFIGS / f"{base}.yaml", opts))
        done: dict[str, dict] = {}
        for name, config, opts in jobs:
            if wanted is not None and name not in wanted:
                continue
            overrides = list(common)
            if opts:
                overrides.append(f"model.model_options={json.dumps(opts)}")
            print(f"== {corpus} / {name}", flush=True)
            row = run_one(f"{corpus}_{name}", config, overrides, args)
            row["corpus"] = corpus
            done[name] = row
            rows.append(row)
        prev = {r["name"]: r for r in old["rows"] if r.get("corpus") == corpus}
        gpt = done.get("gpt") or prev.get(f"{corpus}_gpt")
        if gpt:
            for row in done.values():
                if row is not gpt:
                    row.update({k: v for k, v in compare(gpt, row).items() if "ratio" in k})
        hg = done.get("hourglass") or prev.get(f"{corpus}_hourglass") or best_variant(done, gpt)
        if gpt and hg:
            cmp = {**compare(gpt, hg), "hourglass_row": hg["name"]}
            for key, value in cmp.items():
                headline[f"{key}_{corpus}"] = value
                if corpus == args.corpus.split(",")[0]:
                    headline[key] = value
    names = {r["name"] for r in rows}
    rows = [r for r in old["rows"] if r["name"] not in names] + rows
    headline = {**old.get("headline", {}), **headline}
    extra = {"note": "CPU smoke test with tiny models: not a measurement"} if args.tiny else None
    path = write_result("hourglass", headline, rows, device, out_dir=out.parent, extra=extra, filename=out.name)
    print_table([{k: v for k, v in r.items() if k not in ("curve", "model_options")} for r in rows],
                ["name", "params_non_embedding", "flops_per_token", "val_loss", "best_val_loss", "train_s",
                 "tokens_per_s", "peak_mem_gib", "time_ratio_vs_gpt"])
    print(json.dumps(headline, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
