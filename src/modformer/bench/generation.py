"""Decoding speed: new tokens/s at batch 1 (and more), no cache / growing cache / compiled graph vs HF generate.

GPT-2-124M shape (random GPT-2-init weights), bf16 on GPU, greedy, a 16-token random prompt, 1024 new tokens.
modformer decodes (a) without a cache (the uncached path: the whole context re-run per token), (b) with its
growing cache, eager, and (c) with its static cache and the decode step compiled and captured as a CUDA graph
(``generate(..., compile=True)``), in the decoder settings named by ``--decoders``: ``graph`` (one step per
graph, default Inductor), ``graph16`` (16 steps per graph), ``decode16`` (16 steps per graph and the
Inductor-fused decode attention, ``decode_backend="decode"``), ``matvec16`` (16 steps per graph, the linears as
Inductor matrix-vector reductions, ``decode_linear="matvec"``), ``matvec16cd`` (that, with Inductor's
coordinate-descent tuning of the reduction kernels' block sizes), ``decode_matvec16cd`` (that, with the decode
attention), ``flex_matvec16cd`` (that, with FlexAttention's split-KV decoding kernel, ``decode_backend="flex"``),
``autotune`` / ``autotune16`` (Inductor max-autotune GEMMs; compiles for minutes). The peer is HF
``GPT2LMHeadModel.generate`` on the same weights (``mf.hf.to_hf``) with its static cache
(``cache_implementation="static"``: transformers compiles the decode forward itself on GPU), and with
``--hf-dynamic`` its dynamic cache. Fast paths are timed ``--repeats`` times after one untimed warm-up call
(compile, capture); the median is reported.

Kernels per token: the CUDA kernels one decode step launches (= one graph replay per token), counted with
torch.profiler (``GraphDecoder.profile_step``), with their device µs per token (against the wall µs per token:
GPU-bound or launch-bound) and the top kernels by device time.

Greedy agreement: in fp32 the compiled decoder's 1024 tokens must equal the uncached path's exactly
(``greedy_match``), on the benchmark's weights and on a copy with wider weights (N(0, ``--diverse-std``)),
since GPT-2-init random weights mostly repeat one token. In bf16 any two kernel
orders round differently, so the agreement with the bf16 uncached path is reported with, at the first divergence,
the fp32 logit gap between the two tokens against the bf16-vs-fp32 logit error there (a near tie when the gap is
within twice the error). ``--preset tiny --new-tokens 24`` runs end to end on a CPU in seconds (no compile there:
the static cache runs eagerly; ``--compile-cpu`` compiles anyway).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

import modformer as mf
from modformer.bench.common import DEFAULT_OUT, cases, print_table, sync, write_result
from modformer.bench.throughput import PRESETS, gpt2_config
from modformer.cli import HelpFormatter
from modformer.cli_args import device as device_arg
from modformer.cli_args import float_in, int_in

GOAL = 4000.0                     # issue 24: batch-1 tokens/s on one H200
NO_CACHE = "modformer no cache"
# --decoders: row name and generate() keywords of each compiled-decoder setting (compiled only on GPU)
DECODERS: dict[str, tuple[str, dict[str, Any]]] = {
    "graph": ("modformer static cache + compile", dict(compile=True)),
    "graph16": ("modformer static cache + compile, 16 steps/graph", dict(compile=True, graph_steps=16)),
    "decode16": ("modformer static cache + compile, 16 steps/graph, decode attention",
                 dict(compile=True, graph_steps=16, decode_backend="decode")),
    "matvec16": ("modformer static cache + compile, 16 steps/graph, matvec linears",
                 dict(compile=True, graph_steps=16, decode_linear="matvec")),
    "matvec16cd": ("modformer static cache + compile coordinate-descent, 16 steps/graph, matvec linears",
                   dict(compile="coordinate-descent", graph_steps=16, decode_linear="matvec")),
    "decode_matvec16cd": ("modformer static cache + compile coordinate-descent, 16 steps/graph, decode attention, "
                          "matvec linears", dict(compile="coordinate-descent", graph_steps=16,
                                                 decode_backend="decode", decode_linear="matvec")),
    "flex_matvec16cd": ("modformer static cache + compile coordinate-descent, 16 steps/graph, flex-decoding "
                        "attention, matvec linears", dict(compile="coordinate-descent", graph_steps=16,
                                                          decode_backend="flex", decode_linear="matvec")),
    "autotune": ("modformer static cache + compile max-autotune", dict(compile="max-autotune")),
    "autotune16": ("modformer static cache + compile max-autotune, 16 steps/graph",
                   dict(compile="max-autotune", graph_steps=16)),
}
HF_STATIC, HF_DYNAMIC = "HF generate (static cache)", "HF generate (dynamic cache)"


def timed(fn: Callable[[], torch.Tensor], device: torch.device, repeats: int,
          warmup: bool) -> tuple[torch.Tensor, float]:
    """(output, median seconds of ``repeats`` calls), after one untimed call when ``warmup``."""
    if warmup:
        fn()
    times, out = [], None
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def decoder_kw(name: str, compiled: bool) -> dict[str, Any]:
    """generate() keywords of decoder ``name``; not ``compiled`` (off GPU by default) the static cache runs
    eagerly."""
    return dict(DECODERS[name][1]) if compiled else dict(static_cache=True)


def step_profile(model: torch.nn.Module, top: int = 8) -> dict[str, Any] | None:
    """Kernels, device µs and the ``top`` kernels of one decode step of the model's current graph decoder (None off
    GPU or without one)."""
    decoder = getattr(model, "_decoder", None)      # the GraphDecoder the last compiled generate() used
    return decoder.profile_step(top=top) if decoder is not None else None


def first_divergence(a: torch.Tensor, b: torch.Tensor) -> int | None:
    """First column where rows ``a`` and ``b`` (1-D) differ, None where they are identical."""
    diff = (a != b).nonzero()
    return int(diff[0]) if len(diff) else None


def fp32_greedy_match(model32: torch.nn.Module, prompt: torch.Tensor, n: int, kw: dict[str, Any]) -> dict[str, Any]:
    """Greedy tokens of the fast path (``kw``) vs the uncached path, fp32, one prompt row: match fraction,
    first divergence and distinct tokens (1-2 means the model mostly repeats a token)."""
    p = prompt.shape[1]
    fast = model32.generate(prompt, n, temperature=0, **kw)[0, p:]
    slow = model32.generate(prompt, n, temperature=0, use_cache=False)[0, p:]
    return {"tokens": n, "match": float((fast == slow).float().mean()),
            "first_divergence": first_divergence(fast, slow), "distinct_tokens": len(set(slow.tolist()))}


def clone(model: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A fresh model with ``model``'s config and weights (not a deepcopy: no compiled decoder comes along)."""
    other = mf.build_model(model.cfg).to(next(model.parameters()).device)
    other.load_state_dict(model.state_dict())
    return (other.to(dtype) if dtype is not None else other).eval()


def diverse_copy(model: torch.nn.Module, std: float, seed: int) -> torch.nn.Module:
    """A copy whose weight matrices are redrawn from N(0, std): wide enough that greedy text varies."""
    other = clone(model)
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed + 1)
    with torch.no_grad():
        for p in other.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g, device=p.device, dtype=p.dtype) * std)
    return other


def divergence(model32: torch.nn.Module, model: torch.nn.Module, prompt: torch.Tensor, ours: torch.Tensor,
               ref: torch.Tensor) -> dict[str, Any] | None:
    """At the first column where ``ours`` and ``ref`` (new tokens of row 0) differ: the fp32 logit gap between
    the two tokens given the common prefix, and the max |bf16 - fp32| logit there (None if they never differ)."""
    col = first_divergence(ours[0], ref[0])
    if col is None:
        return None
    context = torch.cat([prompt[:1], ours[:1, :col]], dim=1)
    with torch.no_grad():
        hi = model32(context, last_only=True)[0, -1].float()
        lo = model(context, last_only=True)[0, -1].float()
    a, b = int(ours[0, col]), int(ref[0, col])
    gap, err = float((hi[a] - hi[b]).abs()), float((hi - lo).abs().max())
    return {"column": col, "fp32_logit_gap": gap, "logit_error": err, "near_tie": gap <= 2 * err}


Runs = dict[str, tuple[Callable[[], torch.Tensor], int, bool]]


def make_runs(model: torch.nn.Module, hf: torch.nn.Module | None, prompt: torch.Tensor, n: int, hn: int,
              slow_n: int, decoders: list[str], compiled: bool, hf_dynamic: bool) -> Runs:
    """The decoding variants: name -> (zero-argument callable, new tokens, fast path: warmed up and repeated)."""
    runs: Runs = {
        NO_CACHE: (lambda: model.generate(prompt, slow_n, temperature=0, use_cache=False), slow_n, False),
        "modformer dynamic cache": (lambda: model.generate(prompt, n, temperature=0), n, False)}
    for key in decoders:
        kw = decoder_kw(key, compiled)
        runs[DECODERS[key][0]] = (lambda kw=kw: model.generate(prompt, n, temperature=0, **kw), n, True)
    if hf is not None:
        common = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=hn, min_new_tokens=hn,
                      do_sample=False, pad_token_id=0)
        runs[HF_STATIC] = (lambda: hf.generate(prompt, cache_implementation="static", **common), hn, True)
        if hf_dynamic:
            runs[HF_DYNAMIC] = (lambda: hf.generate(prompt, **common), hn, False)
    return runs


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="modformer bench generation", description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter,
                                epilog=("examples:\n"
                                        "  modformer bench generation\n"
                                        "  modformer bench generation --batch 1 --decoders graph autotune --no-hf"))
    p.add_argument("--preset", default="gpt2-124m", choices=sorted(PRESETS), help="model size")
    p.add_argument("--batch", type=int_in(">= 1"), nargs="+", default=[1], help="batch sizes (headline: 1)")
    p.add_argument("--new-tokens", type=int_in(">= 2"), default=1024, help="tokens each fast path decodes")
    p.add_argument("--prompt-len", type=int_in(">= 1"), default=16, help="prompt tokens")
    p.add_argument("--decoders", nargs="+", choices=list(DECODERS), default=["graph", "graph16"],
                   help="compiled-decoder settings to time (see the module doc)")
    p.add_argument("--repeats", type=int_in(">= 1"), default=3, help="timed calls of each fast path (median)")
    p.add_argument("--no-cache-tokens", type=int_in(">= 1"), default=128,
                   help="tokens generated without cache for batch > 1 (the slow path); batch 1 does all")
    p.add_argument("--hf-new-tokens", type=int_in(">= 1"), default=256, help="HF decodes fewer tokens")
    p.add_argument("--no-hf", action="store_true", help="skip HF generate")
    p.add_argument("--hf-dynamic", action="store_true", help="also time HF's dynamic cache (slow)")
    p.add_argument("--no-fp32-match", action="store_true", help="skip the fp32 greedy identity check")
    p.add_argument("--compile-cpu", action="store_true",
                   help="compile the decoders off GPU too (Inductor's C++ code, no CUDA graph; slow to compile)")
    p.add_argument("--diverse-std", type=float_in("> 0"), default=0.05,
                   help="weight std of the fp32 check's second model")
    p.add_argument("--seed", type=int, default=0, help="weights and prompt seed")
    p.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda | cpu (default: cuda when available)")
    p.add_argument("--out", default=DEFAULT_OUT, help="result folder (benchmarks/results: the committed answer)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    gpu = device.type == "cuda"
    compiled = gpu or args.compile_cpu
    dtype = torch.bfloat16 if gpu else torch.float32
    spec = dict(PRESETS[args.preset]["model"])
    spec["max_seq_len"] = max(spec["max_seq_len"], args.prompt_len + args.new_tokens)
    n, hn = args.new_tokens, min(args.hf_new_tokens, args.new_tokens)
    torch.manual_seed(args.seed)
    model32 = mf.build_model(gpt2_config(spec)).to(device).eval()
    gen = torch.Generator().manual_seed(args.seed)
    prompts = {b: torch.randint(0, spec["vocab_size"], (b, args.prompt_len), generator=gen).to(device)
               for b in args.batch}

    fp32 = None
    if not args.no_fp32_match:                  # the first decoder, in fp32, vs the uncached path
        start = time.perf_counter()
        kw = decoder_kw(args.decoders[0], compiled)
        one = prompts[args.batch[0]][:1]
        fp32 = {"decoder": args.decoders[0], "float32_matmul_precision": torch.get_float32_matmul_precision(),
                "benchmark_weights": fp32_greedy_match(model32, one, n, kw),
                "diverse_weights": {**fp32_greedy_match(diverse_copy(model32, args.diverse_std, args.seed), one, n,
                                                        kw), "std": args.diverse_std}}
        print(f"fp32 greedy match ({time.perf_counter() - start:.1f} s): {fp32}")

    model = clone(model32, dtype)
    hf = None if args.no_hf else mf.hf.to_hf(model32).to(device=device, dtype=dtype).eval()
    rows: list[dict[str, Any]] = []
    outputs: dict[tuple[str, int], torch.Tensor] = {}
    for b in args.batch:
        prompt = prompts[b]
        slow_n = n if b == 1 else min(n, args.no_cache_tokens)
        runs = make_runs(model, hf, prompt, n, hn, slow_n, args.decoders, compiled, args.hf_dynamic)
        for name, (fn, new, fast) in cases(list(runs.items()), "generation",
                                           lambda r, b=b: f"next: {r[0]}, batch {b}"):
            row: dict[str, Any] = {"variant": name, "batch": b, "new_tokens": new}
            try:
                with torch.no_grad():
                    out, secs = timed(fn, device, args.repeats if fast else 1, warmup=fast)
                outputs[(name, b)] = out[:, args.prompt_len:]
                row.update(seconds=secs, tokens_per_s=b * new / secs)
                prof = step_profile(model) if name.startswith("modformer static") else None
                if prof is not None:      # device µs vs wall µs per token: GPU-bound or launch-bound
                    row.update(kernels_per_token=prof["kernels"], kernel_us_per_token=prof["device_us"],
                               wall_us_per_token=1e6 * secs / new, top_kernels=prof["top"])
            except Exception as e:  # noqa: BLE001  (a peer's failure is a result, not a crash)
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            rows.append(row)
            print_table([{k: v for k, v in row.items() if k != "top_kernels"}])
        ref = outputs.get((NO_CACHE, b))               # agreement with the uncached path, same dtype
        for row in rows:
            out = outputs.get((row["variant"], b))
            if row["batch"] == b and out is not None and ref is not None:
                k = min(out.shape[1], ref.shape[1])
                row["agreement_vs_no_cache"] = float((out[:, :k] == ref[:, :k]).float().mean())

    def at1(variant: str, key: str = "tokens_per_s") -> Any:
        return next((r.get(key) for r in rows if r["variant"] == variant and r["batch"] == 1), None)

    fast_rows = [(at1(DECODERS[k][0]), k) for k in args.decoders if at1(DECODERS[k][0])]
    best, best_key = max(fast_rows) if fast_rows else (None, None)
    best_name = DECODERS[best_key][0] if best_key else None
    hf_static, nocache = at1(HF_STATIC), at1(NO_CACHE)
    bf16_div = None
    if best_name and dtype != torch.float32 and 1 in prompts and (best_name, 1) in outputs \
            and (NO_CACHE, 1) in outputs:
        bf16_div = divergence(model32, model, prompts[1], outputs[(best_name, 1)], outputs[(NO_CACHE, 1)])
    matches = [fp32[k]["match"] for k in ("benchmark_weights", "diverse_weights")] if fp32 else []
    headline = {
        "tokens_per_s_batch1": best, "best_decoder": best_key,
        "speedup_vs_hf_static": best / hf_static if best and hf_static else None,
        "hf_static_tokens_per_s_batch1": hf_static,
        "kernels_per_token": at1(best_name, "kernels_per_token") if best_name else None,
        "kernel_us_per_token": at1(best_name, "kernel_us_per_token") if best_name else None,
        "greedy_match": min(matches) if matches else None,
        "agreement_vs_no_cache_batch1": at1(best_name, "agreement_vs_no_cache") if best_name else None,
        "cache_speedup": best / nocache if best and nocache else None,
        "goal_tokens_per_s": GOAL, "goal_met": best >= GOAL if best and gpu else None,
    }
    extra = {"setup": {"preset": args.preset, "model": spec, "dtype": str(dtype), "prompt_len": args.prompt_len,
                       "new_tokens": n, "hf_new_tokens": hn, "repeats": args.repeats, "seed": args.seed,
                       "compiled": compiled, "decoders": {k: DECODERS[k][1] for k in args.decoders},
                       "transformers": _transformers_version() if hf is not None else None},
             "fp32_check": fp32, "bf16_divergence": bf16_div}
    print_table(rows, ["variant", "batch", "new_tokens", "tokens_per_s", "kernels_per_token", "kernel_us_per_token",
                       "wall_us_per_token", "agreement_vs_no_cache", "error"])
    for name, calls, share in (at1(best_name, "top_kernels") or []) if best_name else []:
        print(f"  {share:6.1%}  {calls:5.1f}/token  {name}")
    print(f"headline: {headline}")
    print(f"wrote {write_result('generation', headline, rows, device, args.out, extra=extra)}")
    return 0


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


if __name__ == "__main__":
    raise SystemExit(main())
