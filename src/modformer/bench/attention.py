"""Attention kernels: forward and forward+backward TF/s, causal, bf16, T = 512 ... 16k.

Compares raw ``F.scaled_dot_product_attention`` with modformer's dispatcher (``attend`` with the
``sdpa`` and ``flex`` backends) on the same q/k/v, FlashAttention-benchmark shapes: B*T = 16k
tokens, model width 2048 (H = 2048 / Dh). FLOPs: causal forward 2 * B*H*T^2*Dh (half of
4*B*H*T^2*Dh), backward 2.5x forward. On CUDA each path's forward is also profiled (``fwd_kernel_ms``, the
top kernels in ``fwd_kernels``): wall-time gaps with equal kernel time are host overhead; different kernel
names mean a different SDPA backend (the module leaves cuDNN out of eager decoding calls, see
``layers/attention/kernels._skip_cudnn``).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F

from modformer.bench.common import DEFAULT_OUT, cases, kernel_breakdown, print_table, time_fn, write_result
from modformer.cli import HelpFormatter
from modformer.layers.attention.kernels import AttnSpec, attend


def flops(b: int, h: int, t: int, dh: int, backward: bool) -> float:
    fwd = 2.0 * b * h * t * t * dh
    return fwd * 3.5 if backward else fwd


def bench_one(t: int, dh: int, device: torch.device, dtype: torch.dtype, total_tokens: int, width: int,
              iters: int, rounds: int = 3) -> list[dict[str, Any]]:
    b, h = max(total_tokens // t, 1), width // dh
    q, k, v = (torch.randn(b, h, t, dh, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(b, h, t, dh, device=device, dtype=dtype)
    impls = {
        "raw_sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "modformer_sdpa": lambda: attend(q, k, v, AttnSpec(causal=True), "sdpa")[0],
        "modformer_flex": lambda: attend(q, k, v, AttnSpec(causal=True), "flex")[0],
    }
    names = [n for n in impls if not (n == "modformer_flex" and device.type != "cuda")]  # flex: no CPU backward
    rows = {n: {"impl": n, "T": t, "head_dim": dh, "batch": b, "heads": h} for n in names}
    for r in range(rounds):       # rotate the order each round and keep each impl's best median, so
        for name in names[r % len(names):] + names[:r % len(names)]:   # clocks/heat favour no one
            row, fn = rows[name], impls[name]
            if "error" in row:
                continue
            try:
                with torch.no_grad():
                    tf = time_fn(fn, device, warmup=3, iters=iters)

                def fwd_bwd(fn=fn) -> None:
                    fn().backward(grad)

                tb = time_fn(fwd_bwd, device, warmup=3, iters=iters)
            except torch.OutOfMemoryError:
                row["error"] = "OOM"
                torch.cuda.empty_cache()
                continue
            q.grad = k.grad = v.grad = None
            if tf * 1e3 < row.get("fwd_ms", float("inf")):
                row["fwd_ms"], row["fwd_tflops"] = tf * 1e3, flops(b, h, t, dh, False) / tf / 1e12
            if tb * 1e3 < row.get("fwd_bwd_ms", float("inf")):
                row["fwd_bwd_ms"], row["fwd_bwd_tflops"] = tb * 1e3, flops(b, h, t, dh, True) / tb / 1e12
    if device.type == "cuda":     # profiler evidence: forward kernel time and which kernels each path ran
        for name in names:
            if "error" not in rows[name]:
                with torch.no_grad():
                    sec, kernels = kernel_breakdown(impls[name], 3, iters)
                rows[name]["fwd_kernel_ms"], rows[name]["fwd_kernels"] = sec * 1e3, kernels
    return list(rows.values())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="modformer bench attention", description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter,
                                epilog=("examples:\n"
                                        "  modformer bench attention\n"
                                        "  modformer bench attention --seq 512 2048 8192 16384 --head-dim 64"))
    p.add_argument("--seq", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384],
                   help="sequence lengths T")
    p.add_argument("--head-dim", type=int, nargs="+", default=[64, 128], help="head dimensions")
    p.add_argument("--tokens", type=int, default=16384, help="B*T per call")
    p.add_argument("--width", type=int, default=2048, help="H*Dh")
    p.add_argument("--iters", type=int, default=20, help="timed calls per shape and round")
    p.add_argument("--rounds", type=int, default=3, help="timing rounds in rotated order; best median kept")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda | cpu (default: cuda when available)")
    p.add_argument("--out", default=DEFAULT_OUT, help="result folder (benchmarks/results: the committed answer)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    shapes = [(dh, t) for dh in args.head_dim for t in args.seq]
    for dh, t in cases(shapes, "attention", lambda s: f"next: head_dim {s[0]}, T {s[1]}"):
        rows += bench_one(t, dh, device, dtype, args.tokens, args.width, args.iters, args.rounds)
        print_table(rows[-3:])
    for r in rows:     # ratio of each implementation's time to raw SDPA's at the same shape
        ref = next(x for x in rows if x["impl"] == "raw_sdpa" and x["T"] == r["T"] and x["head_dim"] == r["head_dim"])
        for key in ("fwd_ms", "fwd_bwd_ms", "fwd_kernel_ms"):
            if key in r and key in ref:
                r[key.replace("_ms", "_ratio_vs_sdpa")] = ref[key] / r[key]
    ours = [r for r in rows if r["impl"] == "modformer_sdpa"]
    ratios = [r[k] for r in ours for k in ("fwd_ratio_vs_sdpa", "fwd_bwd_ratio_vs_sdpa") if k in r]
    big = [r["fwd_bwd_tflops"] for r in ours if r["head_dim"] == 128 and r["T"] >= 4096 and "fwd_bwd_tflops" in r]
    kernel = [r["fwd_kernel_ratio_vs_sdpa"] for r in ours if "fwd_kernel_ratio_vs_sdpa" in r]
    headline = {"min_ratio_vs_sdpa": min(ratios) if ratios else None,
                "min_fwd_kernel_ratio_vs_sdpa": min(kernel) if kernel else None,
                "fwd_bwd_tflops_causal_hd128_t4k": min(big) if big else None}
    print_table(rows, ["impl", "T", "head_dim", "fwd_tflops", "fwd_bwd_tflops", "fwd_ratio_vs_sdpa",
                       "fwd_bwd_ratio_vs_sdpa", "fwd_kernel_ratio_vs_sdpa"])
    print(f"headline: {headline}")
    print(f"wrote {write_result('attention', headline, rows, device, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
