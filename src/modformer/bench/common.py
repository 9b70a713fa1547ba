"""Shared benchmark plumbing: device facts, CUDA-event timing, result JSON, tables."""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from modformer.utils import atomic_write_text

H100_BF16_PEAK = 989e12   # dense bf16 TF/s of an H100 SXM (the MFU denominator the issue fixes)
DEFAULT_OUT = "runs/bench"   # where results go unless --out names benchmarks/results (the committed answers)
RESULTS = Path("benchmarks/results")   # the committed answers, one canonical file per question
CONFIGS = Path("configs")    # the recipes benchmarks train; paths are relative to the checkout, as for the CLI


def git_commit() -> str | None:
    """The checkout's HEAD commit (None outside a git checkout): which code produced a result."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).parent)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def command_line() -> str:
    """The command that is running, as a user would type it (``modformer bench ...`` or ``python ...``)."""
    if Path(sys.argv[0]).name == "modformer":
        return " ".join(["modformer", *sys.argv[1:]])
    return " ".join(["python", *sys.argv])


def device_name(device: torch.device | str) -> str:
    """The GPU's name, or ``cpu (MODEL, N threads)`` (CPU model from /proc/cpuinfo where there is one)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type != "cpu":
        return device.type
    info = Path("/proc/cpuinfo")
    model = next((line.split(":", 1)[1].strip() for line in info.read_text().splitlines()
                  if line.startswith("model name")), "unknown") if info.is_file() else "unknown"
    return f"cpu ({model}, {torch.get_num_threads()} threads)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], Any], device: torch.device, warmup: int = 3, iters: int = 10) -> float:
    """Median seconds per call after ``warmup`` calls (device synchronised around each)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def kernel_time(fn: Callable[[], Any], warmup: int = 3, iters: int = 10) -> float:
    """Seconds of GPU kernel time per call (torch.profiler, CUDA activity only): isolates the device work of
    ``fn`` from Python/launch overhead, which dominates short calls."""
    return kernel_breakdown(fn, warmup, iters)[0]


def kernel_breakdown(fn: Callable[[], Any], warmup: int = 3, iters: int = 10,
                     top: int = 3) -> tuple[float, list[tuple[str, float]]]:
    """``kernel_time`` plus the ``top`` kernels by device time, as (name, share of the kernel time): shows
    *which* kernels a call ran, e.g. whether two attention paths picked the same SDPA backend."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    events = [(e.key, e.self_device_time_total) for e in prof.key_averages() if e.self_device_time_total > 0]
    total_us = sum(us for _, us in events)
    ranked = sorted(events, key=lambda e: -e[1])[:top]
    return total_us / 1e6 / iters, [(name[:120], us / max(total_us, 1e-9)) for name, us in ranked]


def counted_train_flops_per_token(model: torch.nn.Module, seq_len: int, vocab_size: int) -> float:
    """Forward + backward FLOPs per token of one training step, counted by ``torch.utils.flop_counter``
    on a (1, seq_len) batch. Unlike 6N it counts only the experts a token is routed to and every
    attention channel. SDPA runs on its math path here, so attention is counted as the full T x T score
    matrix (the fused kernels are not all known to the counter, and some skip the masked half)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    idx = torch.randint(vocab_size, (1, seq_len), device=next(model.parameters()).device)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(idx).float().logsumexp(-1).sum().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / seq_len


def matmul_ceiling(device: torch.device, n: int = 8192, dtype: torch.dtype = torch.bfloat16) -> float:
    """Measured dense matmul FLOP/s (the practical ceiling MFU is compared against)."""
    if device.type != "cuda":
        n = 512
        dtype = torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    t = time_fn(lambda: a @ b, device, warmup=3, iters=10)
    return 2 * n ** 3 / t


WRITTEN: list[Path] = []   # result files written by this process, in order (the CLI's closing summary reads them)


def cases(items: list[Any], label: str, describe: Callable[[Any], str] = str) -> Any:
    """Yield ``items`` with progress: a bar on a terminal, else one ``bench LABEL case i/N  ITEM  ETA`` line per
    item on stderr (the measurement loop of a benchmark or the trials of a study)."""
    from modformer.train.logging import ProgressDisplay

    items = list(items)
    if not items:                   # nothing to measure: no bar, no "0/1 done" line
        return
    progress = ProgressDisplay(max(len(items), 1), 0, True, label=f"bench {label}", unit="case", plain_every_s=0.0)
    try:
        for i, item in enumerate(items):
            progress.update(i, describe(item))
            yield item
        progress.update(len(items), "done")
    finally:
        progress.close()


def map_cases(fn: Callable[[Any], Any], items: list[Any], label: str, jobs: int = 1,
              describe: Callable[[Any], str] = str,
              on_result: Callable[[list[Any]], None] | None = None) -> list[Any]:
    """``[fn(item) for item in items]`` with progress (as ``cases``). ``jobs`` > 1 runs that many items at once,
    each in its own spawned process (small models leave a GPU idle between kernel launches, so sharing one
    raises a study's throughput; per-run timings are then measured under sharing). ``fn`` and the items must be
    picklable (a module-level function or a ``functools.partial`` of one); results keep the order of ``items``,
    and the first failure is raised once the running items have finished. ``on_result`` is called after each
    item with the results finished so far, in item order (e.g. to rewrite a partial result file, so a run stopped
    by a time limit keeps what it finished)."""
    items = list(items)
    if jobs <= 1 or len(items) <= 1:
        out = []
        for item in cases(items, label, describe):
            out.append(fn(item))
            if on_result:
                on_result(list(out))
        return out
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from modformer.train.logging import ProgressDisplay

    results: list[Any] = [None] * len(items)
    finished: list[int] = []
    progress = ProgressDisplay(len(items), 0, True, label=f"bench {label}", unit="case", plain_every_s=0.0)
    try:
        with ProcessPoolExecutor(min(jobs, len(items)), mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(fn, item): i for i, item in enumerate(items)}
            for done, future in enumerate(as_completed(futures), 1):
                i = futures[future]
                try:
                    results[i] = future.result()
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)     # drop the queued items, keep the error
                    raise
                progress.update(done, f"finished: {describe(items[i])}")
                finished.append(i)
                if on_result:
                    on_result([results[j] for j in sorted(finished)])
    finally:
        progress.close()
    return results


def plot_ranges(lines: dict[str, list[tuple[float, float, float, float]]], path: str | Path, xlabel: str,
                ylabel: str, size: tuple[float, float] = (5.5, 3.6), zero_line: bool = False) -> None:
    """One line per label of ``(x, median, low, high)`` points, error bars low..high (a study's median and range
    over seeds), x on a log2 axis; saved as a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    for label, pts in lines.items():
        xs, ys, lo, hi = zip(*pts) if pts else ((), (), (), ())
        ax.errorbar(xs, ys, yerr=[[y - a for y, a in zip(ys, lo)], [b - y for y, b in zip(ys, hi)]], marker="o",
                    capsize=3, label=label)
    if zero_line:
        ax.axhline(0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


RESULT_KEYS = ("benchmark", "command", "device", "torch", "git_commit", "date", "headline", "rows")


def parse_with_preset(p: argparse.ArgumentParser, argv: list[str] | None, flag: str,
                      **defaults: Any) -> argparse.Namespace:
    """``p.parse_args(argv)``, with ``defaults`` in force when ``flag`` is given (a scale preset such as ``--tiny``:
    it changes the defaults only, so options given explicitly still win)."""
    if flag in (sys.argv[1:] if argv is None else argv):
        p.set_defaults(**defaults)
    return p.parse_args(argv)


def write_result(name: str, headline: dict[str, Any], rows: list[dict[str, Any]], device: torch.device | str,
                 out_dir: str | Path = DEFAULT_OUT, extra: dict[str, Any] | None = None,
                 filename: str | None = None) -> Path:
    """``out_dir/<name>.json`` in the project's schema (``RESULT_KEYS``, then ``extra``'s keys), written atomically.

    ``device``: the device measured on, or its name (a summary of runs made elsewhere); ``filename``: write
    ``out_dir/filename`` instead of ``out_dir/<name>.json`` (a benchmark's ``--out FILE``). The default folder is
    ``runs/bench``: a result lands in benchmarks/results only when the command names it."""
    result = {"benchmark": name, "command": command_line(),
              "device": device if isinstance(device, str) else device_name(device),
              "torch": torch.__version__, "git_commit": git_commit(), "date": datetime.date.today().isoformat(),
              "headline": headline, "rows": rows, **(extra or {})}
    path = Path(out_dir) / (filename or f"{name}.json")
    atomic_write_text(path, json.dumps(result, indent=2))
    WRITTEN.append(path)
    return path


def print_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> None:
    """A plain fixed-width table (stdout), floats shown with 4 significant digits."""
    if not rows:
        return
    columns = columns or list(rows[0])

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    widths = [max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(fmt(r.get(c, "")).ljust(w) for c, w in zip(columns, widths)))
