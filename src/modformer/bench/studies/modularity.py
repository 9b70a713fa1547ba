"""Modularity proxies per attention variant (issue 29): heads needed under ablation, Fourier sparsity, OV rank.

"More modular internal representations" made measurable on the grokking task (modular addition, p=113,
30% of the pairs for training, ``configs/grokking.yaml``'s model and recipe with early stop at 99% val
accuracy). For each attention variant x seed the model is trained with the Trainer; a run that does not reach
the target is reported as such and left out of the proxies. On each generalising run:

1. heads needed: heads are **mean-ablated** (their ``hook_z`` output replaced by its mean over all p^2 inputs,
   per head and position) greedily, each round removing the head whose removal keeps held-out accuracy the
   highest, while held-out accuracy stays >= ``--keep-acc`` (0.9). Reported: the heads left (fewer = the
   behaviour lives in fewer heads = more modular) and the share of heads removed. Because that count saturates
   when every head matters, also the effective number of heads: exp(entropy) of the single-head ablation
   damage (base accuracy minus accuracy with that head alone mean-ablated) over heads.
2. Fourier sparsity (Nanda et al. 2023, ``modformer.interp.fourier``): the number of key frequencies of the
   token embedding and of the logits (energy > 10 x the median frequency's), the share of the embedding's
   Fourier energy (frequencies >= 1) in its key frequencies, and the restricted loss (logits projected on the
   logits' key frequencies) over all pairs.
3. OV effective rank (Roy & Vetterli 2007, exp of the singular-value entropy) of each head's W_V W_O, averaged
   over heads: variants whose values come straight from per-head projections (mha, gqa, talking_heads); None
   for others (mla's values come out of a shared latent).

Headline: median and range (min, max) over seeds per variant and proxy, and the "most modular" variant per
proxy, resolved only when the best variant's seed range [min, max] overlaps no other variant's range.

    modformer bench modularity --out benchmarks/results      # -> OUT/modularity.json
    modformer bench modularity --tiny --out /tmp/mod          # smoke test (seconds)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from modformer.bench.common import CONFIGS, DEFAULT_OUT, cases, parse_with_preset, print_table, write_result
from modformer.cli import HelpFormatter
from modformer.compress.importance import head_counts
from modformer.config import load_config
from modformer.interp import fourier

# name -> ModelConfig overrides on top of configs/grokking.yaml's model (2 layers, 4 heads, no norm)
VARIANTS: dict[str, dict] = {
    "mha": {},
    "gqa": {"attention": "gqa", "n_kv_heads": 2},
    "talking_heads": {"attention": "talking_heads"},
    # mla with a 32-wide KV latent: the default (64) does not grok within 600 steps of this recipe
    # (benchmarks/results/variants.json: mla 0.573 val acc, mla_r32 99% at step 390)
    "mla": {"attention": "mla", "attention_options": {"kv_lora_rank": 32}},
}
Head = tuple[int, int]


# ---- greedy head ablation ------------------------------------------------------------------------------

def greedy_head_ablation(score: Callable[[frozenset[Head]], float], heads: Sequence[Head],
                         threshold: float) -> dict:
    """Remove heads one at a time, least important first, while ``score`` stays >= ``threshold``.

    ``score(ablated)`` is the metric with the heads in ``ablated`` removed. Each round tries removing every
    remaining head and keeps the removal with the highest score (ties: the first head in ``heads`` order);
    it stops when no single further removal keeps the score at the threshold. Returns ``kept`` (the heads
    still needed), ``removed`` (in removal order), ``scores`` (the score after each removal), ``base`` (nothing
    removed) and ``needed`` = len(kept). If the intact model is already below the threshold, nothing is removed
    and every head counts as needed."""
    removed: list[Head] = []
    scores: list[float] = []
    base = float(score(frozenset()))
    remaining = list(heads)
    if base >= threshold:
        while remaining:
            trials = [(float(score(frozenset([*removed, h]))), -i, h) for i, h in enumerate(remaining)]
            best, _, head = max(trials)
            if best < threshold:
                break
            removed.append(head)
            scores.append(best)
            remaining.remove(head)
    return {"base": base, "kept": remaining, "removed": removed, "scores": scores, "needed": len(remaining)}


def effective_heads(base: float, single: Sequence[float]) -> float:
    """exp(entropy) of the single-head ablation damage ``max(0, base - acc_h)`` normalised over heads: 1 when one
    head carries all the damage, H when every head costs the same (0 when no ablation costs anything)."""
    d = torch.tensor([max(0.0, base - a) for a in single], dtype=torch.float64)
    if d.sum() <= 0:
        return 0.0
    q = d / d.sum()
    q = q[q > 0]
    return float(torch.exp(-(q * q.log()).sum()))


@torch.no_grad()
def mean_z(model: nn.Module, inputs: Tensor) -> dict[int, Tensor]:
    """Per layer, the mean of ``hook_z`` ``(H, T, Dh)`` over ``inputs``."""
    names = [f"blocks.{i}.attn.hook_z" for i in range(len(model.blocks))]
    _, cache = model.run_with_cache(inputs, names_filter=names)
    return {i: cache[n].float().mean(0) for i, n in enumerate(names)}


def ablated_logits(model: nn.Module, inputs: Tensor, ablated: frozenset[Head], means: dict[int, Tensor] | None,
                   batch: int = 4096) -> Tensor:
    """Final-position logits with the ``ablated`` heads' ``hook_z`` replaced by ``means`` (zeros when None)."""
    hooks = []
    for layer in sorted({layer for layer, _ in ablated}):
        hs = [h for lay, h in ablated if lay == layer]

        def fn(z: Tensor, _hook: object, hs: list[int] = hs, layer: int = layer) -> Tensor:
            z = z.clone()
            z[:, hs] = means[layer][hs].to(z.dtype) if means is not None else 0
            return z
        hooks.append((f"blocks.{layer}.attn.hook_z", fn))
    with torch.no_grad():
        return torch.cat([model.run_with_hooks(inputs[i:i + batch], hooks)[:, -1]
                          for i in range(0, len(inputs), batch)])


# ---- Fourier sparsity and OV rank ------------------------------------------------------------------------

def effective_rank(m: Tensor) -> float:
    """exp(entropy of the normalised singular values) (Roy & Vetterli 2007): 1 for rank one, r for r equal ones."""
    s = torch.linalg.svdvals(m.double())
    p = s / s.sum().clamp_min(1e-30)
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def ov_effective_rank(model: nn.Module) -> float | None:
    """Mean over heads of the effective rank of W_V^h W_O^h ``(D, D)``; None unless the attention has a fused
    ``qkv`` and an ``out`` projection with per-head values (mha / gqa / mqa / talking_heads)."""
    ranks = []
    for block in model.blocks:
        attn = block.attn
        if not (hasattr(attn, "qkv") and hasattr(attn, "out") and hasattr(attn, "n_kv_heads")):
            return None
        H, Hkv, Dh = attn.n_head, attn.n_kv_heads, attn.head_dim
        w_v = attn.qkv.weight[(H + Hkv) * Dh:].view(Hkv, Dh, -1)          # (Hkv, Dh, D)
        w_o = attn.out.weight.view(-1, H, Dh)                               # (D, H, Dh)
        for h in range(H):
            ranks.append(effective_rank((w_o[:, h] @ w_v[h // (H // Hkv)]).detach()))
    return statistics.fmean(ranks)


def fourier_proxies(model: nn.Module, p: int, mask: Tensor) -> dict:
    rep = fourier.fourier_report(model, p, mask)
    energy = torch.tensor(rep["embedding_norms"][1:]).double().pow(2)
    keys = rep["embedding_key_frequencies"]
    share = float(energy[[k - 1 for k in keys]].sum() / energy.sum()) if keys else 0.0
    return {"embedding_key_frequencies": keys, "n_embedding_key_freqs": len(keys),
            "embedding_key_energy_share": share, "logit_key_frequencies": rep["key_frequencies"],
            "n_logit_key_freqs": len(rep["key_frequencies"]), "restricted_loss": rep["restricted_loss"],
            "loss": rep["loss"], "test_loss": rep.get("test_loss")}


# ---- one run ---------------------------------------------------------------------------------------------

def train_run(variant: str, seed: int, args: argparse.Namespace, runs_dir: Path) -> dict:
    from modformer.train.trainer import Trainer

    run = load_config(CONFIGS / "grokking.yaml")
    run.name, run.out_dir = f"{variant}_seed{seed}", str(runs_dir)
    for k, v in VARIANTS[variant].items():
        setattr(run.model, k, copy.deepcopy(v))
    run.model.vocab_size = args.modulus + 1
    run.data.options = {**run.data.options, "p": args.modulus, "train_fraction": args.train_fraction, "seed": seed}
    t = run.train
    t.steps, t.seed, t.threads, t.device = args.steps, seed, args.threads, "cpu"
    t.progress = t.tensorboard = False
    t.eval_every = t.log_every = args.eval_every
    t.checkpoint_every = 0
    t.early_stop_target = args.target
    t0 = time.perf_counter()
    trainer = Trainer(run, overwrite=True)
    summary = trainer.fit()
    wall = time.perf_counter() - t0
    model = trainer.raw_model.eval()
    p = args.modulus
    mask = fourier.train_mask(trainer.data._x["train"], p)
    inputs = fourier.modular_inputs(p)
    labels = fourier._labels(p, 1)
    held_out = ~mask.flatten()

    def acc(ablated: frozenset[Head], means: dict | None) -> float:
        logits = ablated_logits(model, inputs, ablated, means)[:, :p]
        return float((logits.argmax(-1) == labels)[held_out].float().mean())

    full_acc = acc(frozenset(), None)
    row = {"variant": variant, "seed": seed, "attention": run.model.attention,
           "params": model.num_params(), "steps": summary["steps"], "steps_to_target": summary.get("first_target_step"),
           "train_seconds": wall, "held_out_acc": full_acc}
    row["generalised"] = row["steps_to_target"] is not None and full_acc >= args.target
    if not row["generalised"]:
        return row
    heads = [(layer, h) for layer, n in enumerate(head_counts(model)) for h in range(n)]
    means = mean_z(model, inputs)
    greedy = greedy_head_ablation(lambda ab: acc(ab, means), heads, args.keep_acc)
    single = {f"{layer}.{h}": acc(frozenset([(layer, h)]), means) for layer, h in heads}
    row.update({"n_heads": len(heads), "heads_needed": greedy["needed"],
                "heads_removed_share": len(greedy["removed"]) / len(heads),
                "effective_heads": effective_heads(full_acc, list(single.values())),
                "heads_kept": [f"{layer}.{h}" for layer, h in greedy["kept"]],
                "removal_order": [f"{layer}.{h}" for layer, h in greedy["removed"]],
                "acc_after_removals": greedy["scores"], "single_head_ablation_acc": single,
                **fourier_proxies(model, p, mask), "ov_effective_rank": ov_effective_rank(model)})
    return row


# ---- headline --------------------------------------------------------------------------------------------

# proxy -> True when a smaller value means "more modular"
PROXIES = {"heads_needed": True, "effective_heads": True, "n_embedding_key_freqs": True, "n_logit_key_freqs": True,
           "embedding_key_energy_share": False, "restricted_loss": True, "ov_effective_rank": True}


def summarise(rows: list[dict], variants: list[str]) -> dict:
    per: dict[str, dict] = {}
    for v in variants:
        vr = [r for r in rows if r["variant"] == v]
        ok = [r for r in vr if r.get("generalised")]
        entry: dict = {"runs": len(vr), "generalised": len(ok),
                       "steps_to_target_median": statistics.median([r["steps_to_target"] for r in ok]) if ok else None}
        for key in PROXIES:
            vals = [r[key] for r in ok if r.get(key) is not None]
            entry[key] = ({"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}
                          if vals else None)
        per[v] = entry
    most: dict[str, dict] = {}
    for key, lower in PROXIES.items():
        have = {v: e[key] for v, e in per.items() if e[key] is not None}
        if not have:
            continue
        sign = 1 if lower else -1
        best = min(have, key=lambda v: sign * have[v]["median"])
        b = have[best]["median"]
        # resolved only if the best variant's seed range overlaps no other variant's range (strict: a median
        # outside the others' ranges is not enough when the best's own seeds reach into them)
        lo, hi = have[best]["min"], have[best]["max"]
        overlap = [v for v, s in have.items() if v != best and s["min"] <= hi and lo <= s["max"]]
        most[key] = {"variant": best, "median": b, "lower_is_more_modular": lower,
                     "within_seed_spread_of": sorted(overlap), "resolved": not overlap and len(have) > 1}
    winners = {m["variant"] for m in most.values()}
    return {"per_variant": per, "most_modular": most, "proxies_agree": len(winners) == 1,
            "resolved_proxies": sorted(k for k, m in most.items() if m["resolved"])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="modformer bench modularity", description=__doc__.splitlines()[0],
                                 formatter_class=HelpFormatter,
                                 epilog=("examples:\n"
                                         "  modformer bench modularity --out benchmarks/results\n"
                                         "  modformer bench modularity --variants mha mla --seeds 0 1 --threads 1\n"
                                         "  modformer bench modularity --tiny --out /tmp/mod"))
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                    help="attention variants to compare (model overrides on configs/grokking.yaml)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                    help="seeds per variant (each seeds the init, the data split and the batches)")
    ap.add_argument("--steps", type=int, default=1000, help="training step budget (early stop at --target)")
    ap.add_argument("--eval-every", type=int, default=10, help="steps between validation evaluations")
    ap.add_argument("--target", type=float, default=0.99,
                    help="val accuracy that stops training; runs below it on the held-out pairs are excluded")
    ap.add_argument("--keep-acc", type=float, default=0.9,
                    help="held-out accuracy the greedy head ablation must keep")
    ap.add_argument("--p", dest="modulus", type=int, default=113, help="modulus of the addition task")
    ap.add_argument("--train-fraction", type=float, default=0.3, help="share of all pairs used for training")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads per run")
    ap.add_argument("--tiny", action="store_true",
                    help="smoke preset: mha and mla, one seed, p=23, 30 steps, targets 0 (every run counts; seconds)")
    ap.add_argument("--runs-dir", default=None, help="folder for the training runs (default: a temporary folder)")
    ap.add_argument("--out", default=DEFAULT_OUT, help="result folder (benchmarks/results: the committed answer)")
    args = parse_with_preset(ap, argv, "--tiny", **{"variants": ["mha", "mla"], "seeds": [0], "steps": 30,
                                                    "modulus": 23,
                                                    "train_fraction": 0.5, "eval_every": 10, "target": 0.0,
                                                    "keep_acc": 0.0})
    torch.set_num_threads(args.threads)
    runs_dir = Path(args.runs_dir or tempfile.mkdtemp(prefix="modularity-"))
    jobs = [(v, s) for v in args.variants for s in args.seeds]
    rows = []
    cols = ["variant", "seed", "generalised", "steps_to_target", "held_out_acc", "heads_needed", "effective_heads",
            "n_embedding_key_freqs", "embedding_key_energy_share", "n_logit_key_freqs", "restricted_loss",
            "ov_effective_rank", "train_seconds"]
    for v, s in cases(jobs, "modularity", lambda j: f"next: {j[0]} seed {j[1]}"):
        rows.append(train_run(v, s, args, runs_dir))
        print_table([rows[-1]], cols)
    headline = summarise(rows, args.variants)
    headline.update({"seeds": args.seeds, "p": args.modulus, "keep_acc": args.keep_acc, "target": args.target,
                     "ablation": "mean (hook_z replaced by its mean over all p^2 inputs, per head and position)"})
    print_table(rows, cols)
    for key, m in headline["most_modular"].items():
        spread = ", ".join(m["within_seed_spread_of"]) or "no other variant with data"
        print(f"most modular by {key}: {m['variant']} (median {m['median']:.4g}; "
              f"{'resolved' if m['resolved'] else 'not resolved: ' + spread})")
    path = write_result("modularity", headline, rows, torch.device("cpu"), args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

