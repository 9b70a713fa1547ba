"""Generation speed: new tokens/s for 1, 8 and 64 sequences, with and without KV cache, vs HF generate.

modformer runs greedy decoding with (a) no cache, (b) the growing cache, (c) the static cache with
the decode step compiled into CUDA graphs (``generate(..., static_cache=True, compile=True)``).
HF ``GPT2LMHeadModel.generate`` decodes the same weights (``mf.hf.to_hf``) with its dynamic cache
and, where it works, its static cache. The tokens produced are compared too.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

import modformer as mf
from modformer.bench.common import DEFAULT_OUT, print_table, sync, write_result
from modformer.bench.throughput import PRESETS, gpt2_config


def timed(fn: Any, device: torch.device) -> tuple[Any, float]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def make_runs(model: torch.nn.Module, hf: torch.nn.Module | None, prompt: torch.Tensor, n: int, hn: int,
              slow_n: int, gpu: bool) -> dict[str, Any]:
    """The decoding variants to time, as zero-argument callables."""
    runs = {
        "modformer no cache": lambda: model.generate(prompt, slow_n, temperature=0, use_cache=False),
        "modformer dynamic cache": lambda: model.generate(prompt, n, temperature=0),
        "modformer static cache + compile": lambda: model.generate(prompt, n, temperature=0, static_cache=True,
                                                                   compile=gpu),
    }
    if hf is not None:
        mask = torch.ones_like(prompt)
        common = dict(attention_mask=mask, max_new_tokens=hn, min_new_tokens=hn, do_sample=False, pad_token_id=0)
        runs["HF generate (dynamic cache)"] = lambda: hf.generate(prompt, **common)
        runs["HF generate (static cache)"] = lambda: hf.generate(prompt, cache_implementation="static", **common)
    return runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="modformer bench generation", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="gpt2-124m", choices=sorted(PRESETS))
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--new-tokens", type=int, default=1024)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--no-cache-tokens", type=int, default=128,
                   help="tokens generated without cache for batch > 1 (the slow path); batch 1 does all")
    p.add_argument("--hf-new-tokens", type=int, default=256, help="HF decodes fewer tokens (it is slow)")
    p.add_argument("--no-hf", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=DEFAULT_OUT, help="result folder (benchmarks/results: the committed answer)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    spec = dict(PRESETS[args.preset]["model"])
    spec["max_seq_len"] = max(spec["max_seq_len"], args.prompt_len + args.new_tokens)
    torch.manual_seed(0)
    model = mf.build_model(gpt2_config(spec)).to(device).eval()
    hf = None if args.no_hf else mf.hf.to_hf(model).to(device=device, dtype=dtype).eval()
    model = model.to(dtype)
    rows: list[dict[str, Any]] = []
    n, hn = args.new_tokens, min(args.hf_new_tokens, args.new_tokens)
    for b in args.batch:
        prompt = torch.randint(0, spec["vocab_size"], (b, args.prompt_len), device=device)
        slow_n = n if b == 1 else min(n, args.no_cache_tokens)
        runs = make_runs(model, hf, prompt, n, hn, slow_n, gpu)
        outputs = {}
        for name, fn in runs.items():
            new = slow_n if "no cache" in name else (hn if name.startswith("HF") else n)
            row: dict[str, Any] = {"variant": name, "batch": b, "new_tokens": new}
            try:
                with torch.no_grad():
                    if "compile" in name or "static" in name:
                        timed(fn, device)          # first call compiles / captures graphs: not timed
                    out, secs = timed(fn, device)
                outputs[name] = out[:, args.prompt_len:]
                row.update(seconds=secs, tokens_per_s=b * new / secs)
            except Exception as e:  # noqa: BLE001  (a peer's failure is a result, not a crash)
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            rows.append(row)
            print_table([row])
        ref = outputs.get("modformer dynamic cache")
        for name, out in outputs.items():
            k = min(out.shape[1], ref.shape[1]) if ref is not None else 0
            match = float((out[:, :k] == ref[:, :k]).float().mean()) if k else None
            next(r for r in rows if r["variant"] == name and r["batch"] == b)["token_agreement"] = match

    def rate(variant: str, batch: int = 1) -> float | None:
        r = next((r for r in rows if r["variant"] == variant and r["batch"] == batch), None)
        return r.get("tokens_per_s") if r else None

    best = rate("modformer static cache + compile") or 0.0
    nocache = rate("modformer no cache")
    hf_rates = [x for x in (rate("HF generate (dynamic cache)"), rate("HF generate (static cache)")) if x]
    headline = {"tokens_per_s_batch1": best, "cache_speedup": best / nocache if nocache else None,
                "speedup_vs_hf": best / max(hf_rates) if hf_rates else None,
                "hf_tokens_per_s_batch1": max(hf_rates) if hf_rates else None}
    print_table(rows, ["variant", "batch", "new_tokens", "tokens_per_s", "token_agreement", "error"])
    print(f"headline: {headline}")
    print(f"wrote {write_result('generation', headline, rows, device, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
