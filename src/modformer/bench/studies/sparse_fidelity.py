"""Issues 7 and 25 end to end: teacher -> distil each sparse attention -> fidelity suite -> table + JSON.

    modformer bench sparse-fidelity --quick                 # CPU, tiny model, Tiny Shakespeare, minutes
    modformer bench sparse-fidelity --out runs/sparse_fidelity   # GPU: WikiText-2, T=1024, timing 512..16k
    modformer bench sparse-fidelity --teacher-config configs/sparse_teacher_4k.yaml \
        --student-config configs/sparse_gate_4k.yaml --density 0.25 --methods gate sink block_local \
        strided dilated --curve 0.05 0.1 0.25 0.5 0.75 --speed-seq 4096 16384 --seq   # issue 25: T=4096

Issue 25 options: ``--teacher-config`` (the teacher's training config), ``--student-config`` (one distillation
config for every method, its attention kind swapped per method), ``--density D`` (the gate keeps the most blocks
within D; every fixed family is tuned to the gate's exact density: ``studies/sparse_density.py``), ``--curve``
(next-token KL vs density per family, plot ``OUT/sparse_density.png``), ``--speed-seq`` / ``--speed-density``
(attention forward+backward with the gate's cost vs dense SDPA: ``bench/sparse_speed.py``).

Steps: (1) train the GPT-2-architecture teacher with the ordinary trainer (configs/sparse_teacher.yaml, or
the quick tiny config) and save it in HF format (``OUT/teacher_hf``), unless ``--teacher PATH`` is given;
(2) for each method (configs/sparse_{window,sink,gate,performer}.yaml) build the student from the teacher,
measure it without fine-tuning, distil it (``modformer.compress.distill``) and run the fidelity suite
(``modformer.bench.fidelity``); on CUDA also peak memory of a training step and of inference vs the dense
eager and SDPA teacher. On CUDA the attention-forward timing (dense flash SDPA vs FlexAttention with ~90%
of the causal blocks skipped, T=512..16k) runs first, as it needs no teacher. The result JSON is rewritten
after every step (``OUT/sparse_fidelity.json`` and, with ``--results DIR``,
``DIR/sparse_fidelity.json``); a failing method is recorded with its error and the run goes on;
``--budget-s`` (GPU default 450) skips methods that would start after it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from modformer.bench import fidelity
from modformer.bench.common import CONFIGS, cases, print_table, write_result
from modformer.bench.studies import sparse_density as sd
from modformer.cli import HelpFormatter
from modformer.compress.distill import Distiller, build_student, load_distill_config, load_teacher
from modformer.config import DataConfig, load_config
from modformer.layers.attention.kernels import FLEX_COMPILE_MODES

METHODS = tuple(sd.KIND)      # window, sink, block_local, strided, dilated, gate, performer
QUICK_TEACHER = [
    "name=teacher", "model.n_layer=2", "model.n_head=4", "model.d_model=64", "model.max_seq_len=256",
    "model.dropout=0.0", "data.name=shakespeare_char", "data.seq_len=256", "train.steps=400",
    "train.batch_size=32", "train.lr=3e-3", "train.warmup_steps=50", "train.eval_every=200",
    "train.eval_batches=4", "train.log_every=100", "train.compile=false", "train.device=cpu",
    "train.tensorboard=false", "train.sample_tokens=0"]
QUICK_STUDENT = {   # T=256, blocks of 16: ~75-80% of the causal pairs dropped
    "window": {"attention_options": {"window": 32, "block_size": 16}},
    "sink": {"attention_options": {"sinks": 4, "window": 28, "block_size": 16}},
    "gate": {"attention_options": {"block_size": 16, "top_k": 3, "select": "topk", "grad": "none", "gate_loss": 1.0}},
    "performer": {"attention_options": {"n_features": 64, "chunk": 32}},
    "block_local": {"attention_options": {"block": 64, "block_size": 16}},
    "strided": {"attention_options": {"window": 24, "stride": 16, "block_size": 16}},
    "dilated": {"attention_options": {"window": 32, "dilation": 2, "block_size": 16}},
}
QUICK_GATE_BLOCK = 16
COLUMNS = ["method", "stage", "kl", "top1_agree", "ppl", "teacher_ppl", "ppl_retention", "acc", "attn_mse",
           "attn_mse_all", "kept_mass", "grad_cos", "density", "train_s"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def train_teacher(args: argparse.Namespace, out: Path) -> Path:
    """Train the teacher with the trainer and save it in HF format; returns the HF folder."""
    from modformer.models.hf import save_hf
    from modformer.runs import run_model
    from modformer.train.trainer import Trainer

    over = [f"out_dir={out}"] + (QUICK_TEACHER if args.quick else ["name=teacher"])
    if args.teacher_steps:
        over.append(f"train.steps={args.teacher_steps}")
    cfg = load_config(args.teacher_config, over)
    if args.quick:
        cfg.train.threads = 2
    summary = Trainer(cfg, overwrite=True).fit()
    hf_dir = out / "teacher_hf"
    save_hf(run_model(cfg.run_dir), hf_dir)
    (out / "teacher_summary.json").write_text(json.dumps(summary, indent=1, default=str))
    log(f"teacher: val ppl {summary.get('final_val_ppl', float('nan')):.4g} in {summary['wall_s']:.0f}s -> {hf_dir}")
    return hf_dir


def train_loss(m: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The training step's forward: bf16 autocast cross-entropy in train mode (a gate computes its target)."""
    m.train()
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        return torch.nn.functional.cross_entropy(m(x).flatten(0, 1).float(), y.flatten())


def memory_steps(m: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[Callable[[], None],
                                                                             Callable[[], None]]:
    """The two steps ``memory_rows`` measures: a bf16 training step (train mode: a gate computes its target) and an
    inference forward in eval mode (as a user runs it: no gate target), the module's mode restored after."""

    def step() -> None:
        train_loss(m, x, y).backward()
        m.zero_grad(set_to_none=True)

    def infer() -> None:
        was = m.training
        m.eval()
        try:
            with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16):
                m(x)
        finally:
            m.train(was)

    return step, infer


def memory_rows(teacher: torch.nn.Module, student: torch.nn.Module, data: Any, batch: int,
                device: torch.device, method: str = "") -> list[dict[str, Any]]:
    """Peak CUDA memory of inference and of a training step: student vs dense eager / SDPA teacher; with the bytes
    each saves for the backward pass by where (``fidelity.saved_for_backward``: what attention can change at all)."""
    x, y = data.get_batch("train", batch, torch.Generator().manual_seed(0))
    x, y = x.to(device), y.to(device)
    models = {"teacher_eager": build_student(teacher, {"attn_backend": "eager"}),
              "teacher_sdpa": build_student(teacher, {"attn_backend": "sdpa"}), "student": student}
    rows = []
    for name, m in models.items():
        step, infer = memory_steps(m, x, y)
        step()                                   # compile / warm up outside the measurement
        saved = fidelity.saved_for_backward(m, lambda m=m: train_loss(m, x, y))
        rows.append({"model": name, "train_peak_mb": fidelity.peak_memory(step, device) / 2 ** 20,
                     "infer_peak_mb": fidelity.peak_memory(infer, device) / 2 ** 20,
                     "saved_for_backward_mb": {k: v / 2 ** 20 for k, v in saved.items()}})
    ref, sdpa = rows[0], rows[1]
    for r in rows:
        r["method"] = method
        r["train_reduction_vs_eager"] = 1 - r["train_peak_mb"] / ref["train_peak_mb"]
        r["infer_reduction_vs_eager"] = 1 - r["infer_peak_mb"] / ref["infer_peak_mb"]
        r["train_reduction_vs_sdpa"] = 1 - r["train_peak_mb"] / sdpa["train_peak_mb"]
        r["infer_reduction_vs_sdpa"] = 1 - r["infer_peak_mb"] / sdpa["infer_peak_mb"]
    rows[-1]["peak_mem_reduction"] = rows[-1]["train_reduction_vs_eager"]
    return rows


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """``gate`` or ``gate:top_k=3,block_size=128``: a method and overrides of its attention options."""
    import yaml

    method, _, opts = spec.partition(":")
    if method not in METHODS:
        raise SystemExit(f"--methods: unknown method {method!r} in {spec!r}; allowed: {', '.join(METHODS)}")
    options = {}
    for item in filter(None, opts.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"--methods: {item!r} in {spec!r} is not key=value")
        options[key] = yaml.safe_load(value)
    return method, options


def run_method(spec: str, args: argparse.Namespace, teacher_dir: Path, out: Path,
               device: torch.device) -> dict[str, Any]:
    """Student before and after distillation, fidelity suite, memory (CUDA); returns the method's record."""
    method, options = parse_method(spec)
    name = spec.replace(":", "_").replace(",", "_").replace("=", "")
    over = [f"teacher={teacher_dir}", f"out_dir={out}", f"name={name}", f"device={device.type}"]
    if args.distill_steps:
        over.append(f"steps={args.distill_steps}")
    if args.quick:
        over += ["batch_size=8", "lr=1e-3", "eval_every=100", "eval_batches=4", "log_every=25"]
    cfg = base_config(method, args, over)
    spec_fields = sd.student_spec(method, options, cfg.student, cfg.data.seq_len, args.density, args.gate_block)
    cfg = dataclasses.replace(cfg, student=spec_fields)
    teacher, _ = load_teacher(teacher_dir, device)
    dist = Distiller(cfg, teacher=teacher)
    block = int(cfg.student.get("attention_options", {}).get("block_size", 64))
    rec: dict[str, Any] = {"method": spec, "attention": cfg.student["attention"],
                           "options": cfg.student.get("attention_options", {}), "seq_len": cfg.data.seq_len,
                           "density_exact": sd.spec_density(cfg.student, cfg.data.seq_len)}
    bs, nb = cfg.eval_batch_size or cfg.batch_size, cfg.eval_batches
    log(f"{spec}: fidelity without fine-tuning")
    with dist._autocast():         # bf16 on CUDA: the same compiled flex kernels as distillation
        rec["before"] = fidelity.suite(dist.teacher, dist.student, dist.data, bs, nb, block)
    t0 = time.perf_counter()
    dist.fit()
    rec["train_s"] = time.perf_counter() - t0
    log(f"{spec}: fidelity after {cfg.steps} distillation steps ({rec['train_s']:.0f}s)")
    with dist._autocast():
        rec["after"] = fidelity.suite(dist.teacher, dist.student, dist.data, bs, nb, block)
    data = dist.data
    prompts = [data.decode(x[0, :24].tolist()) for x, _ in data.iter_eval("val", 1, 2)]
    rec["generations"] = fidelity.generations(dist.teacher, dist.student, data, prompts, 20 if args.quick else 40)
    if device.type == "cuda":
        try:
            rec["memory"] = memory_rows(dist.teacher, dist.student, data, cfg.batch_size, device, spec)
        except Exception as e:  # noqa: BLE001
            rec["memory_error"] = f"{type(e).__name__}: {e}"[:300]
    return rec


def base_config(method: str, args: argparse.Namespace, over: list[str]) -> Any:
    """The distillation config a method starts from (``--student-config`` or configs/sparse_<method>.yaml; quick:
    Tiny Shakespeare, T=256, the quick student), before ``student_spec``."""
    path = args.student_config or CONFIGS / f"{sd.CONFIG_OF[method]}.yaml"
    cfg = load_distill_config(path, over + args.set)
    if args.quick:
        cfg = dataclasses.replace(cfg, data=DataConfig(name="shakespeare_char", seq_len=256),
                                  student={"attention": sd.KIND[method], **QUICK_STUDENT[method]})
    if cfg.data is None:
        raise SystemExit(f"{path}: set data (the study needs its seq_len)")
    return cfg


def gate_block(args: argparse.Namespace) -> int:
    """Block size of the gate every fixed family's density is matched to (the gate config's)."""
    if args.quick:
        return QUICK_GATE_BLOCK
    path = args.student_config or CONFIGS / "sparse_gate.yaml"
    student = load_distill_config(path).student
    if student.get("attention") != "learned_gate":
        student = load_distill_config(CONFIGS / "sparse_gate.yaml").student
    return int(student.get("attention_options", {}).get("block_size", 64))


def run_curve(args: argparse.Namespace, teacher_dir: Path, out: Path, device: torch.device,
              done: list[dict[str, Any]], on_row: Callable[[list[dict[str, Any]]], None]) -> list[dict[str, Any]]:
    """KL vs density per family (``--curve``), with the gate config's data and batch; plot next to the JSON.
    Points in ``done`` are kept; ``on_row`` saves the rows after each new point."""
    from modformer.data import build_dataset

    methods = [parse_method(m) for m in args.methods]
    over = [f"teacher={teacher_dir}", f"out_dir={out}", f"device={device.type}"]
    if args.quick:
        over += ["batch_size=8", "lr=1e-3", "eval_batches=4", "log_every=25"]
    cfg = base_config("gate", args, over)
    teacher, _ = load_teacher(teacher_dir, device)
    rows = sd.density_curve(cfg, methods, args.curve, teacher, build_dataset(cfg.data), out, args.curve_steps,
                            args.gate_block, done, on_row)
    title = f"T={cfg.data.seq_len}; lines: " + (f"{args.curve_steps} distillation steps" if args.curve_steps
                                                else "no fine-tuning (gate: identity init)")
    stars = args.distill_steps or "the config's"
    title += f"\nstars: the students distilled {stars} steps"
    path = sd.plot_curve(rows, out / "sparse_density.png", title, distilled_points(prev_records(out)))
    if path:
        log(f"curve plot: {path}")
    return rows


def prev_records(out: Path) -> list[dict[str, Any]]:
    """The methods OUT/sparse_fidelity.json holds so far (the curve runs after them)."""
    return previous(out).get("methods", [])


def distilled_points(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """(family, density, KL after distillation) of each measured student, for the curve plot."""
    return [{"family": r["method"].partition(":")[0], "density": r.get("density_exact"), "kl": r["after"]["kl"]}
            for r in records if "after" in r]


def flat_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for r in records:
        if "error" in r:
            rows.append({"method": r["method"], "stage": "error", "error": r["error"]})
            continue
        for stage in ("before", "after"):
            row = {"method": r["method"], "attention": r["attention"], "stage": stage,
                   **{k: v for k, v in r[stage].items() if k != "edge_cases"}}
            row["edge_cases_finite"] = all(e["finite"] for e in r[stage]["edge_cases"])
            row["edge_cases_max_kl"] = max(e["kl"] for e in r[stage]["edge_cases"])
            if stage == "after":
                row["train_s"] = r["train_s"]
            rows.append(row)
    return rows


def previous(out: Path) -> dict[str, Any]:
    """What an earlier call left in OUT/sparse_fidelity.json, failed or skipped parts left out (``--resume``)."""
    path = out / "sparse_fidelity.json"
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    keep = {"methods": [r for r in data.get("methods", []) if "error" not in r]}
    for key in ("attention_timing", "attention_fwd_bwd"):
        rows = data.get(key) or []
        keep[key] = rows if rows and not any("error" in r for r in rows) else []
    keep["density_curve"] = [r for r in data.get("density_curve") or [] if "error" not in r]   # point by point
    return keep


def write_all(records: list[dict[str, Any]], timing: list[dict[str, Any]], args: argparse.Namespace, out: Path,
              device: torch.device, teacher: dict[str, Any], speed: list[dict[str, Any]] | None = None,
              curve: list[dict[str, Any]] | None = None) -> None:
    rows = flat_rows(records)
    after = [r for r in rows if r.get("stage") == "after"]
    memory = [m for r in records for m in r.get("memory", []) if m["model"] == "student"]
    seq_len = next((r["seq_len"] for r in records if "seq_len" in r), None)
    headline = fidelity.headline_of(after, timing, memory, speed, seq_len)
    extra = {"mode": "quick (CPU)" if args.quick else "full", "teacher": teacher, "methods": records,
             "attention_timing": timing, "attention_fwd_bwd": speed or [], "density_curve": curve or [],
             "curve_gate_vs_best_fixed": sd.gate_vs_best_fixed(curve or [])}
    write_result("sparse_fidelity", headline, rows, device, out, extra)
    if args.results:
        write_result("sparse_fidelity", headline, rows, device, args.results, extra)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="modformer bench sparse-fidelity", description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter,
                                epilog=("examples:\n"
                                        "  modformer bench sparse-fidelity --quick --density 0.25 --methods gate"))
    p.add_argument("--quick", action="store_true", help="CPU: tiny teacher on Tiny Shakespeare, T=256")
    p.add_argument("--out", default=None, help="run folder (default runs/sparse_fidelity[_quick])")
    p.add_argument("--teacher", default=None, help="existing teacher (run dir / saved model / HF dir): skip training")
    p.add_argument("--teacher-config", default=str(CONFIGS / "sparse_teacher.yaml"),
                   help="the teacher's training config (issue 25: configs/sparse_teacher_4k.yaml)")
    p.add_argument("--student-config", default=None,
                   help="one distillation config for every method (attention swapped per method); default "
                        "configs/sparse_<method>.yaml")
    p.add_argument("--density", type=float, default=None,
                   help="kept share of causal pairs: the gate's top_k is the largest within it and every fixed "
                        "family is tuned to the gate's exact density")
    p.add_argument("--curve", type=float, nargs="*", default=[], metavar="D",
                   help="KL vs density per method at these densities (plot OUT/sparse_density.png)")
    p.add_argument("--curve-steps", type=int, default=0, help="distillation steps per curve point (0: as built)")
    p.add_argument("--speed-seq", type=int, nargs="*", default=[],
                   help="attention forward+backward timing, gate included, vs dense SDPA at these lengths")
    p.add_argument("--speed-density", type=float, nargs="*", default=None,
                   help="density per --speed-seq length (default 0.25 up to T=4096, 0.1 above)")
    p.add_argument("--flex-modes", nargs="+", default=["default"], choices=list(FLEX_COMPILE_MODES),
                   help="flex compile modes timed by --speed-seq (max-autotune-no-cudagraphs: autotuned kernels); "
                        "the headline takes the fastest")
    p.add_argument("--teacher-steps", type=int, default=None, help="teacher training steps (default: the config's)")
    p.add_argument("--distill-steps", type=int, default=None,
                   help="distillation steps per student (default: the config's)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), metavar="METHOD[:KEY=VALUE,...]",
                   help=f"{', '.join(METHODS)}; options override the config's attention_options (a sparsity "
                        "sweep), e.g. gate:top_k=3 window:window=512")
    p.add_argument("--seq", type=int, nargs="*", default=[512, 1024, 2048, 4096, 8192, 16384],
                   help="sequence lengths of the attention timing (GPU only)")
    p.add_argument("--timing-windows", type=int, nargs="*", default=[508],
                   help="also time the mask of a 4-sink + W-token window student at every --seq")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override of every distillation config, e.g. lr=5e-5 or schedule=cosine")
    p.add_argument("--results", default=None, help="also write sparse_fidelity.json here (e.g. benchmarks/results)")
    p.add_argument("--resume", action="store_true",
                   help="keep what OUT/sparse_fidelity.json holds (timings, methods, curve) and OUT/teacher_hf; "
                        "run only the rest (a study split over calls with a time limit: run the command again)")
    p.add_argument("--budget-s", type=float, default=0,
                   help="skip methods not started after this many seconds (0 = no limit; GPU default 450)")
    args = p.parse_args(argv)
    for spec in args.methods:
        parse_method(spec)                      # a typo fails before the teacher is trained
    for path in (args.teacher_config, args.student_config):
        if path and not Path(path).is_file():
            raise SystemExit(f"no such config: {path}")
    if args.density is not None and not 0 < args.density <= 1:
        raise SystemExit(f"--density must be in (0, 1], got {args.density}")
    if any(not 0 < d <= 1 for d in args.curve + (args.speed_density or [])):
        raise SystemExit("--curve / --speed-density values must be in (0, 1]")
    speed_density = args.speed_density or [0.25 if t <= 4096 else 0.1 for t in args.speed_seq]
    if len(speed_density) != len(args.speed_seq):
        raise SystemExit("--speed-density needs one value per --speed-seq length")
    args.gate_block = gate_block(args)
    device = torch.device("cpu" if args.quick or not torch.cuda.is_available() else "cuda")
    if args.quick:
        torch.set_num_threads(2)
        args.distill_steps = args.distill_steps or 200
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        # one compiled flex kernel per (pattern, shape, dtype): keep them all instead of falling back to eager
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
        if hasattr(torch._dynamo.config, "recompile_limit"):
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
        args.budget_s = args.budget_s or 450
    out = Path(args.out or ("runs/sparse_fidelity_quick" if args.quick else "runs/sparse_fidelity"))
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    log(f"device {device}, torch {torch.__version__}, out {out}")
    prev = previous(out) if args.resume else {}
    records: list[dict[str, Any]] = prev.get("methods", [])
    timing: list[dict[str, Any]] = prev.get("attention_timing", [])
    speed: list[dict[str, Any]] = prev.get("attention_fwd_bwd", [])
    curve: list[dict[str, Any]] = prev.get("density_curve", [])
    if prev:
        log(f"resume: {len(records)} methods, {len(timing)} timing rows, {len(prev.get('attention_fwd_bwd', []))} "
            f"fwd+bwd rows, {len(prev.get('density_curve', []))} curve points kept from {out}")
    if device.type == "cuda" and args.seq and not timing:   # first: it needs no teacher and gives attn_speedup_16k
        log("=== attention forward timing (dense flash SDPA vs flex block-sparse, ~90% of causal blocks skipped) ===")
        try:
            timing = fidelity.attention_speed(args.seq, device, student_windows=tuple(args.timing_windows))
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            timing = [{"error": f"{type(e).__name__}: {e}"[:500]}]
        write_all(records, timing, args, out, device, {}, speed, curve)
    if args.speed_seq and not speed:
        log("=== attention forward+backward, gate included, vs dense SDPA ===")
        small = {} if device.type == "cuda" else {"heads": 2, "head_dim": 16, "block": 16, "tokens": 1024, "iters": 2}
        try:
            from modformer.bench.sparse_speed import fwd_bwd_speed

            speed = fwd_bwd_speed(args.speed_seq, speed_density, device, flex_modes=args.flex_modes, **small)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            speed = [{"error": f"{type(e).__name__}: {e}"[:500]}]
        write_all(records, timing, args, out, device, {}, speed, curve)
    if args.teacher:
        teacher_dir = Path(args.teacher)
    elif args.resume and (out / "teacher_hf").is_dir():
        teacher_dir = out / "teacher_hf"
        log(f"resume: teacher {teacher_dir}")
    else:
        teacher_dir = train_teacher(args, out)
    teacher_info = {"path": str(teacher_dir)}
    summary = out / "teacher_summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text())
        teacher_info.update({k: s.get(k) for k in ("final_val_ppl", "final_val_acc", "wall_s", "params", "steps")})
    for method in cases(args.methods, "sparse-fidelity", lambda m: f"next: {m}"):
        if any(r["method"] == method for r in records):
            continue                                  # --resume: measured in an earlier call
        log(f"=== {method} ===")
        if args.budget_s and time.perf_counter() - t_start > args.budget_s:
            log(f"{method}: skipped, past the --budget-s {args.budget_s:.0f}s")
            records.append({"method": method, "error": f"skipped: time budget {args.budget_s:.0f}s"})
            continue
        try:
            records.append(run_method(method, args, teacher_dir, out, device))
        except Exception as e:  # noqa: BLE001 - one failing method must not end the run
            traceback.print_exc()
            records.append({"method": method, "error": f"{type(e).__name__}: {e}"[:500]})
        write_all(records, timing, args, out, device, teacher_info, speed, curve)
        log(f"wrote {out / 'sparse_fidelity.json'} ({time.perf_counter() - t_start:.0f}s so far)")
    if args.curve and args.budget_s and time.perf_counter() - t_start > args.budget_s:
        log(f"curve: skipped, past the --budget-s {args.budget_s:.0f}s (run again with --resume)")
    elif args.curve:
        log(f"=== KL vs density at {args.curve} ({len(curve)} points kept) ===")

        def save(rows: list[dict[str, Any]]) -> None:
            curve[:] = rows
            write_all(records, timing, args, out, device, teacher_info, speed, curve)

        try:
            curve = run_curve(args, teacher_dir, out, device, list(curve), save)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            curve = curve + [{"error": f"{type(e).__name__}: {e}"[:500]}]
        write_all(records, timing, args, out, device, teacher_info, speed, curve)
    rows = flat_rows(records)
    print_table(rows, COLUMNS)
    if timing:
        print_table(timing, ["T", "mask", "block_density", "dense_sdpa_ms", "flex_ms", "speedup"])
    if speed:
        print_table(speed, ["T", "mask", "density", "dense_sdpa_ms", "sparse_ms", "gate_ms", "speedup",
                            "gate_overhead"])
    if curve:
        print_table(curve, ["family", "target", "density", "kl", "top1_agree", "ppl_retention"])
        print_table(sd.gate_vs_best_fixed(curve), ["target", "gate_density", "gate_kl", "best_fixed",
                                                   "best_fixed_kl", "kl_ratio"])
    log(f"done in {time.perf_counter() - t_start:.0f}s; results: {out / 'sparse_fidelity.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
