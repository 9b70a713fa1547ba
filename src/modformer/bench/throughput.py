"""Training throughput: step time, tokens/s and MFU of modformer vs HF GPT2LMHeadModel, same run.

Both models get the same GPT-2-shaped config and weights (``mf.hf.to_hf``), the same batch, the
same fused AdamW and the same loss. Rows are cumulative techniques for modformer (fp32 -> bf16
autocast -> fused AdamW -> torch.compile -> CUDA graphs, the last on GPU)
and the HF peer with and without compile.
MFU = flops_per_token (PaLM formula) x tokens/s / 989 TF (H100 SXM dense bf16).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import modformer as mf
from modformer.bench.common import DEFAULT_OUT, H100_BF16_PEAK, matmul_ceiling, print_table, time_fn, write_result

PRESETS: dict[str, dict[str, Any]] = {
    "gpt2-124m": dict(model=dict(vocab_size=50304, n_layer=12, d_model=768, n_head=12, max_seq_len=1024),
                      batch=12, seq=1024),
    "char-10m": dict(model=dict(vocab_size=65, n_layer=6, d_model=384, n_head=6, max_seq_len=256),
                     batch=64, seq=256),
    "tiny": dict(model=dict(vocab_size=256, n_layer=2, d_model=64, n_head=4, max_seq_len=64), batch=4, seq=64),
}


def gpt2_config(spec: dict[str, Any]) -> mf.ModelConfig:
    return mf.ModelConfig(**spec, position="learned", norm="layernorm", ffn="gelu_tanh", bias=True,
                          tie_embeddings=True, attn_backend="sdpa")


def measure(model: torch.nn.Module, hf: bool, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype | None,
            fused: bool, compile_model: bool | str, steps: int, device: torch.device,
            profile_to: str | None = None) -> dict[str, float]:
    """Median step time of forward + cross-entropy + backward + AdamW step.

    ``compile_model`` is False, True (default mode) or a torch.compile mode name; ``profile_to`` writes
    the step's top GPU kernels (torch.profiler) to that file."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=fused or None)
    amp = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with amp:
            logits = model(input_ids=x).logits if hf else model(x)
            return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())

    mode = compile_model if isinstance(compile_model, str) else None
    fwd = torch.compile(loss_fn, mode=mode) if compile_model else loss_fn   # same compiled region for both models

    def step() -> None:
        loss = fwd(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = time_fn(step, device, warmup=5 if compile_model else 3, iters=steps)
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else float("nan")
    if profile_to:
        write_profile(step, device, profile_to)
    return {"step_ms": t * 1e3, "peak_mem_gib": peak}


def write_profile(step: Any, device: torch.device, path: str, steps: int = 3) -> None:
    """torch.profiler table of the GPU kernels of ``steps`` training steps, sorted by total device time."""
    from torch.profiler import profile

    from modformer.train.profiling import activities, op_table

    with profile(activities=activities(device)) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(op_table(prof, device, rows=30))


def run(preset: str, steps: int, device: torch.device, with_hf: bool, compile_ok: bool,
        profile_dir: str | None = None) -> list[dict[str, Any]]:
    spec = PRESETS[preset]
    cfg = gpt2_config(spec["model"])
    torch.manual_seed(0)
    base = mf.build_model(cfg).to(device)
    x = torch.randint(0, cfg.vocab_size, (spec["batch"], spec["seq"]), device=device)
    y = torch.randint(0, cfg.vocab_size, (spec["batch"], spec["seq"]), device=device)
    tokens = x.numel()
    flops = base.flops_per_token(spec["seq"])
    gpu = device.type == "cuda"
    bf16 = torch.bfloat16 if gpu else None
    # (name, HF peer?, autocast dtype, fused AdamW, compile (False / True / a torch.compile mode))
    variants = [("modformer fp32", False, None, False, False),
                ("modformer +bf16 autocast", False, bf16, False, False),
                ("modformer +fused AdamW", False, bf16, gpu, False)]
    if compile_ok:
        variants.append(("modformer +torch.compile", False, bf16, gpu, True))
        if gpu:
            variants.append(("modformer +CUDA graphs (reduce-overhead)", False, bf16, gpu, "reduce-overhead"))
    if with_hf:
        variants += [("HF GPT2LMHeadModel (sdpa)", True, bf16, gpu, False)]
        if compile_ok:
            variants.append(("HF GPT2LMHeadModel +torch.compile", True, bf16, gpu, True))
    rows = []
    for name, hf, dtype, fused, comp in variants:
        torch.manual_seed(0)
        model = mf.build_model(cfg).to(device)
        model.load_state_dict(base.state_dict())
        if hf:
            model = mf.hf.to_hf(model).to(device)
        model.train()
        prof = f"{profile_dir}/{preset}_{re.sub(r'[^A-Za-z0-9]+', '_', name).strip('_')}.txt" if profile_dir else None
        r = measure(model, hf, x, y, dtype, fused, comp, steps, device, prof)
        tps = tokens / (r["step_ms"] / 1e3)
        rows.append({"preset": preset, "variant": name, **r, "tokens_per_s": tps,
                     "mfu": flops * tps / H100_BF16_PEAK if gpu else float("nan")})
        print_table(rows[-1:])
        del model
        gc.collect()
        if gpu:
            torch.cuda.empty_cache()
        torch._dynamo.reset()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="modformer bench throughput", description=__doc__.splitlines()[0])
    p.add_argument("--preset", action="append", choices=sorted(PRESETS), help="repeatable (default: both real ones)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--no-hf", action="store_true")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--profile-dir", help="write each variant's top GPU kernels (torch.profiler) here")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=DEFAULT_OUT, help="result folder (benchmarks/results: the committed answer)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    presets = args.preset or ["gpt2-124m", "char-10m"]
    rows = []
    for preset in presets:
        rows += run(preset, args.steps, device, not args.no_hf, not args.no_compile, args.profile_dir)
    ceiling = matmul_ceiling(device)
    print_table(rows, ["preset", "variant", "step_ms", "tokens_per_s", "mfu", "peak_mem_gib"])
    first = presets[0]

    def best(prefix: str) -> dict[str, Any]:
        cands = [r for r in rows if r["preset"] == first and r["variant"].startswith(prefix)]
        return max(cands, key=lambda r: r["tokens_per_s"]) if cands else {}

    ours, hf = best("modformer"), best("HF")
    headline = {"preset": first, "tokens_per_s": ours.get("tokens_per_s"), "hf_tokens_per_s": hf.get("tokens_per_s"),
                "speedup_vs_hf": ours["tokens_per_s"] / hf["tokens_per_s"] if hf else None,
                "mfu": ours.get("mfu"), "matmul_ceiling_tflops": ceiling / 1e12,
                "mfu_of_measured_ceiling": ours["tokens_per_s"] * mf.build_model(gpt2_config(
                    PRESETS[first]["model"])).flops_per_token(PRESETS[first]["seq"]) / ceiling}
    print(f"headline: {headline}")
    print(f"wrote {write_result('throughput', headline, rows, device, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
