"""Everything ``modformer circuits RUN_DIR`` writes, for any model (and optionally its dataset).

``analyze(model, out_dir, data=None)`` writes into ``out_dir``:
  circuits.html            self-contained attention viewer of a sample text + the head table
  head_scores.json / .md   per-head detectors, composition scores, skip-trigrams (+ Fourier for modular +/-)
  plots/ov_eigenvalues.png, plots/composition.png (>= 2 layers), plots/head_scores.png, plots/fourier.png,
  plots/patterns.png (the best previous-token, induction and positional heads on a repeated random sequence)
and returns the JSON summary. Model kinds are read through ``views.circuit_view``: for an ``hourglass`` the
analyses cover its attention layers over tokens and the report's ``notes`` / ``skipped`` say what else is left out
and why (``views.py``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modformer.interp import circuits, composition, fourier, heads, viz
from modformer.interp.skip_trigrams import skip_trigrams
from modformer.interp.views import circuit_view, model_kind
from modformer.interp.weights import ModelWeights, extract_weights
from modformer.utils import atomic_write_text


def sample_tokens(model: nn.Module, data: Any = None, text: str | None = None, max_tokens: int = 64,
                  seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """A sample ``(1, T)`` and its token strings: ``text`` encoded, else a validation example, else random
    tokens repeated (which shows induction heads)."""
    max_len = getattr(model.position, "max_len", None) or max_tokens
    limit = min(max_tokens, max_len)
    idx = None
    if data is not None and text:
        idx = torch.tensor([data.encode(text)])
    elif data is not None:
        try:
            idx = next(iter(data.iter_eval("val", 1, 1)))[0][:1]
        except Exception:  # noqa: BLE001  (a dataset without a val split: fall back to random tokens)
            idx = None
    if idx is None or idx.shape[1] < 2:
        idx = heads.repeated_random_tokens(model.cfg.vocab_size, limit // 2, 1, seed)
    idx = idx[:, :limit]
    decode = (lambda i: data.decode([i])) if data is not None else str
    return idx, [decode(int(i)) for i in idx[0]]


def _modular_info(data: Any) -> tuple[int, int, torch.Tensor] | None:
    """(p, sign, train mask) for a modular +/- task, else None."""
    p, op = getattr(data, "p", None), getattr(data, "op", None)
    if p is None or op not in ("+", "-"):
        return None
    x, _ = data.get_batch("train", 0, torch.Generator())
    return p, 1 if op == "+" else -1, fourier.train_mask(x, p)


def _weight_analyses(w: ModelWeights, scores: dict, summary: dict, plots: Path, decode: Any,
                     n_trigrams: int) -> list[Path]:
    """Circuits that need per-head weights: eigenvalues, composition, skip-trigrams, positional QK."""
    if w.W_pos is not None:
        scores["pos_qk"] = circuits.positional_qk_strength(w, min(w.W_pos.shape[0], 256)).masked_fill(
            ~w.present().to(w.W_Q.device), float("nan")).cpu()
    files = [viz.plot_eigenvalues(circuits.ov_eigenvalues(w).cpu(), plots / "ov_eigenvalues.png", scores["copying"])]
    if w.n_layer >= 2:
        comp = composition.all_composition_scores(w)
        base = composition.composition_baseline(w.d_model, w.d_head)
        summary["composition"] = {m: s.tolist() for m, s in comp.items()}
        summary["composition_baseline"] = base
        summary["top_compositions"] = composition.top_compositions({m: s - base for m, s in comp.items()}, k=10)
        files.append(viz.plot_composition(comp, plots / "composition.png"))
    V = w.W_E.shape[0]
    if V <= 1 << 16:
        chunk = max(1, (1 << 22) // V)
        summary["skip_trigrams"] = {
            f"L0H{h}": [{"text": t.text(decode), "src": t.src, "dest": t.dest, "out": t.out,
                         "score": round(t.score, 3)} for t in skip_trigrams(w, 0, h, k=n_trigrams, chunk=chunk)]
            for h in range(w.head_counts[0] if w.head_counts else w.n_head)}
    return files


@torch.no_grad()
def analyze(model: nn.Module, out_dir: str | Path, data: Any = None, html: str | Path | None = None,
            text: str | None = None, title: str = "circuits", n_trigrams: int = 5) -> dict[str, Any]:
    """Run every analysis on ``model`` and write the files listed in the module docstring.

    Attention variants without fused per-head weights (mla, moa, ...) get the pattern-based analyses only.
    Model kinds are read through ``views.circuit_view``: a ``gpt`` as it is; an ``hourglass`` by its token-level
    layers (the JSON's ``model.layers`` maps each table layer to its module path, ``skipped`` lists the rest and
    why, ``notes`` says which analyses apply); a kind it cannot read raises a one-line ValueError naming it.
    """
    out = Path(out_dir)
    plots = out / "plots"
    view = circuit_view(model)
    view.eval()
    cfg = view.cfg
    notes = list(getattr(view, "notes", []))
    try:
        w: ModelWeights | None = extract_weights(view, fold_ln=True)
    except ValueError as e:
        w = None
        if not getattr(view, "weights_refused", None):          # a view that refuses says so in its notes
            notes.append(f"weight-based circuits skipped: {e}")
    else:
        notes += w.notes
    scores = heads.head_scores(view, w=w)
    summary: dict[str, Any] = {"model": {"kind": model_kind(model), "n_layer": cfg.n_layer, "n_head": cfg.n_head,
                                         "d_model": cfg.d_model, "d_head": cfg.head_dim, "vocab_size": cfg.vocab_size,
                                         "head_counts": [int(b.attn.n_head) for b in view.blocks]}, "notes": notes}
    if view is not model:
        summary["model"]["layers"] = view.describe()
        summary["skipped"] = view.skipped
    files = _weight_analyses(w, scores, summary, plots, data.decode if data is not None else None,
                             n_trigrams) if w is not None else []
    table = heads.head_table(scores, modules=getattr(view, "layer_names", None))
    summary["heads"] = table
    files.append(viz.plot_head_scores(scores, plots / "head_scores.png"))
    mod = _modular_info(data) if data is not None else None
    if mod is not None:
        p, sign, mask = mod
        summary["fourier"] = f = fourier.fourier_report(model, p, mask, sign=sign)
        files.append(viz.plot_fourier({"embedding": f["embedding_norms"], "logits": f["logit_norms"]},
                                      plots / "fourier.png", f["key_frequencies"]))
    files.append(probe_patterns(view, table, plots / "patterns.png"))
    idx, toks = sample_tokens(view, data, text)
    cache = heads.attention_patterns(view, idx.to(view.tok_emb.weight.device))
    pats = heads.stack_patterns(cache, cfg.n_layer)[:, 0].cpu()                 # (L, H, T, T)
    best = max(table, key=lambda r: r["induction"])
    html_path = Path(html) if html else out / "circuits.html"
    layers = f"{cfg.n_layer} token-level layers" if view is not model else f"{cfg.n_layer} layers"
    files.append(viz.attention_html(toks, pats, html_path, title=title, table=table,
                                    subtitle=f"{layers} x {cfg.n_head} heads; scores on repeated "
                                             "random tokens; copying = OV eigenvalue score",
                                    init_head=(best["layer"], best["head"])))
    summary["files"] = [str(f) for f in files] + [str(out / "head_scores.json"), str(out / "head_scores.md")]
    atomic_write_text(out / "head_scores.json", json.dumps(summary, indent=1))
    atomic_write_text(out / "head_scores.md", markdown(summary, title))
    return summary


@torch.no_grad()
def probe_patterns(model: nn.Module, table: list[dict], path: Path, length: int = 24) -> Path:
    """``plots/patterns.png``: on one sequence of ``length`` random tokens repeated, the patterns of the best
    previous-token head (below the last layer), the best induction head (layer >= 1: the stripe one after the
    earlier copy) and, when it is neither, the most positional head."""
    model = circuit_view(model)
    max_len = getattr(model.position, "max_len", None) or 2 * length
    length = min(length, max_len // 2)
    idx = heads.repeated_random_tokens(model.cfg.vocab_size, length, 1, seed=0)
    pats = heads.stack_patterns(heads.attention_patterns(model, idx.to(model.tok_emb.weight.device)),
                                model.cfg.n_layer)[:, 0].cpu()
    chosen: dict[str, Any] = {}
    L = model.cfg.n_layer
    where = {"prev_token": lambda i: i < max(L - 1, 1), "induction": lambda i: i >= 1, "positional": lambda i: True}
    for key, label in (("prev_token", "previous-token"), ("induction", "induction"), ("positional", "positional")):
        rows = [r for r in table if r.get(key) == r.get(key) and where[key](r["layer"])]   # skip NaN
        if not rows:
            continue
        best = max(rows, key=lambda r: r[key])
        name = best["name"]
        if name not in chosen:
            chosen[name] = (f"{name} {label} {best[key]:.2f}", pats[best["layer"], best["head"]])
    return viz.plot_patterns(dict(chosen.values()), path, boundary=length,
                             title=f"{length} random tokens, repeated (line: start of the repeat)")


def markdown(summary: dict[str, Any], title: str = "circuits") -> str:
    lines = [f"# {title}\n"]
    if summary.get("model", {}).get("layers"):
        lines += [f"## Layers read ({summary['model']['kind']})\n", "| layer | module | stage | attention |",
                  "|---|---|---|---|"]
        lines += [f"| L{r['layer']} | {r['module']} | {r['stage']} | {r['attention']} |"
                  for r in summary["model"]["layers"]]
        lines.append("")
    lines += ["## Heads\n", heads.table_markdown(summary["heads"])]
    if summary.get("top_compositions"):
        lines += [f"\n## Strongest compositions (minus random baseline {summary['composition_baseline']:.3f})\n",
                  "| mode | writer | reader | score |", "|---|---|---|---|"]
        lines += [f"| {r['mode'].upper()} | L{r['from'][0]}H{r['from'][1]} | L{r['to'][0]}H{r['to'][1]} | "
                  f"{r['score']:.3f} |" for r in summary["top_compositions"]]
    if summary.get("skip_trigrams"):
        lines.append("\n## Skip-trigrams (layer 0: source ... destination -> output)\n")
        for name, rows in summary["skip_trigrams"].items():
            lines.append(f"- {name}: " + "; ".join(f"`{r['text']}`" for r in rows))
    if summary.get("fourier"):
        f = summary["fourier"]
        lines += ["\n## Fourier (modular arithmetic)\n", f"- key frequencies (logits): {f['key_frequencies']}",
                  f"- key frequencies (embedding): {f['embedding_key_frequencies']}",
                  f"- loss {f['loss']:.4f}, restricted {f['restricted_loss']:.4f}, excluded {f['excluded_loss']:.4f}"]
    if summary.get("notes"):
        lines += ["\n## Notes\n"] + [f"- {n}" for n in summary["notes"]]
    if summary.get("skipped"):
        lines += ["\n## Skipped modules\n"] + [f"- {r['module']}: {r['reason']}" for r in summary["skipped"]]
    return "\n".join(lines) + "\n"
