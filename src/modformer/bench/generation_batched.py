"""Batched generation: left-padded prompts of mixed lengths, greedy, modformer vs HF generate (issue 23).

64 prompts of 16..256 random tokens (seeded) are left-padded into one batch and decoded greedily for 128
new tokens on the GPT-2-124M shape (random GPT-2-init weights, GPT-2 vocabulary; EOS = pad = 50256), in bf16
on GPU. modformer decodes with its static cache + compiled CUDA-graph step (``generate(..., compile=True)``,
again with the ``eager`` and ``decode`` attention backends in the decode step, and with ``decode`` plus a prefill in
4 groups of rows of similar length, ``prefill_buckets=4``) and with its growing cache;
HF ``GPT2LMHeadModel.generate`` decodes the same weights (``mf.hf.to_hf``) with its static cache
(``cache_implementation="static"``: transformers compiles the decode forward by itself on GPU) and with its
default dynamic cache, in the same process. Each variant is called once to warm up
(compile, capture), then timed (CUDA-synchronised, median of ``--repeats`` calls); tokens/s = generated
tokens of all rows (through each row's EOS) / wall seconds.

Identity: the fraction of rows whose greedy tokens equal HF's. bf16 rounding differs between any two
implementations, so a near-tie can flip a token: each bf16 divergence is located and the fp32 logit gap
between the two chosen tokens there is compared with the measured bf16 logit error. Exact identity is
checked in fp32 on a few rows (ours growing + static cache vs HF), on the benchmark's weights and on a
copy with wider weights (N(0, ``--diverse-std``)): GPT-2-init random weights mostly repeat one token, which
would hide a wrong position or mask. ``--dtype fp32`` times every variant in fp32 (full-precision matmuls), where
greedy tokens must equal HF's on every row: the issue's "≥2× HF with identical greedy tokens" in one run.
``--tiny`` (small model, 4 prompts, 8 new tokens) runs on CPU in seconds.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

import modformer as mf
from modformer.bench.common import DEFAULT_OUT, cases, print_table, sync, write_result
from modformer.bench.generation import diverse_copy
from modformer.bench.throughput import gpt2_config
from modformer.cli import HelpFormatter
from modformer.cli_args import device as device_arg
from modformer.cli_args import float_in, int_in
from modformer.models.generation import left_pad

PRESETS: dict[str, dict[str, Any]] = {
    "gpt2-124m": dict(model=dict(vocab_size=50257, n_layer=12, d_model=768, n_head=12, max_seq_len=1024),
                      prompts=64, min_len=16, max_len=256, new_tokens=128),
    "tiny": dict(model=dict(vocab_size=256, n_layer=2, d_model=64, n_head=4, max_seq_len=64),
                 prompts=4, min_len=4, max_len=16, new_tokens=8),
}
OURS = "modformer static cache + compile"      # the headline variant (static cache, not compiled off GPU)
HF_STATIC = "HF generate (static cache)"       # the reference
DECODE_BACKENDS = {"eager": "modformer static cache + compile, eager decode attention",     # generate(decode_backend=)
                   "decode": "modformer static cache + compile, decode-backend attention"}
PREFILL_BUCKETS = 4             # generate(prefill_buckets=): the prefill in groups of rows of similar length
BUCKETED = f"modformer static cache + compile, decode-backend attention, {PREFILL_BUCKETS} prefill buckets"


def make_prompts(n: int, min_len: int, max_len: int, vocab: int, eos: int, seed: int) -> list[list[int]]:
    """``n`` prompts of uniform random lengths in [min_len, max_len] and random ids other than ``eos``."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=g).tolist()
    prompts = []
    for length in lengths:
        ids = torch.randint(0, vocab - 1, (length,), generator=g)
        prompts.append((ids + (ids >= eos).long()).tolist())          # skip the EOS id
    return prompts


def new_tokens(out: torch.Tensor, prompt_len: int, width: int, pad: int) -> torch.Tensor:
    """The generated part of ``out``, padded with ``pad`` to ``width`` columns (decoding ends early when
    every row has reached EOS)."""
    new = out[:, prompt_len:]
    return torch.nn.functional.pad(new, (0, width - new.shape[1]), value=pad)


def count_generated(new: torch.Tensor, eos: int) -> int:
    """Tokens generated over all rows: each row up to and including its first EOS."""
    hit = new == eos
    first = torch.where(hit.any(1), hit.float().argmax(1) + 1, torch.full_like(hit[:, 0], new.shape[1],
                                                                              dtype=torch.long))
    return int(first.sum())


def first_divergence(a: torch.Tensor, b: torch.Tensor) -> list[int | None]:
    """Per row, the first column where ``a`` and ``b`` differ (None where the rows are identical)."""
    diff = a != b
    return [int(d.nonzero()[0]) if d.any() else None for d in diff]


def timed(fn: Callable[[], torch.Tensor], device: torch.device, repeats: int) -> tuple[torch.Tensor, float, float]:
    """One untimed warm-up call (compile, graph capture), then ``repeats`` timed calls: (output, median s,
    warm-up s)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    warmup = time.perf_counter() - t0
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times), warmup


def variants(model: torch.nn.Module, hf: torch.nn.Module, idx: torch.Tensor, mask: torch.Tensor, n: int,
             eos: int, compile_ours: bool) -> dict[str, Callable[[], torch.Tensor]]:
    """The decoding variants, as zero-argument callables (same prompts, mask, EOS and pad on both sides)."""
    ours = dict(temperature=0, attention_mask=mask, eos_token_id=eos, pad_token_id=eos)
    theirs = dict(attention_mask=mask, max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    fns = {
        OURS: lambda: model.generate(idx, n, static_cache=True, compile=compile_ours, **ours),
        "modformer dynamic cache": lambda: model.generate(idx, n, **ours),
        HF_STATIC: lambda: hf.generate(idx, cache_implementation="static", **theirs),
        "HF generate (dynamic cache)": lambda: hf.generate(idx, **theirs),
    }
    if compile_ours:        # the decode backend is an option of the compiled decoder only
        for backend, name in DECODE_BACKENDS.items():
            fns[name] = lambda b=backend: model.generate(idx, n, compile=True, decode_backend=b, **ours)
        fns[BUCKETED] = lambda: model.generate(idx, n, compile=True, decode_backend="decode",
                                               prefill_buckets=PREFILL_BUCKETS, **ours)
    return fns


def fp32_identity(model: torch.nn.Module, prompts: list[list[int]], n: int, eos: int,
                  device: torch.device) -> dict[str, Any]:
    """Greedy tokens of an fp32 model (growing and static cache) vs its HF copy (dynamic cache) on
    ``prompts``, left-padded together: the fraction of rows identical in all three, and the mean number of
    distinct generated tokens per row (1-2 means the model mostly repeats a token)."""
    hf = mf.hf.to_hf(model).eval()
    idx, mask = left_pad(prompts, eos, device=device)
    kw = dict(temperature=0, attention_mask=mask, eos_token_id=eos, pad_token_id=eos)
    width = n
    ref = new_tokens(hf.generate(idx, attention_mask=mask, max_new_tokens=n, do_sample=False, eos_token_id=eos,
                                 pad_token_id=eos), idx.shape[1], width, eos)
    same = torch.ones(len(prompts), dtype=torch.bool, device=device)
    for extra in ({}, dict(static_cache=True)):
        mine = new_tokens(model.generate(idx, n, **kw, **extra), idx.shape[1], width, eos)
        same &= (mine == ref).all(1)
    distinct = statistics.mean(len(set(r.tolist())) for r in ref)
    return {"rows": len(prompts), "identical_rows": float(same.float().mean()), "distinct_tokens_per_row": distinct}


def spread(prompts: list[list[int]], k: int) -> list[list[int]]:
    """``k`` prompts spread over the length range (shortest and longest included)."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    k = min(k, len(prompts))
    picks = sorted({order[round(j * (len(order) - 1) / max(k - 1, 1))] for j in range(k)})
    return [prompts[i] for i in picks]


def divergence_gaps(model32: torch.nn.Module, prompts: list[list[int]], ours: torch.Tensor, theirs: torch.Tensor,
                    eos: int, device: torch.device) -> list[float]:
    """At each row's first disagreement, |fp32 logit of our token - fp32 logit of HF's token| given the common
    prefix: small gaps (within the bf16 logit error) are near-ties that bf16 rounding may break either way."""
    gaps = []
    for row, col in enumerate(first_divergence(ours, theirs)):
        if col is None:
            continue
        context = prompts[row] + ours[row, :col].tolist()
        with torch.no_grad():
            logits = model32(torch.tensor([context], device=device), last_only=True)[0, -1].float()
        gaps.append(float((logits[ours[row, col]] - logits[theirs[row, col]]).abs()))
    return gaps


def bf16_logit_error(model32: torch.nn.Module, model_lo: torch.nn.Module, idx: torch.Tensor,
                     mask: torch.Tensor) -> float:
    """Max |low-precision - fp32| next-token logit over the batch's prompts: the scale of rounding noise."""
    with torch.no_grad():
        hi = model32(idx, attention_mask=mask, last_only=True)[:, -1].float()
        lo = model_lo(idx, attention_mask=mask, last_only=True)[:, -1].float()
    return float((hi - lo).abs().max())


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="modformer bench generation-batched", description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter,
                                epilog="examples:\n  modformer bench generation-batched --out benchmarks/results")
    p.add_argument("--tiny", action="store_true", help="small model, 4 prompts, 8 new tokens (CPU, seconds)")
    p.add_argument("--prompts", type=int_in(">= 1"), help="number of prompts (default: 64; tiny 4)")
    p.add_argument("--min-len", type=int_in(">= 1"), help="shortest prompt (default: 16; tiny 4)")
    p.add_argument("--max-len", type=int_in(">= 1"), help="longest prompt (default: 256; tiny 16)")
    p.add_argument("--new-tokens", type=int_in(">= 1"), help="tokens to generate (default: 128; tiny 8)")
    p.add_argument("--repeats", type=int_in(">= 1"), default=3, help="timed calls per variant (median)")
    p.add_argument("--fp32-rows", type=int_in(">= 1"), default=4, help="rows checked for exact identity in fp32")
    p.add_argument("--diverse-std", type=float_in("> 0"), default=0.05,
                   help="weight std of the fp32 identity check's second model")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                   help="decoding precision of the timed variants (auto: bf16 on GPU, fp32 on CPU); an fp32 run "
                        "times every row's exact identity with HF and writes generation-batched-fp32.json")
    p.add_argument("--seed", type=int, default=0, help="seed of the random model and prompts")
    p.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device: cpu, cuda, cuda:N")
    p.add_argument("--out", default=DEFAULT_OUT, help="result folder (benchmarks/results: the committed answer)")
    args = p.parse_args(argv)
    preset = PRESETS["tiny" if args.tiny else "gpt2-124m"]
    for key in ("prompts", "min_len", "max_len", "new_tokens"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    args.model = dict(preset["model"])
    if args.min_len > args.max_len:
        p.error(f"--min-len ({args.min_len}) is above --max-len ({args.max_len})")
    if args.max_len + args.new_tokens > args.model["max_seq_len"]:
        p.error(f"--max-len + --new-tokens ({args.max_len + args.new_tokens}) exceeds the model's "
                f"{args.model['max_seq_len']} positions")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if args.dtype == "bf16" or (args.dtype == "auto" and gpu) else torch.float32
    vocab, n = args.model["vocab_size"], args.new_tokens
    eos = vocab - 1                                               # GPT-2's <|endoftext|> = 50256, also the pad
    prompts = make_prompts(args.prompts, args.min_len, args.max_len, vocab, eos, args.seed)
    idx, mask = left_pad(prompts, eos, device=device)
    torch.manual_seed(args.seed)
    model32 = mf.build_model(gpt2_config(args.model)).to(device).eval()
    start = time.perf_counter()
    checked = spread(prompts, args.fp32_rows)
    fp32 = fp32_identity(model32, checked, n, eos, device)
    fp32_diverse = fp32_identity(diverse_copy(model32, args.diverse_std, args.seed), checked, n, eos, device)
    print(f"fp32 identity ({time.perf_counter() - start:.1f} s): {fp32}; diverse weights: {fp32_diverse}")

    # fp32 timing uses the wider weights, so that identical rows are not identical repeats of one token
    model = copy.deepcopy(model32).to(dtype) if dtype != torch.float32 else \
        diverse_copy(model32, args.diverse_std, args.seed)
    hf = mf.hf.to_hf(model).eval()
    rows: list[dict[str, Any]] = []
    outputs: dict[str, torch.Tensor] = {}
    for name, fn in cases(list(variants(model, hf, idx, mask, n, eos, compile_ours=gpu).items()),
                          "generation-batched", lambda v: f"next: {v[0]}"):
        row: dict[str, Any] = {"variant": name}
        try:
            with torch.no_grad():
                out, secs, warm = timed(fn, device, args.repeats)
            outputs[name] = new_tokens(out, idx.shape[1], n, eos)
            tokens = count_generated(outputs[name], eos)
            row.update(tokens=tokens, seconds=secs, tokens_per_s=tokens / secs, warmup_s=warm)
        except Exception as e:  # noqa: BLE001  (a peer's failure is a result, not a crash)
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        rows.append(row)
        print_table([row])
    # HF compiles static-cache decoding itself
    compiled = {OURS: gpu, BUCKETED: gpu, **{name: gpu for name in DECODE_BACKENDS.values()},
                HF_STATIC: hasattr(hf, "_compiled_call")}
    ref_name = HF_STATIC if HF_STATIC in outputs else "HF generate (dynamic cache)"
    ref = outputs.get(ref_name)
    for row in rows:
        row["compiled"] = compiled.get(row["variant"], False)
        if row["variant"] in outputs and ref is not None:
            row["identical_rows_vs_hf"] = float((outputs[row["variant"]] == ref).all(1).float().mean())

    gaps, err = [], None
    if OURS in outputs and ref is not None:
        exact = model if dtype == torch.float32 else model32          # the timed weights, in fp32
        gaps = divergence_gaps(exact, prompts, outputs[OURS], ref, eos, device)
        err = bf16_logit_error(exact, model, idx, mask)

    def rate(variant: str) -> float | None:
        return next((r.get("tokens_per_s") for r in rows if r["variant"] == variant), None)

    ours, hf_static = rate(OURS), rate(HF_STATIC)
    hf_best = max((x for x in (hf_static, rate("HF generate (dynamic cache)")) if x), default=None)
    headline = {
        "tokens_per_s": ours, "hf_tokens_per_s": hf_static,
        "speedup_vs_hf": ours / hf_static if ours and hf_static else None,
        "speedup_vs_hf_best": ours / hf_best if ours and hf_best else None,
        "dynamic_tokens_per_s": rate("modformer dynamic cache"),
        "identical_rows": next((r.get("identical_rows_vs_hf") for r in rows if r["variant"] == OURS), None),
        "divergent_rows": len(gaps),
        "divergences_at_near_ties": sum(g <= 2 * err for g in gaps) if err is not None else None,
        "fp32_identical_rows": fp32["identical_rows"], "fp32_identical_rows_diverse": fp32_diverse["identical_rows"],
    }
    for key, name in {**{f"{b}_decode": v for b, v in DECODE_BACKENDS.items()}, "bucketed_prefill": BUCKETED}.items():
        tps = rate(name)
        if tps:
            headline.update({f"{key}_tokens_per_s": tps,
                             f"{key}_speedup_vs_hf": tps / hf_static if hf_static else None,
                             f"{key}_identical_rows": next(r.get("identical_rows_vs_hf") for r in rows
                                                           if r["variant"] == name)})
    lengths = [len(p) for p in prompts]
    extra = {"setup": {"preset": "tiny" if args.tiny else "gpt2-124m", "model": args.model, "dtype": str(dtype),
                       "prompts": len(prompts), "prompt_len_min": min(lengths), "prompt_len_max": max(lengths),
                       "prompt_len_mean": statistics.mean(lengths), "padded_len": idx.shape[1], "new_tokens": n,
                       "eos_and_pad_id": eos, "seed": args.seed, "repeats": args.repeats,
                       "identity_reference": ref_name, "transformers": _transformers_version(),
                       "float32_matmul_precision": torch.get_float32_matmul_precision()},
             "fp32_check": {"benchmark_weights": fp32, "diverse_weights": {**fp32_diverse, "std": args.diverse_std}},
             "bf16_divergences": {"fp32_logit_gaps": gaps, "logit_error": err,
                                  "near_tie": "gap <= 2 x logit_error (each side may be off by the error)"}}
    print_table(rows, ["variant", "compiled", "tokens", "seconds", "tokens_per_s", "warmup_s", "identical_rows_vs_hf",
                       "error"])
    print(f"headline: {headline}")
    name = "generation-batched" + ("-fp32" if args.dtype == "fp32" else "")
    path = write_result("generation-batched", headline, rows, device, args.out, extra=extra, filename=f"{name}.json")
    print(f"wrote {path}")
    return 0


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


if __name__ == "__main__":
    raise SystemExit(main())
