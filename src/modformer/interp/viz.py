"""Visualisation: a self-contained attention HTML page and PNG plots (eigenvalues, composition, head scores).

``attention_html`` writes one HTML file with its data, CSS and JavaScript inline (no network access):
the text as tokens, a layer x head grid to pick a head, and hovering a token shades the tokens it
attends to (or, in "from" mode, the tokens attending to it); click pins the token. The selected head's
full pattern is drawn as a heatmap, and the per-head score table sits below (click a row to select).
``page.html#L1H0:t13`` opens with head L1H0 selected and token 13 pinned.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import torch
from torch import Tensor

from modformer.utils import atomic_write, atomic_write_text

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 16px;
       color: #222; background: #fafafa; }
h1 { font-size: 18px; margin: 0 0 8px; }
.sub { color: #666; font-size: 12px; margin-bottom: 10px; }
label { font-size: 12px; margin-right: 10px; }
#grid { display: inline-grid; gap: 3px; margin: 6px 0; }
#grid button { font: 11px monospace; padding: 3px 5px; border: 1px solid #bbb; background: #fff;
               cursor: pointer; border-radius: 3px; }
#grid button.sel { background: #2b6cb0; color: #fff; border-color: #2b6cb0; }
#grid .lab { font: 11px monospace; color: #666; align-self: center; }
#info { font: 12px monospace; color: #444; min-height: 16px; }
#row { display: flex; gap: 18px; align-items: flex-start; flex-wrap: wrap; margin-top: 10px; }
#text { font: 14px/2.1 monospace; background: #fff; border: 1px solid #ddd; padding: 10px;
        border-radius: 4px; max-width: 1100px; }
#text span { display: inline-block; padding: 0 1px; margin: 1px; border-radius: 3px; cursor: pointer;
              white-space: pre; line-height: 1.5; }
#text span.focus { outline: 2px solid #c05621; }
#text span.pin { outline: 2px solid #9b2c2c; }
canvas { border: 1px solid #ccc; image-rendering: pixelated; background: #fff; }
table { border-collapse: collapse; font: 12px monospace; margin-top: 10px; }
td, th { border: 1px solid #ddd; padding: 2px 6px; text-align: right; }
tbody tr { cursor: pointer; }
tr.sel td { background: #ebf4ff; }
"""

_JS = """
const D = JSON.parse(document.getElementById('data').textContent);
const T = D.tokens.length;
let L = 0, H = 0, focus = null, pinned = null, mode = 'to';
const $ = (id) => document.getElementById(id);
const weight = (P, f, i) => (mode === 'to' ? P[f][i] : P[i][f]) || 0;

function buildGrid() {
  const g = $('grid');
  g.style.gridTemplateColumns = `auto repeat(${D.n_head}, auto)`;
  for (let l = 0; l < D.n_layer; l++) {
    const lab = document.createElement('span');
    lab.className = 'lab';
    lab.textContent = 'layer ' + l;
    g.appendChild(lab);
    for (let h = 0; h < D.n_head; h++) {
      const b = document.createElement('button');
      b.textContent = 'L' + l + 'H' + h;
      b.id = 'b' + l + '_' + h;
      b.title = D.head_titles[l][h] || '';
      b.onclick = () => select(l, h);
      g.appendChild(b);
    }
  }
}

function buildText() {
  D.tokens.forEach((s, i) => {
    const e = document.createElement('span');
    e.textContent = s.replace(/\\n/g, '\\u21b5').replace(/\\t/g, '\\u2192');
    e.title = i + ': ' + JSON.stringify(s);
    e.id = 't' + i;
    e.onmouseenter = () => { focus = i; paint(); };
    e.onmouseleave = () => { focus = null; paint(); };
    e.onclick = () => { pinned = (pinned === i ? null : i); paint(); };
    $('text').appendChild(e);
  });
}

function select(l, h) {
  L = l; H = h;
  document.querySelectorAll('#grid button').forEach((b) => b.classList.remove('sel'));
  $('b' + l + '_' + h).classList.add('sel');
  document.querySelectorAll('tbody tr').forEach((r) =>
    r.classList.toggle('sel', r.dataset.l == l && r.dataset.h == h));
  drawMatrix();
  paint();
}

function paint() {
  const f = focus !== null ? focus : pinned;
  const P = D.patterns[L][H];
  let best = -1, bv = -1;
  for (let i = 0; i < T; i++) {
    const e = $('t' + i);
    const a = f === null ? 0 : weight(P, f, i);
    if (a > bv) { bv = a; best = i; }
    e.style.background = f === null ? 'transparent' : `rgba(49, 130, 206, ${Math.min(1, a).toFixed(3)})`;
    e.style.color = a > 0.6 ? '#fff' : '#222';
    e.classList.toggle('focus', i === focus);
    e.classList.toggle('pin', i === pinned);
  }
  $('info').textContent = f === null ? `L${L}H${H}: hover a token (click to pin)` :
    `L${L}H${H} token ${f} "${D.tokens[f]}" ` + (mode === 'to' ? 'attends most to' : 'is attended most by') +
    ` ${best} "${D.tokens[best]}" (${bv.toFixed(3)})`;
}

function drawMatrix() {
  const c = $('mat');
  const s = Math.max(2, Math.floor(360 / T));
  c.width = c.height = s * T;
  const x = c.getContext('2d');
  x.fillStyle = '#fff';
  x.fillRect(0, 0, c.width, c.height);
  const P = D.patterns[L][H];
  for (let i = 0; i < T; i++) {
    for (let j = 0; j < T; j++) {
      const a = P[i][j] || 0;
      if (a <= 0) continue;
      x.fillStyle = `rgba(49, 130, 206, ${Math.min(1, a)})`;
      x.fillRect(j * s, i * s, s, s);
    }
  }
}

function buildTable() {
  const t = $('scores');
  if (!D.table.length) { t.style.display = 'none'; return; }
  const keys = Object.keys(D.table[0]).filter((k) => k !== 'layer' && k !== 'head');
  t.createTHead().innerHTML = '<tr>' + keys.map((k) => `<th>${k}</th>`).join('') + '</tr>';
  const body = t.createTBody();
  D.table.forEach((r) => {
    const tr = body.insertRow();
    tr.dataset.l = r.layer;
    tr.dataset.h = r.head;
    const cell = (v) => (typeof v === 'number' ? v.toFixed(3) : v === null ? 'n/a' : v);
    tr.innerHTML = keys.map((k) => `<td>${cell(r[k])}</td>`).join('');
    tr.onclick = () => select(r.layer, r.head);
  });
}

document.querySelectorAll('input[name=mode]').forEach((r) => { r.onchange = () => { mode = r.value; paint(); }; });
buildGrid();
buildText();
buildTable();
// optional deep link: page.html#L1H0:t13 selects head L1H0 and pins token 13
const m = /^#L(\\d+)H(\\d+)(?::t(\\d+))?$/.exec(location.hash);
if (m && +m[1] < D.n_layer && +m[2] < D.n_head) {
  if (m[3] !== undefined && +m[3] < T) pinned = +m[3];
  select(+m[1], +m[2]);
} else {
  select(D.init[0], D.init[1]);
}
"""


def attention_html(tokens: list[str], patterns: Tensor | list, path: str | Path, title: str = "attention",
                   table: list[dict] | None = None, subtitle: str = "", init_head: tuple[int, int] = (0, 0),
                   decimals: int = 3) -> Path:
    """Write the self-contained page. ``patterns`` ``(L, H, T, T)`` (one sequence); ``table`` per-head rows."""
    pats = torch.as_tensor(patterns).float()
    if pats.dim() != 4 or pats.shape[-1] != len(tokens) or pats.shape[-2] != len(tokens):
        raise ValueError(f"patterns must be (L, H, T, T) with T = {len(tokens)} tokens, got {tuple(pats.shape)}")
    L, H = pats.shape[:2]
    rows = table or []
    titles = [[""] * H for _ in range(L)]
    for r in rows:
        titles[r["layer"]][r["head"]] = ", ".join(f"{k}={v:.2f}" for k, v in r.items()
                                                   if isinstance(v, float))
    scale = 10 ** decimals
    data = {"tokens": list(tokens), "n_layer": L, "n_head": H, "table": rows, "head_titles": titles,
            "init": list(init_head),
            "patterns": (torch.round(pats * scale) / scale).tolist()}
    blob = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_CSS}</style></head><body>
<h1>{html.escape(title)}</h1><div class="sub">{html.escape(subtitle)}</div>
<div><label><input type="radio" name="mode" value="to" checked> hovered token attends to</label>
<label><input type="radio" name="mode" value="from"> tokens attending to hovered token</label></div>
<div id="grid"></div><div id="info"></div>
<div id="row"><div id="text"></div><canvas id="mat" width="360" height="360"></canvas></div>
<table id="scores"></table>
<script id="data" type="application/json">{blob}</script>
<script>{_JS}</script>
</body></html>
"""
    path = Path(path)
    atomic_write_text(path, page)
    return path


# ---- PNG plots ------------------------------------------------------------------------------------

def _plt():  # noqa: ANN202
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:  # noqa: ANN001
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    _plt().close(fig)
    return path


def plot_eigenvalues(eigs: Tensor, path: str | Path, scores: Tensor | None = None,
                     title: str = "OV circuit eigenvalues") -> Path:
    """Complex-plane scatter of each head's eigenvalues ``(L, H, r)``; titles show the copying score."""
    plt = _plt()
    L, H = eigs.shape[:2]
    fig, axes = plt.subplots(L, H, figsize=(2.2 * H, 2.2 * L + 0.4), squeeze=False)
    for i in range(L):
        for h in range(H):
            ax, e = axes[i][h], eigs[i, h]
            lim = float(e.abs().max()) * 1.1 or 1.0
            color = ["#2f855a" if v.real >= 0 else "#c53030" for v in e]
            ax.scatter(e.real.cpu().numpy(), e.imag.cpu().numpy(), s=8, c=color)
            ax.axhline(0, color="#999", lw=0.5)
            ax.axvline(0, color="#999", lw=0.5)
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
            ax.set_xticks([])
            ax.set_yticks([])
            name = f"L{i}H{h}" + (f" {float(scores[i, h]):+.2f}" if scores is not None else "")
            ax.set_title(name, fontsize=8)
    fig.suptitle(title + (" (title: copying score)" if scores is not None else ""), fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_patterns(patterns: dict[str, Tensor], path: str | Path, boundary: int | None = None,
                  title: str = "attention patterns") -> Path:
    """Heatmaps of ``{label: (T, T) attention}`` side by side (destination rows, source columns); ``boundary``:
    draw lines where a repeated probe's second copy starts."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(patterns), figsize=(3.3 * len(patterns), 3.4), squeeze=False)
    for ax, (label, a) in zip(axes[0], patterns.items()):
        ax.imshow(a.float().cpu().numpy(), cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
        if boundary:
            for f in (ax.axhline, ax.axvline):
                f(boundary - 0.5, color="#c05621", lw=0.6)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("source position", fontsize=8)
        ax.set_ylabel("destination position", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_composition(scores: dict[str, Tensor], path: str | Path, title: str = "composition scores") -> Path:
    """One heatmap per mode: rows = writing head (earlier layer), columns = reading head."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(scores), figsize=(4.2 * len(scores), 4), squeeze=False)
    for ax, (mode, s) in zip(axes[0], scores.items()):
        L, H = s.shape[:2]
        m = s.reshape(L * H, L * H)
        rows, cols = slice(0, (L - 1) * H), slice(H, L * H)          # writers: layers < L-1; readers: > 0
        im = ax.imshow(m[rows, cols].cpu().numpy(), cmap="viridis", aspect="auto")
        labels = [f"L{i}H{h}" for i in range(L) for h in range(H)]
        step = max(1, (L * H) // 16)
        ax.set_yticks(range(0, (L - 1) * H, step), labels[: (L - 1) * H: step], fontsize=6)
        ax.set_xticks(range(0, (L - 1) * H, step), labels[H::step], fontsize=6, rotation=90)
        ax.set_title(f"{mode.upper()}-composition")
        ax.set_ylabel("writer")
        ax.set_xlabel("reader")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_head_scores(scores: dict[str, Tensor], path: str | Path,
                     keys: tuple[str, ...] = ("prev_token", "duplicate_token", "induction", "copying",
                                              "copying_rank", "positional")) -> Path:
    """Heatmaps layer x head for each detector score."""
    plt = _plt()
    keys = tuple(k for k in keys if k in scores)
    fig, axes = plt.subplots(1, len(keys), figsize=(2.8 * len(keys), 2.6), squeeze=False)
    for ax, k in zip(axes[0], keys):
        s = scores[k]
        lo = -1.0 if k == "copying" else 0.0
        cmap = "RdBu_r" if k == "copying" else "viridis"
        im = ax.imshow(s.cpu().numpy(), cmap=cmap, vmin=lo, vmax=1.0, aspect="auto")
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("head", fontsize=8)
        ax.set_ylabel("layer", fontsize=8)
        ax.set_xticks(range(s.shape[1]))
        ax.set_yticks(range(s.shape[0]))
        for i in range(s.shape[0]):
            for h in range(s.shape[1]):
                if s.numel() <= 64:
                    ax.text(h, i, f"{float(s[i, h]):.2f}", ha="center", va="center", fontsize=6, color="w")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return _save(fig, path)


def plot_fourier(norms: dict[str, list[float]], path: str | Path, keys: list[int] | None = None) -> Path:
    """Bar plots of norm per frequency (e.g. ``{"embedding": [...], "logits": [...]}``)."""
    plt = _plt()
    fig, axes = plt.subplots(len(norms), 1, figsize=(8, 2.4 * len(norms)), squeeze=False)
    for ax, (name, v) in zip(axes[:, 0], norms.items()):
        colors = ["#c05621" if keys and i in keys else "#4a5568" for i in range(len(v))]
        ax.bar(range(len(v)), v, color=colors)
        ax.set_title(f"{name}: norm per frequency (orange: key frequencies)", fontsize=9)
        ax.set_xlabel("frequency k (0 = constant)", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)
