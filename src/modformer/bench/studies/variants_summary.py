"""Issue 5's one table and one plot: the variants on modular addition and on WikiText-2 side by side.

Reads ``results/variants.json`` (``modformer bench variants``, modular addition) and
``results/variants_wikitext2.json`` (``modformer bench variants-lm``, WikiText-2 at a fixed token budget)
and writes ``results/variants_summary.json`` plus ``results/variants_summary.png`` (three panels: steps
to 99% on modular addition, WikiText-2 validation loss, KV-cache bytes per token of the WikiText-2 model).
Prints the Markdown table used in docs/studies/variants.md. Training tokens/s is the WikiText-2 model's measured
alone on the GPU (``variants_lm.py --speed-only``) when present.

    modformer bench variants-summary
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from modformer.bench.common import DEFAULT_OUT, RESULTS, write_result
from modformer.cli import HelpFormatter


def merge(modular: dict, lm: dict) -> list[dict]:
    """One row per variant present in either result (modular order first, then the LM-only rows)."""
    mod = {r["variant"]: r for r in modular["rows"]}
    wt = {r["variant"]: r for r in lm["rows"] if "final_val_loss" in r}
    rows = []
    for name in list(dict.fromkeys([*mod, *wt])):
        m, w = mod.get(name, {}), wt.get(name, {})
        rows.append({"variant": name,
                     "modular_steps_to_99": m.get("steps_to_99"), "modular_final_val_acc": m.get("final_val_acc"),
                     "wikitext2_val_loss": w.get("final_val_loss"), "wikitext2_val_ppl": w.get("final_val_word_ppl"),
                     "wikitext2_flops_per_token": w.get("flops_per_token"),
                     "kv_bytes_per_token": w.get("kv_bytes_per_token", m.get("kv_bytes_per_token")),
                     "wikitext2_tokens_per_s_alone": w.get("tokens_per_s_alone")})
    return rows


def fmt(v: object, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def table(rows: list[dict], budget: int) -> str:
    lines = ["| variant | modular: steps to 99% | modular: final acc | WikiText-2 val loss (ppl) | "
             "FLOPs/token | KV bytes/token | tokens/s alone |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        steps = str(r["modular_steps_to_99"]) if r["modular_steps_to_99"] else \
            (f"not in {budget}" if r["modular_final_val_acc"] is not None else "—")
        loss = "—" if r["wikitext2_val_loss"] is None else \
            f"{r['wikitext2_val_loss']:.3f} ({r['wikitext2_val_ppl']:.1f})"
        flops = fmt(r["wikitext2_flops_per_token"] and r["wikitext2_flops_per_token"] / 1e6, ".1f")
        lines.append(f"| {r['variant']} | {steps} | {fmt(r['modular_final_val_acc'], '.3f')} | {loss} | "
                     f"{flops}{'M' if flops != '—' else ''} | {fmt(r['kv_bytes_per_token'], '.0f')} | "
                     f"{fmt(r['wikitext2_tokens_per_s_alone'] and r['wikitext2_tokens_per_s_alone'] / 1e3, '.0f')}"
                     f"{'k' if r['wikitext2_tokens_per_s_alone'] else ''} |")
    return "\n".join(lines)


def plot(rows: list[dict], budget: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["variant"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(14, 0.32 * len(rows) + 1.8), sharey=True)
    steps = [r["modular_steps_to_99"] or (budget if r["modular_final_val_acc"] is not None else 0) for r in rows]
    bars = axes[0].barh(names, steps, color="tab:blue")
    for bar, r in zip(bars, rows):
        if not r["modular_steps_to_99"]:
            bar.set_color("tab:gray")
    axes[0].set_xlabel(f"modular addition: steps to 99% (gray: not within {budget} / not run)")
    axes[0].invert_yaxis()
    losses = [r["wikitext2_val_loss"] or 0 for r in rows]
    lo = min(v for v in losses if v) - 0.05
    axes[1].barh(names, [v - lo if v else 0 for v in losses], left=lo, color="tab:green")
    axes[1].set_xlabel("WikiText-2 validation loss (nats; lower is better)")
    axes[2].barh(names, [r["kv_bytes_per_token"] or 0 for r in rows], color="tab:orange")
    axes[2].set_xlabel("KV-cache bytes per token, WikiText-2 model (fp32, all layers)")
    fig.suptitle("attention / FFN variants at equal non-embedding parameters")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="modformer bench variants-summary", description=__doc__.splitlines()[0],
                                 formatter_class=HelpFormatter,
                                 epilog="examples:\n  modformer bench variants-summary --out benchmarks/results")
    ap.add_argument("--modular", default=str(RESULTS / "variants.json"),
                    help="the variants (modular addition) result JSON")
    ap.add_argument("--wikitext2", default=str(RESULTS / "variants_wikitext2.json"),
                    help="the variants-lm (WikiText-2) result JSON")
    ap.add_argument("--out", default=DEFAULT_OUT, help="result folder (benchmarks/results: the committed answer)")
    args = ap.parse_args(argv)
    modular, lm = json.loads(Path(args.modular).read_text()), json.loads(Path(args.wikitext2).read_text())
    rows = merge(modular, lm)
    budget = modular["settings"]["steps"]
    print(table(rows, budget))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    plot(rows, budget, Path(args.out) / "variants_summary.png")
    ok = [r for r in rows if r["wikitext2_val_loss"] is not None]
    best = min(ok, key=lambda r: r["wikitext2_val_loss"]) if ok else None
    grok = [r for r in rows if r["modular_steps_to_99"]]
    headline = {"wikitext2_best": best and best["variant"],
                "wikitext2_best_val_loss": best and best["wikitext2_val_loss"],
                "modular_fastest": min(grok, key=lambda r: r["modular_steps_to_99"])["variant"] if grok else None}
    device = f"{modular['device']} (modular) / {lm['device']} (WikiText-2)"
    path = write_result("variants_summary", headline, rows, device, out_dir=args.out,
                        extra={"sources": [args.modular, args.wikitext2]})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
