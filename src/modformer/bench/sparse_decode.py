"""Decoding with the learned sparse mask at long context: per-token latency vs dense attention (issue 25).

One random model (``--layers`` x ``--d-model``, RoPE, bf16 on GPU) decodes greedily after a prompt of ``--seq``
tokens, ``--batch`` rows at a time, as

- ``dense, static cache``: the model as built, eager steps over its preallocated cache;
- ``dense, compiled graph``: the same with ``generate(compile=True)`` (one CUDA graph per step; by default on GPU
  only, ``--compiled``): the strongest ordinary dense decoder we have;
- ``learned gate, KV blocks skipped``: the same weights with ``learned_gate`` attention (block ``--block``, the
  largest top-k within ``--density`` of the causal pairs at ``--seq``), eager steps over a static cache. A step reads
  only the kept key/value blocks (``LearnedGateAttention._attend_kept_blocks``); the gate chooses once per query
  block, on its first token, so its cost is spread over ``--block`` tokens;
- ``learned gate, compiled graph``: the gate model with ``generate(compile=True)`` (as the dense one): fixed-shape steps
  (``LearnedGateAttention._graph_step``: the choice recomputed each step from pooled block summaries, the chosen
  blocks gathered) captured as CUDA graphs like the dense decoder's;
- ``..., compiled graph, decode attention``: both compiled decoders again with ``decode_backend="decode"``: the
  step's attention as a multiply-and-sum that Inductor lowers to reductions over the keys, split across the GPU
  when batch x heads is small (a single-query SDPA kernel without a split over the keys has only batch x heads
  rows of work). The dense one may be the stronger baseline at batch 1; every ratio is against the best dense row;
- ``..., compiled graph, flex decoding``: both again with ``decode_backend="flex"``: FlexAttention over the cache in
  place, its BlockMask built in the graph from the position (dense: every block up to it; the gate: its chosen
  blocks, ``gate.step_block_mask``, no gather), run by Inductor's split-KV flex-decoding kernel.

Per-token latency: for the eager variants, the median over ``--repeats`` timed calls (after one warm-up) of
``--new-tokens`` greedy steps from a cache holding the prefilled prompt, divided by the steps; for the compiled graph
(its loop is inside ``generate``), (generate - the same prefill into a static cache) / new tokens, with its kernels,
their device µs and the top kernels of one step (``GraphDecoder.profile_step``, on CUDA) and, from those, the device
time ratio to the fastest compiled dense decoder (``kernel_speedup_vs_best_compiled_dense``). The headline takes the
faster gate variant of the largest case against the best dense one. The weights are random
(latency does not depend on them; the gate keeps exactly top-k blocks whatever it scores). ``--tiny`` runs a small
model on CPU in seconds.
"""

from __future__ import annotations

import argparse
import gc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import modformer as mf
from modformer.bench.common import DEFAULT_OUT, cases, print_table, time_fn, write_result
from modformer.bench.generation import step_profile
from modformer.cli import HelpFormatter
from modformer.cli_args import float_in, int_in
from modformer.layers.attention.density import gate_density, gate_top_k

DENSE, GRAPH, GATE = "dense, static cache", "dense, compiled graph", "learned gate, KV blocks skipped"
GATE_GRAPH = "learned gate, compiled graph"
DECODE, FLEX = ", decode attention", ", flex decoding"
GRAPH_DECODE, GATE_GRAPH_DECODE = GRAPH + DECODE, GATE_GRAPH + DECODE
GRAPH_FLEX, GATE_GRAPH_FLEX = GRAPH + FLEX, GATE_GRAPH + FLEX
GATES = (GATE, GATE_GRAPH, GATE_GRAPH_DECODE, GATE_GRAPH_FLEX)
COMPILED = (GRAPH, GATE_GRAPH, GRAPH_DECODE, GATE_GRAPH_DECODE, GRAPH_FLEX, GATE_GRAPH_FLEX)


def step_seconds(model: Any, idx: torch.Tensor, n: int, device: torch.device, repeats: int) -> float:
    """Median seconds per greedy decoding step of an eager model over a static cache holding the prompt: the prompt is
    prefilled once, each timed call crops the cache back to it and decodes ``n`` tokens."""
    t = idx.shape[1]
    cache = model.new_cache(idx.shape[0], static=True, max_len=t + n + 1)
    first = model(idx, cache=cache, last_only=True)[:, -1].argmax(-1, keepdim=True)

    def decode() -> None:
        cache.crop(t)
        tok = first
        for _ in range(n):
            tok = model(tok, cache=cache, last_only=True)[:, -1].argmax(-1, keepdim=True)

    return time_fn(decode, device, 1, repeats) / n


def build_pair(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any, int]:
    """The dense model and its learned-gate copy (same weights), and the gate's top-k."""
    from modformer.compress.distill import build_student

    cfg = mf.ModelConfig(vocab_size=args.vocab, n_layer=args.layers, n_head=args.heads, d_model=args.d_model,
                         max_seq_len=max(args.seq) + args.new_tokens + args.block, position="rope",
                         attn_backend="sdpa")
    torch.manual_seed(0)
    dense = mf.build_model(cfg).to(device=device, dtype=dtype).eval()
    top_k = gate_top_k(max(args.seq), args.block, args.density)
    # flex on GPU: the long prompt's prefill skips the dropped blocks instead of building a dense (T, T) mask
    gated = build_student(dense, {"attention": "learned_gate", "attn_backend": "flex" if device.type == "cuda"
                                  else "sdpa", "attention_options": {"block_size": args.block, "top_k": top_k}})
    return dense, gated.to(device=device, dtype=dtype).eval(), top_k


def prefill_seconds(model: Any, idx: torch.Tensor, n: int, device: torch.device, repeats: int) -> float:
    """Median seconds of the prefill ``generate(compile=True)`` runs before its decode loop: the prompt into a static
    cache of the decoder's length (prompt + ``n``), which need not cost what the plain forward does. Subtracting the
    plain forward's time instead left the compiled dense decoders at batch 64 x 16k with a wall time per token ~2.8x
    their device time (9.6 vs 3.4 ms; H100, sparse_decode.json): their prefill then ran SDPA through a mask over the
    whole cache (since made plain causal, ``kernels.sdpa_attention``)."""
    cache = model.new_cache(idx.shape[0], static=True, max_len=idx.shape[1] + n)

    def prefill() -> torch.Tensor:
        cache.crop(0)
        return model(idx, cache=cache, last_only=True)

    return time_fn(prefill, device, 1, repeats)


def latency_rows(args: argparse.Namespace, device: torch.device,
                 on_case: Callable[[list[dict[str, Any]]], None] | None = None) -> list[dict[str, Any]]:
    """Every variant's row for each (T, batch) case, with its ratios; ``on_case(rows)`` after each case (the rows so
    far), so a cut-off run keeps what it measured."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dense, gated, top_k = build_pair(args, device, dtype)
    n = args.new_tokens
    rows: list[dict[str, Any]] = []
    grid = [(t, b) for t in args.seq for b in args.batch]
    for t, b in cases(grid, "sparse-decode", lambda c: f"next: T {c[0]}, batch {c[1]}"):
        idx = torch.randint(0, args.vocab, (b, t), device=device, generator=torch.Generator(device).manual_seed(t))
        variants = {DENSE: dense, GATE: gated}
        if args.compiled:
            variants.update({GRAPH: dense, GATE_GRAPH: gated, GRAPH_DECODE: dense, GATE_GRAPH_DECODE: gated,
                             GRAPH_FLEX: dense, GATE_GRAPH_FLEX: gated})
        for name, model in variants.items():
            row: dict[str, Any] = {"T": t, "batch": b, "variant": name}
            try:
                with torch.no_grad():
                    if name in COMPILED:   # the compiled decoder runs inside generate: minus the prefill
                        backend = "decode" if name.endswith(DECODE) else "flex" if name.endswith(FLEX) else None
                        prefill = prefill_seconds(model, idx, n, device, args.repeats)
                        total = time_fn(lambda m=model, x=idx, be=backend: m.generate(
                            x, n, temperature=0, compile=True, decode_backend=be), device, 1, args.repeats)
                        row.update(prefill_ms=prefill * 1e3, per_token_ms=max(total - prefill, 0.0) * 1e3 / n)
                        prof = step_profile(model, top=4)              # None off CUDA
                        if prof is not None:
                            row.update(kernels_per_token=prof["kernels"], kernel_us_per_token=prof["device_us"],
                                       top_kernels=prof["top"])
                    else:
                        row["per_token_ms"] = step_seconds(model, idx, n, device, args.repeats) * 1e3
            except Exception as e:  # noqa: BLE001  (one variant's failure is a result)
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            if name in GATES:
                row.update(top_k=top_k, density=gate_density(t, args.block, top_k))
            rows.append(row)
            print_table([{k: v for k, v in row.items() if k != "top_kernels"}])
            model.release_decoder()                         # its cache (10 GB at batch 64 x 16k) and graphs
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        add_ratios(rows)
        if on_case is not None:
            on_case(rows)
    return rows


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Each row's speed-up over the best dense row and the eager dense row of its (T, batch) case."""
    for row in rows:
        base = {r["variant"]: r.get("per_token_ms") for r in rows if (r["T"], r["batch"]) == (row["T"], row["batch"])}
        best_dense = min((x for k, x in base.items() if k not in GATES and x), default=None)
        if row.get("per_token_ms") and best_dense:
            row["speedup_vs_best_dense"] = best_dense / row["per_token_ms"]
            row["speedup_vs_dense_eager"] = base[DENSE] / row["per_token_ms"] if base.get(DENSE) else None
        kernel_us = [r["kernel_us_per_token"] for r in rows if r.get("kernel_us_per_token")
                     and (r["T"], r["batch"]) == (row["T"], row["batch"]) and r["variant"] not in GATES]
        if row.get("kernel_us_per_token") and kernel_us:     # GPU time alone: no host or prefill term
            row["kernel_speedup_vs_best_compiled_dense"] = min(kernel_us) / row["kernel_us_per_token"]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="modformer bench sparse-decode", description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter,
                                epilog="examples:\n  modformer bench sparse-decode --seq 16384 --batch 1 64")
    p.add_argument("--tiny", action="store_true", help="small model, T=256, block 16 (CPU, seconds)")
    p.add_argument("--seq", type=int_in(">= 1"), nargs="+", default=[16384], help="prompt lengths (context)")
    p.add_argument("--batch", type=int_in(">= 1"), nargs="+", default=[1, 64], help="rows decoded together")
    p.add_argument("--density", type=float_in("> 0"), default=0.1, help="kept share of the causal pairs at --seq")
    p.add_argument("--block", type=int_in(">= 1"), default=128, help="the gate's block size")
    p.add_argument("--new-tokens", type=int_in(">= 1"), default=256, help="tokens decoded per call")
    p.add_argument("--repeats", type=int_in(">= 1"), default=3, help="timed calls per variant (median)")
    p.add_argument("--layers", type=int_in(">= 1"), default=6, help="layers (the 4k teacher's shape)")
    p.add_argument("--heads", type=int_in(">= 1"), default=6, help="attention heads")
    p.add_argument("--d-model", type=int_in(">= 1"), default=384, help="model width")
    p.add_argument("--vocab", type=int_in(">= 2"), default=32768, help="vocabulary size")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:N")
    p.add_argument("--compiled", action=argparse.BooleanOptionalAction, default=None,
                   help="also time the compiled decoders (default: on CUDA only)")
    p.add_argument("--out", default=DEFAULT_OUT, help="result folder (benchmarks/results: the committed answer)")
    args = p.parse_args(argv)
    if args.tiny:
        args.seq, args.batch, args.block, args.new_tokens = [256], [2], 16, 8
        args.layers, args.heads, args.d_model, args.vocab = 2, 2, 32, 64
    if args.density > 1:
        p.error(f"--density must be in (0, 1], got {args.density}")
    if args.compiled is None:
        args.compiled = torch.device(args.device).type == "cuda"
    return args


def headline(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The fastest gate variant of the largest case against the best dense row, and its ratio at each batch."""
    best: dict[tuple[int, int], dict[str, Any]] = {}          # the faster gate variant of each case
    for r in rows:
        if r["variant"] in GATES and r.get("speedup_vs_best_dense"):
            case = (r["T"], r["batch"])
            if case not in best or r["speedup_vs_best_dense"] > best[case]["speedup_vs_best_dense"]:
                best[case] = r
    top = best[max(best)] if best else {}
    return {"seq_len": top.get("T"), "batch": top.get("batch"), "density": top.get("density"),
            "variant": top.get("variant"), "per_token_ms": top.get("per_token_ms"),
            "decode_speedup_vs_dense": top.get("speedup_vs_best_dense"),
            "decode_speedup_vs_dense_eager": top.get("speedup_vs_dense_eager"),
            "kernel_speedup_vs_best_compiled_dense": top.get("kernel_speedup_vs_best_compiled_dense"),
            "by_batch": {b: r["speedup_vs_best_dense"] for (t, b), r in best.items() if t == top.get("T")}}


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    device = torch.device(args.device)
    setup = {k: getattr(args, k) for k in ("seq", "batch", "density", "block", "new_tokens", "repeats", "layers",
                                           "heads", "d_model", "vocab", "tiny", "compiled")}

    def save(rows: list[dict[str, Any]]) -> Path:
        return write_result("sparse_decode", headline(rows), rows, device, args.out, extra={"setup": setup})

    rows = latency_rows(args, device, on_case=save)
    print_table(rows, ["T", "batch", "variant", "per_token_ms", "kernels_per_token", "kernel_us_per_token", "density",
                       "speedup_vs_best_dense", "speedup_vs_dense_eager", "error"])
    print(f"headline: {headline(rows)}")
    print(f"wrote {save(rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
