"""Students at equal density and the KL-vs-density curve of each mask family (issue 25; used by
``modformer bench sparse-fidelity --density D --curve D1 D2 ...``).

``student_spec`` turns a method of ``--methods`` (a family of ``density.FAMILIES``, ``gate`` or ``performer``) into
the distillation config's ``student`` fields: the base config's options when it is of the same attention kind, the
density-tuned option with ``--density`` (the gate keeps the most blocks within the density; every fixed family is
tuned to the gate's exact density, so all students keep the same share of pairs), then the method's own
``key=value`` overrides. ``density_curve`` measures next-token KL to the teacher per family at each density (fixed
families tuned to the density itself, the gate at the most blocks within it; the
students as built, the gate at its identity initialisation, or after ``steps`` distillation steps each);
the students run the dense keep-mask kernel (``attn_backend: sdpa``: the same attention as the flex BlockMask,
without a kernel compile per mask). ``plot_curve`` draws KL against density, one line per family.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from modformer.layers.attention import density as dn

KIND = {"window": "sliding_window", "sink": "sink_window", "block_local": "block_local", "strided": "strided",
        "dilated": "dilated", "gate": "learned_gate", "performer": "performer"}
CONFIG_OF = {"window": "sparse_window", "sink": "sparse_sink", "gate": "sparse_gate", "performer": "sparse_performer",
             "block_local": "sparse_window", "strided": "sparse_window", "dilated": "sparse_window"}


def target_density(seq_len: int, block: int, density: float) -> tuple[int, float]:
    """The gate's ``top_k`` within ``density`` at ``seq_len`` and the exact density every student is tuned to."""
    top_k = dn.gate_top_k(seq_len, block, density)
    return top_k, dn.gate_density(seq_len, block, top_k)


def student_spec(method: str, overrides: dict[str, Any], base: dict[str, Any], seq_len: int,
                 density: float | None, gate_block: int, match_gate: bool = True) -> dict[str, Any]:
    """The ``student`` fields of one method (see the module doc); ``base`` is the config's ``student``.
    ``match_gate=False`` tunes a fixed family to ``density`` itself (the curve's points) instead of the gate's."""
    kind = KIND[method]
    base_opts = dict(base.get("attention_options", {}))
    if base.get("attention") == kind:
        opts = base_opts
    else:
        opts = {"block_size": base_opts.get("block_size", gate_block)} if kind != "performer" else {}
    if density is not None and method == "gate":
        opts["top_k"] = target_density(seq_len, opts.get("block_size", gate_block), density)[0]
        opts.setdefault("select", "topk")
    elif density is not None and method in dn.FAMILIES:
        target = target_density(seq_len, gate_block, density)[1] if match_gate else density
        fixed = {k: v for k, v in overrides.items() if k != "block_size"}
        base_fixed = opts if base.get("attention") == kind else {}
        tuned = dn.tune(method, seq_len, target, **{**{k: v for k, v in base_fixed.items() if k != "block_size"},
                                                     **fixed})
        opts.update(tuned)
    opts.update(overrides)
    return {**base, "attention": kind, "attention_options": opts}


def spec_density(spec: dict[str, Any], seq_len: int) -> float | None:
    """Exact kept share of the causal pairs of a student spec at ``seq_len`` (None for performer)."""
    kind, opts = spec["attention"], spec.get("attention_options", {})
    if kind == "learned_gate":
        return dn.gate_density(seq_len, int(opts.get("block_size", 64)), int(opts.get("top_k", 4)))
    if kind in dn.OPTION_ORDER:
        return dn.pattern_density(kind, opts, seq_len)
    return None


def density_curve(cfg: Any, methods: list[tuple[str, dict[str, Any]]], densities: list[float], teacher: Any,
                  data: Any, out: Path, steps: int = 0, gate_block: int = 128, done: list[dict[str, Any]] | None = None,
                  on_row: Callable[[list[dict[str, Any]]], None] | None = None) -> list[dict[str, Any]]:
    """KL etc. of every (family, density) student; ``cfg`` is the base DistillConfig (data, batch, lr, trainable).

    ``done`` rows (an earlier call's) with the same ``steps`` are kept and not measured again, other rows dropped;
    ``on_row`` gets the rows so far after each new point, so a run cut off by a time limit keeps what it measured."""
    from modformer.bench import fidelity
    from modformer.bench.common import cases
    from modformer.compress.distill import Distiller

    seq_len = cfg.data.seq_len
    rows = [r for r in done or [] if r.get("steps") == steps]
    measured = {(r["family"], r["target"]) for r in rows}
    for method, overrides in cases(methods, "sparse-density", lambda m: f"next: {m[0]} curve"):
        if method == "performer":
            continue
        seen = set()
        for d in densities:
            spec = student_spec(method, overrides, cfg.student, seq_len, d, gate_block, match_gate=False)
            spec["attn_backend"] = "sdpa"
            key = repr(sorted(spec["attention_options"].items()))
            if key in seen:                 # e.g. the gate's top_k is the same at two low densities
                continue
            seen.add(key)
            if (method, d) in measured:
                continue
            name = f"curve_{method}_{d:g}".replace(".", "p")
            point = dataclasses.replace(cfg, name=name, out_dir=str(out), student=spec, steps=max(steps, 1),
                                        progress=False)
            dist = Distiller(point, teacher=teacher, data=data)
            if steps:
                dist.fit()
            bs, nb = cfg.eval_batch_size or cfg.batch_size, cfg.eval_batches
            with dist._autocast():
                res = fidelity.compare_models(dist.teacher, dist.student, data.iter_eval("val", bs, nb))
            rows.append({"family": method, "target": d, "density": spec_density(spec, seq_len),
                         "options": spec["attention_options"], "steps": steps, **res})
            print(f"  curve {method} density {rows[-1]['density']:.3f}: KL {res['kl']:.4g}", flush=True)
            del dist
            if on_row is not None:
                on_row(rows)
    return rows


def gate_vs_best_fixed(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per ``--curve`` target: the gate's KL / the lowest KL of the fixed families at that target. The gate keeps at
    most the target (whole blocks), the fixed families keep the target itself, so a ratio < 1 is not bought with
    density. Targets without a gate point or a fixed one are left out."""
    out = []
    for target in sorted({r["target"] for r in rows if "target" in r}):
        at = [r for r in rows if r.get("target") == target and r.get("kl") is not None]
        gate = next((r for r in at if r["family"] == "gate"), None)
        fixed = [r for r in at if r["family"] in dn.FAMILIES]
        if gate is None or not fixed:
            continue
        best = min(fixed, key=lambda r: r["kl"])
        out.append({"target": target, "gate_density": gate["density"], "gate_kl": gate["kl"],
                    "best_fixed": best["family"], "best_fixed_density": best["density"], "best_fixed_kl": best["kl"],
                    "kl_ratio": gate["kl"] / best["kl"]})
    return out


def plot_curve(rows: list[dict[str, Any]], path: Path, title: str = "",
               distilled: list[dict[str, Any]] | None = None) -> Path | None:
    """KL vs density (log-log), one line per family, and each distilled student (``family``, ``density``, ``kl``)
    as a star in its family's colour; None when there is nothing to draw."""
    pts = [r for r in rows if r.get("density") and r.get("kl")]
    if not pts:
        return None
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.6), dpi=110)
    for fam in dict.fromkeys(r["family"] for r in pts):
        xs = sorted((r["density"], r["kl"]) for r in pts if r["family"] == fam)
        line, = ax.plot([x for x, _ in xs], [y for _, y in xs], marker="o", ms=3, label=fam)
        for d in distilled or []:
            if d.get("family") == fam and d.get("density") and d.get("kl"):
                ax.plot([d["density"]], [d["kl"]], marker="*", ms=9, color=line.get_color(), ls="none")
    if distilled:
        ax.plot([], [], marker="*", ms=9, color="gray", ls="none", label="distilled")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ticks = [x for x in (0.05, 0.1, 0.25, 0.5, 0.75) if min(r["density"] for r in pts) * 0.8 <= x]
    ax.set_xticks(ticks, [f"{x:g}" for x in ticks])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("kept share of causal pairs")
    ax.set_ylabel("next-token KL to the teacher (nats)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
