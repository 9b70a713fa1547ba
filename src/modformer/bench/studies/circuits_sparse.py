"""Circuits of sparse-attention students (issue 28, study 3): does a student distilled with a sliding-window or
sink+window attention keep its teacher's induction circuit?

Teacher: the 2-layer attention-only induction model (``interp.toy_induction``, trained here, or ``--run`` such as
configs/induction_2l.yaml). Each student is the teacher with its attention replaced (``compress.distill``'s
``Distiller``: the teacher's weights copied, only attention trained, next-token KL to the teacher on the
teacher's repeated-span data). For teacher and students: task accuracy and KL to the teacher, previous-token and
induction (prefix-matching) scores, the K-composition of the best pair and the patching recovery of the named heads
(``interp.studies.measure``), at a short probe (copy distance below every window) and a long one (above the small
windows); term importance (``interp.terms``: the loss with the direct, one-head, two-head (virtual head) or bias
paths removed, patterns frozen; the top head paths). Writes OUT/circuits_sparse.json.

    modformer bench circuits-sparse                    # CPU, 8-13 min on 2 shared cores (by load)
    modformer bench circuits-sparse --teacher-steps 300 --steps 20 --students sliding_window:8   # smoke test
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from typing import Any

import torch

from modformer.bench.common import DEFAULT_OUT, cases, print_table, write_result
from modformer.bench.fidelity import compare_models
from modformer.cli import HelpFormatter
from modformer.compress.distill import DistillConfig, Distiller
from modformer.interp.studies import measure
from modformer.interp.terms import term_importance
from modformer.interp.toy_induction import induction_model

KINDS = {"sliding_window": ("window",), "sink_window": ("sinks", "window")}


def parse_student(spec: str) -> dict[str, Any]:
    """``sliding_window:8`` or ``sink_window:4:8`` -> the student's ModelConfig overrides."""
    kind, *vals = spec.split(":")
    if kind not in KINDS or len(vals) != len(KINDS[kind]) or not all(v.isdigit() and int(v) > 0 for v in vals):
        raise SystemExit(f"--students: {spec!r} is not sliding_window:W or sink_window:S:W (positive integers)")
    return {"attention": kind, "attention_options": {k: int(v) for k, v in zip(KINDS[kind], vals)}}


def distill_student(teacher: torch.nn.Module, data: Any, spec: str, steps: int, lr: float, out_dir: str,
                    seed: int) -> tuple[torch.nn.Module, dict[str, Any]]:
    cfg = DistillConfig(name=spec.replace(":", "_"), out_dir=out_dir, student=parse_student(spec), steps=steps,
                        batch_size=64, lr=lr, eval_every=steps, eval_batches=4, device="cpu", dtype="float32",
                        seed=seed, progress=False, log_every=max(1, steps // 4))
    d = Distiller(cfg, teacher=teacher, data=data)
    summary = d.fit()
    return d.student.eval(), {"before_kl": summary["before_kl"], "final_kl": summary["final_val_kl"],
                              "seconds": round(summary["wall_s"], 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="modformer bench circuits-sparse", description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter,
                                epilog="examples:\n  modformer bench circuits-sparse --students sliding_window:8")
    p.add_argument("--run", default=None,
                   help="a 2-layer induction run or saved model folder as teacher (default: train the toy model)")
    p.add_argument("--teacher-steps", type=int, default=2500, help="training steps of the toy teacher")
    p.add_argument("--students", nargs="+", default=["sliding_window:4", "sliding_window:8", "sliding_window:16",
                                                      "sink_window:4:8"],
                   help="sliding_window:W or sink_window:S:W")
    p.add_argument("--steps", type=int, default=300, help="distillation steps per student")
    p.add_argument("--lr", type=float, default=1e-3, help="distillation learning rate")
    p.add_argument("--probes", type=int, nargs=2, default=[6, 20],
                   help="short and long probe: half-length of the repeated random tokens (the copy distance)")
    p.add_argument("--threshold", type=float, default=0.4, help="score that names a head")
    p.add_argument("--seed", type=int, default=0, help="seed")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (1: fastest for these tiny models)")
    p.add_argument("--out", default=DEFAULT_OUT, help="result folder (benchmarks/results: the committed answer)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    students = [(s, parse_student(s)) for s in args.students]
    t0 = time.time()
    teacher, data, info = induction_model(args.run, args.teacher_steps, args.seed)
    teacher.requires_grad_(False)
    val = list(data.iter_eval("val", 64, 4))
    H = teacher.cfg.n_head
    names = [[f"L{i}H{h}" for h in range(H)] for i in range(2)]
    models: list[tuple[str, torch.nn.Module, dict[str, Any]]] = [("teacher (dense)", teacher, {})]
    with tempfile.TemporaryDirectory() as tmp:
        for spec, _ in cases(students, "circuits-sparse distil", lambda s: f"next: {s[0]}"):
            student, dist = distill_student(teacher, data, spec, args.steps, args.lr, tmp, args.seed)
            models.append((spec, student, dist))
            print(f"[circuits-sparse] {spec}: kl {dist['before_kl']:.4g} -> {dist['final_kl']:.4g} "
                  f"({dist['seconds']} s)", flush=True)
    rows = []
    for spec, model, dist in cases(models, "circuits-sparse measure", lambda m: f"next: {m[0]}"):
        fid = compare_models(teacher, model, val)
        row: dict[str, Any] = {"model": spec, "acc": round(fid["acc"], 4), "kl_to_teacher": round(fid["kl"], 5),
                               "top1_agree": round(fid["top1_agree"], 4), **dist}
        for probe, tag in zip(args.probes, ("short", "long")):
            m = measure(model, val, probe, teacher.cfg.vocab_size, names, args.threshold)
            row[f"{tag}_probe"] = probe
            for k in ("prev_token_score", "induction_score", "prev_token_heads", "induction_heads", "best_pair",
                      "k_composition_minus_baseline", "patching_recovery_named_heads"):
                row[f"{tag}_{k}"] = m[k]
        x, y = val[0]
        terms = term_importance(model, x[:16], y[:16], top=3)
        row["terms_loss"] = round(terms["loss"], 4)
        row["terms_delta_loss"] = {c: round(v["delta_loss"], 4) for c, v in terms["classes"].items()}
        row["terms_top_paths"] = [{"path": t["path"], "delta_loss": round(t["delta_loss"], 4)}
                                  for t in terms["top_paths"]]
        rows.append(row)
    print_table([{k: r[k] for k in ("model", "acc", "kl_to_teacher", "short_prev_token_score",
                                    "short_induction_score", "long_induction_score",
                                    "short_patching_recovery_named_heads", "long_patching_recovery_named_heads")}
                 for r in rows])
    t = rows[0]
    headline = {"teacher_acc": t["acc"], "teacher_induction_short": t["short_induction_score"],
                "teacher_induction_long": t["long_induction_score"],
                "students": {r["model"]: {"acc": r["acc"], "induction_short": r["short_induction_score"],
                                          "induction_long": r["long_induction_score"],
                                          "prev_token": r["short_prev_token_score"],
                                          "keeps_prev_token_head": set(t["short_prev_token_heads"]) <= set(
                                              r["short_prev_token_heads"]),
                                          "induction_heads_short": r["short_induction_heads"],
                                          "patching_recovery_short": r["short_patching_recovery_named_heads"]}
                             for r in rows[1:]}}
    extra = {"teacher": info, "seconds": round(time.time() - t0, 1), "distill_steps": args.steps, "lr": args.lr,
             "threshold": args.threshold}
    path = write_result("circuits_sparse", headline, rows, "cpu", args.out, extra=extra)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
