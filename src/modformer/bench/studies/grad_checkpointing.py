"""Gradient checkpointing (``model.grad_checkpointing``): peak memory and step time with and without it.

Seed 003 claims a "30% memory reduction". One full training step (forward, backward, AdamW step) of a
GPT-2-124M-shaped model (12 x 768) and a 24-layer one (24 x 1024, GPT-2-medium shape), bf16 autocast on a
GPU, batch x T tokens. Memory: ``torch.cuda.max_memory_allocated`` over the timed steps (weights, gradients,
Adam state and activations: what decides whether a step fits), and the part above the memory held at the start
of a step (activations and gradients: what checkpointing changes). On CPU the second figure comes from
``torch.profiler``'s allocation events (the running sum's peak over one step, as ``train.profile_memory``),
and the total adds the weights and Adam state held between steps.
Time: median step over ``--steps`` timed steps after warm-up. The loss of the first step is compared between
the two settings (checkpointing recomputes, it must not change the numbers).

Examples:
    modformer bench grad-checkpointing                          # GPU: both models, batch 8 x 1024
    modformer bench grad-checkpointing --tiny --out runs/bench  # CPU: two small models, batch 4 x 128
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

import modformer as mf
from modformer.bench.common import DEFAULT_OUT, cases, parse_with_preset, print_table, sync, write_result
from modformer.cli import HelpFormatter

MODELS = {"gpt2-124m": (12, 768, 12), "24-layer": (24, 1024, 16), "tiny-4l": (4, 128, 4), "tiny-8l": (8, 128, 4)}


def build(name: str, ckpt: bool, seq_len: int, vocab: int, device: torch.device) -> torch.nn.Module:
    layers, width, heads = MODELS[name]
    torch.manual_seed(0)
    cfg = mf.ModelConfig(vocab_size=vocab, n_layer=layers, d_model=width, n_head=heads, max_seq_len=seq_len,
                         grad_checkpointing=ckpt)
    return mf.build_model(cfg).to(device).train()


def measure(name: str, ckpt: bool, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Peak memory and median step time of one model with or without checkpointing."""
    model = build(name, ckpt, args.seq_len, args.vocab, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, args.vocab, (args.batch, args.seq_len + 1), generator=g).to(device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    def step() -> float:
        with amp:
            logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    first_loss = step()                                  # creates the Adam state
    for _ in range(args.warmup - 1):
        step()
    row: dict[str, Any] = {"model": name, "grad_checkpointing": ckpt, "params": model.num_params(),
                           "tokens_per_step": args.batch * args.seq_len, "first_loss": first_loss}
    if device.type == "cuda":
        sync(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        from torch.profiler import ProfilerActivity, profile

        from modformer.train.profiling import cpu_peak_bytes

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
        start = 0
        row["peak_above_start_mib"] = cpu_peak_bytes(prof) / 2**20
        held = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
            v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if torch.is_tensor(v))
        row["peak_mib"] = (held + cpu_peak_bytes(prof)) / 2**20     # weights + Adam state + the step's peak
    times = []
    for _ in range(args.steps):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        row["peak_mib"] = peak / 2**20
        row["peak_above_start_mib"] = (peak - start) / 2**20
    row["step_ms"] = 1000 * statistics.median(times)
    row["step_ms_min"], row["step_ms_max"] = 1000 * min(times), 1000 * max(times)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="modformer bench grad-checkpointing", description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter, epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--models", nargs="+", default=["gpt2-124m", "24-layer"], choices=list(MODELS),
                   help="model shapes measured")
    p.add_argument("--batch", type=int, default=8, help="batch size")
    p.add_argument("--seq-len", type=int, default=1024, help="context length")
    p.add_argument("--vocab", type=int, default=50304, help="vocabulary size")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--tiny", action="store_true", help="CPU scale: tiny-4l and tiny-8l, batch 4 x 128, vocab 512")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="device: cpu, cuda, cuda:N")
    p.add_argument("--out", default=DEFAULT_OUT, help="result folder (benchmarks/results: the committed answer)")
    args = parse_with_preset(p, argv, "--tiny", models=["tiny-4l", "tiny-8l"], batch=4, seq_len=128, vocab=512,
                             warmup=2, steps=5)
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be >= 1")
    device = torch.device(args.device)
    rows = []
    for name, ckpt in cases(list(itertools.product(args.models, (False, True))), "grad-checkpointing",
                            lambda c: f"next: {c[0]}, checkpointing {'on' if c[1] else 'off'}"):
        rows.append(measure(name, ckpt, args, device))       # its model and optimizer are freed on return
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print_table(rows[-1:])
    headline: dict[str, Any] = {"batch": args.batch, "seq_len": args.seq_len, "seed_claim_memory_reduction": 0.30}
    for name in args.models:
        off, on = (next(r for r in rows if r["model"] == name and r["grad_checkpointing"] is c) for c in (False, True))
        for key in ("peak_mib", "peak_above_start_mib"):
            if key in off:
                headline[f"{name}_{key.removesuffix('_mib')}_reduction"] = 1 - on[key] / off[key]
        headline[f"{name}_step_time_overhead"] = on["step_ms"] / off["step_ms"] - 1
        headline[f"{name}_first_loss_diff"] = abs(on["first_loss"] - off["first_loss"])
    print_table(rows, ["model", "grad_checkpointing", "peak_mib", "peak_above_start_mib", "step_ms"])
    print("\n".join(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}" for k, v in headline.items()))
    print(f"wrote {write_result('grad_checkpointing', headline, rows, device, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
