"""Where batch-1 decoding time goes (issue 4): eager step time per SDPA backend, and GraphDecoder knobs.

1. Eager decoding with the growing cache, 20 steps, three passes over the same key lengths, then once per
   SDPA backend: shows the per-new-shape cost of cuDNN attention (first pass slow, later passes fast) that
   made eager generation ~50 ms/token; plus a torch.profiler table of one pass.
2. ``generate(compile=True)`` (the CUDA-graph ``GraphDecoder``) with Inductor options / SDPA backends.

    python benchmarks/decode_probe.py --out benchmarks/results/logs/generation_decode_knobs.json   # GPU
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

import modformer as mf
from modformer.bench.throughput import PRESETS, gpt2_config
from modformer.models.generation import GraphDecoder

KNOBS = {"default": ({}, None), "math_attention": ({}, [SDPBackend.MATH]),
         "coordinate_descent": ({"coordinate_descent_tuning": True}, None),
         "decompose_mem_bound_mm": ({"decompose_mem_bound_mm": True}, None)}


def eager_ms_per_step(model: torch.nn.Module, prompt: torch.Tensor, n: int = 20) -> float:
    with torch.no_grad():
        cache = model.new_cache(prompt.shape[0])
        model(prompt, cache=cache, last_only=True)
        tok = prompt[:, -1:]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            tok = model(tok, cache=cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--knobs", nargs="+", default=list(KNOBS), choices=list(KNOBS))
    ap.add_argument("--new-tokens", type=int, default=1024)
    ap.add_argument("--out", default=None, help="JSON file (default: print only)")
    args = ap.parse_args()
    spec = dict(PRESETS["gpt2-124m"]["model"], max_seq_len=16 + args.new_tokens)
    torch.manual_seed(0)
    model = mf.build_model(gpt2_config(spec)).cuda().to(torch.bfloat16).eval()
    prompt = torch.randint(0, spec["vocab_size"], (1, 16), device="cuda")
    rows: list[dict] = [{"eager_ms_per_step_passes": [round(eager_ms_per_step(model, prompt), 2) for _ in range(3)]}]
    for b in [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]:
        with sdpa_kernel([b]):
            rows.append({"eager_backend": str(b), "ms_per_step": round(eager_ms_per_step(model, prompt), 2)})
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        eager_ms_per_step(model, prompt, 3)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60))
    ref = None
    for name in args.knobs:
        GraphDecoder.compile_options, GraphDecoder.sdpa_backends = KNOBS[name][0] or None, KNOBS[name][1]
        model.__dict__.pop("_decoder", None)
        torch._dynamo.reset()
        model.generate(prompt, args.new_tokens, temperature=0, compile=True)    # compile + capture
        times = []
        for _ in range(3):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = model.generate(prompt, args.new_tokens, temperature=0, compile=True)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        ref = out if ref is None else ref
        rows.append({"knob": name, "tokens_per_s": round(args.new_tokens / min(times), 1),
                     "token_agreement_with_first": float((out == ref).float().mean())})
    for r in rows:
        print(r)
    if args.out:
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                              "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
