"""Peak GPU memory vs sequence length for the eager, sdpa and flex attention backends.

One GPT-2-124M-shaped model (RoPE, so any length fits), batch 1, bf16 autocast: training
(forward + backward) and inference (no_grad forward) at T = 512 ... 16k. Reports
``torch.cuda.max_memory_allocated`` above the weights, and "OOM" where a backend runs out.
"""

from __future__ import annotations

import argparse
import contextlib
from typing import Any

import torch

import modformer as mf
from modformer.bench.common import DEFAULT_OUT, cases, print_table, write_result
from modformer.cli import HelpFormatter


def peak_gib(model: torch.nn.Module, t: int, train: bool, device: torch.device, vocab: int) -> float | str:
    idx = torch.randint(0, vocab, (1, t), device=device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    try:
        with amp, (contextlib.nullcontext() if train else torch.no_grad()):
            logits = model(idx, last_only=not train)
            if train:
                logits.float().logsumexp(-1).mean().backward()
        model.zero_grad(set_to_none=True)
    except torch.OutOfMemoryError:
        model.zero_grad(set_to_none=True)
        return "OOM"
    if device.type != "cuda":
        return float("nan")
    return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 30


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="modformer bench memory", description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter,
                                epilog=("examples:\n"
                                        "  modformer bench memory\n"
                                        "  modformer bench memory --out benchmarks/results"))
    p.add_argument("--seq", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384],
                   help="sequence lengths T (batch 1)")
    p.add_argument("--backends", nargs="+", default=["eager", "sdpa", "flex"], help="attention backends (flex: GPU)")
    p.add_argument("--layers", type=int, default=12, help="model depth")
    p.add_argument("--width", type=int, default=768, help="d_model (heads of 64)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda | cpu (default: cuda when available)")
    p.add_argument("--out", default=DEFAULT_OUT, help="result folder (benchmarks/results: the committed answer)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    rows: list[dict[str, Any]] = []
    vocab = 50304
    for backend in cases(args.backends, "memory", lambda b: f"next: {b} backend"):
        if backend == "flex" and device.type != "cuda":
            continue
        cfg = mf.ModelConfig(vocab_size=vocab, n_layer=args.layers, d_model=args.width, n_head=args.width // 64,
                             position="rope", attn_backend=backend, max_seq_len=max(args.seq))
        model = mf.build_model(cfg).to(device)
        for mode in ("train", "inference"):
            oom = False
            for t in args.seq:
                val = "OOM" if oom else peak_gib(model, t, mode == "train", device, vocab)
                oom = oom or val == "OOM"
                rows.append({"backend": backend, "mode": mode, "T": t, "peak_gib": val})
                print_table(rows[-1:])
        del model
    print_table(rows)
    print(f"wrote {write_result('memory', {}, rows, device, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
