"""Training throughput: step time, tokens/s and MFU of modformer vs HF GPT2LMHeadModel and nanoGPT, same run.

Both models get the same GPT-2-shaped config and weights (``mf.hf.to_hf``), the same batch, the
same fused AdamW and the same loss. Rows are cumulative techniques for modformer (fp32 -> bf16
autocast -> fused AdamW -> torch.compile -> CUDA graphs, the last on GPU), the trainer's path (compiled
model, its ``lm_loss`` compiled apart), FP8 linear layers (``train.precision: fp8``; GPUs of compute
capability >= 8.9) with tensorwise and rowwise scaling, and the HF peer with and without compile.

``--peer-nanogpt PATH`` adds nanoGPT's own model (its checkout's ``model.py``, imported from the path, never copied)
at its ``bench.py`` setting: bf16 autocast, torch.compile, its ``configure_optimizers`` (fused AdamW), the loss
inside its compiled forward, on the same batch. Its model has no biases (``bench.py``'s ``bias=False``); ours keeps
GPT-2's, so the comparison is conservative for us. ``--fp8-loss-steps N`` trains a recipe (default the GPT-2-124M
WikiText-2 one) N steps in bf16 and again in FP8 (same seed, same batches) and reports the relative gap of the mean
training loss over the last 100 steps (``fp8_loss_gap``; the goal is <= 1%), with both curves in the rows.

No speed-up is claimed on a CPU (the ratios in the headline are null there: timings on a shared CPU are noise).
MFU = flops_per_token (PaLM formula) x tokens/s / 989 TF (H100 SXM dense bf16).

    modformer bench throughput --preset gpt2-124m --peer-nanogpt ../nanoGPT --out benchmarks/results
    modformer bench throughput --preset gpt2-124m --peer-nanogpt ../nanoGPT --variant nanogpt \
        --fp8-loss-steps 500 --results-name fp8_loss_gap --out benchmarks/results
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
from modformer.bench.common import (
    DEFAULT_OUT,
    H100_BF16_PEAK,
    cases,
    matmul_ceiling,
    print_table,
    time_fn,
    write_result,
)
from modformer.bench.fp8_gap import fp8_loss_gap
from modformer.bench.nanogpt_peer import build_peer_model, checkout, load_model_module
from modformer.cli import HelpFormatter
from modformer.train.fp8 import convert_to_float8, fp8_supported
from modformer.train.loss import lm_loss

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


def measure(model: torch.nn.Module, kind: str, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype | None,
            fused: bool, compile_model: bool | str, steps: int, device: torch.device,
            profile_to: str | None = None, loss: str = "compiled") -> dict[str, float]:
    """Median step time of forward + cross-entropy + backward + AdamW step.

    ``kind``: modformer | hf | nanogpt (its forward returns the loss; its own ``configure_optimizers``).
    ``compile_model`` is False, True (default mode) or a torch.compile mode name; ``loss``: ``compiled`` (the
    cross-entropy inside the compiled region) or ``trainer`` (the trainer's path: the model compiled, and the
    trainer's ``lm_loss`` compiled apart from it); ``profile_to`` writes the step's top GPU kernels (torch.profiler)."""
    if kind == "nanogpt":
        opt = model.configure_optimizers(weight_decay=1e-2, learning_rate=1e-4, betas=(0.9, 0.95),
                                         device_type=device.type)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=fused or None)
    amp = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    mode = compile_model if isinstance(compile_model, str) else None
    apart = compile_model and loss == "trainer"         # the trainer's path: model and loss compiled apart
    net = torch.compile(model, mode=mode) if apart else model
    trainer_loss = torch.compile(lm_loss, dynamic=False) if apart else lm_loss

    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with amp:
            if kind == "nanogpt":
                return net(x, y)[1]
            logits = net(input_ids=x).logits if kind == "hf" else net(x)
            if loss == "trainer":
                return trainer_loss(logits.flatten(0, 1), y.flatten())[1] / y.numel()
            return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())

    compile_all = compile_model and not apart
    fwd = torch.compile(loss_fn, mode=mode) if compile_all else loss_fn   # same compiled region for every model

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


NANOGPT_VARIANT = "nanoGPT GPT (bench.py setting)"


def variants(device: torch.device, with_hf: bool, compile_ok: bool, peer: bool) -> list[dict[str, Any]]:
    """The rows to time: name, model kind, autocast dtype, fused AdamW, compile (False / True / a mode), FP8 recipe
    (None = bf16 matmuls), loss path."""
    gpu = device.type == "cuda"
    bf16 = torch.bfloat16 if gpu else None

    def v(name: str, kind: str = "modformer", dtype: torch.dtype | None = bf16, fused: bool = gpu,
          comp: bool | str = False, fp8: str | None = None, loss: str = "compiled") -> dict[str, Any]:
        return dict(name=name, kind=kind, dtype=dtype, fused=fused, comp=comp, fp8=fp8, loss=loss)

    out = [v("modformer fp32", dtype=None, fused=False), v("modformer +bf16 autocast", fused=False),
           v("modformer +fused AdamW")]
    if compile_ok:
        out.append(v("modformer +torch.compile", comp=True))
        out.append(v("modformer +compile, loss compiled apart (trainer's path)", comp=True, loss="trainer"))
        if gpu:
            out.append(v("modformer +CUDA graphs (reduce-overhead)", comp="reduce-overhead"))
        if fp8_supported(device)[0] and gpu:
            out += [v("modformer +fp8 tensorwise (e4m3 / e5m2 grads) +compile", comp=True, fp8="tensorwise"),
                    v("modformer +fp8 rowwise (e4m3 / e4m3 grads) +compile", comp=True, fp8="rowwise")]
    if with_hf:
        out.append(v("HF GPT2LMHeadModel (sdpa)", kind="hf"))
        if compile_ok:
            out.append(v("HF GPT2LMHeadModel +torch.compile", kind="hf", comp=True))
    if peer:
        out.append(v(NANOGPT_VARIANT, kind="nanogpt", comp=compile_ok))
    return out


def run(preset: str, steps: int, device: torch.device, with_hf: bool, compile_ok: bool,
        profile_dir: str | None = None, peer_nanogpt: str | None = None,
        only: list[str] | None = None) -> list[dict[str, Any]]:
    spec = PRESETS[preset]
    cfg = gpt2_config(spec["model"])
    torch.manual_seed(0)
    base = mf.build_model(cfg).to(device)
    x = torch.randint(0, cfg.vocab_size, (spec["batch"], spec["seq"]), device=device)
    y = torch.randint(0, cfg.vocab_size, (spec["batch"], spec["seq"]), device=device)
    tokens = x.numel()
    flops = base.flops_per_token(spec["seq"])
    gpu = device.type == "cuda"
    peer_module = load_model_module(peer_nanogpt) if peer_nanogpt else None
    rows = []
    chosen = [v for v in variants(device, with_hf, compile_ok, peer_module is not None)
              if not only or any(o.lower() in v["name"].lower() for o in only)]
    if not chosen:
        raise SystemExit(f"--variant {only}: matches none of this device's variants")
    for var in cases(chosen, "throughput", lambda v: f"next: {v['name']}"):
        name = var["name"]
        torch.manual_seed(0)
        if var["kind"] == "nanogpt":
            m = spec["model"]
            model = build_peer_model(peer_module, m["vocab_size"], m["n_layer"], m["n_head"], m["d_model"],
                                     spec["seq"]).to(device)
        else:
            model = mf.build_model(cfg).to(device)
            model.load_state_dict(base.state_dict())
            if var["fp8"]:
                convert_to_float8(model, var["fp8"])
            if var["kind"] == "hf":
                model = mf.hf.to_hf(model).to(device)
        model.train()
        prof = f"{profile_dir}/{preset}_{re.sub(r'[^A-Za-z0-9]+', '_', name).strip('_')}.txt" if profile_dir else None
        r = measure(model, var["kind"], x, y, var["dtype"], var["fused"], var["comp"], steps, device, prof,
                    var["loss"])
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
    p = argparse.ArgumentParser(prog="modformer bench throughput", description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter,
                                epilog=("examples:\n"
                                        "  modformer bench throughput --preset tiny\n"
                                        "  modformer bench throughput --preset gpt2-124m --steps 20"))
    p.add_argument("--preset", action="append", choices=sorted(PRESETS), help="repeatable (default: both real ones)")
    p.add_argument("--steps", type=int, default=20, help="timed training steps per variant")
    p.add_argument("--no-hf", action="store_true", help="skip the HF GPT2LMHeadModel peer")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    p.add_argument("--profile-dir", help="write each variant's top GPU kernels (torch.profiler) here")
    p.add_argument("--variant", action="append", metavar="TEXT",
                   help="time only the variants whose name contains TEXT (repeatable, case-insensitive)")
    p.add_argument("--peer-nanogpt", metavar="PATH", help="a nanoGPT checkout: time its model at bench.py's setting")
    p.add_argument("--fp8-loss-steps", type=int, default=0,
                   help="train --fp8-loss-config this many steps in bf16 and in fp8; report fp8_loss_gap (0 = skip)")
    p.add_argument("--fp8-loss-config", default="configs/ddp_gpt2_wikitext2.yaml",
                   help="recipe of the FP8 loss-gap runs (GPT-2 124M on WikiText-2)")
    p.add_argument("--fp8-loss-precision", nargs="+", default=["fp8"], choices=["fp8", "fp8_rowwise"],
                   help="FP8 precisions trained beside bf16; the first gives fp8_loss_gap")
    p.add_argument("--fp8-loss-set", action="append", default=[], metavar="key=value",
                   help="override for both loss-gap runs (repeatable), e.g. train.batch_size=8")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda | cpu (default: cuda when available)")
    p.add_argument("--out", default=DEFAULT_OUT, help="result folder (benchmarks/results: the committed answer)")
    p.add_argument("--results-name", default="throughput",
                   help="result file name without .json (e.g. fp8_loss_gap for a loss-gap-only run)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    presets = args.preset or ["gpt2-124m", "char-10m"]
    if args.peer_nanogpt:
        checkout(args.peer_nanogpt, "model.py")             # a wrong path fails before any timing
    rows = []
    for preset in presets:
        rows += run(preset, args.steps, device, not args.no_hf, not args.no_compile, args.profile_dir,
                    args.peer_nanogpt, args.variant)
    ceiling = matmul_ceiling(device)
    print_table(rows, ["preset", "variant", "step_ms", "tokens_per_s", "mfu", "peak_mem_gib"])
    first = presets[0]

    def best(prefix: str) -> dict[str, Any]:
        cands = [r for r in rows if r["preset"] == first and r["variant"].startswith(prefix)]
        return max(cands, key=lambda r: r["tokens_per_s"]) if cands else {}

    ours, hf, peer = best("modformer"), best("HF"), best(NANOGPT_VARIANT)
    ours_bf16 = max((r for r in rows if r["preset"] == first and r["variant"].startswith("modformer")
                     and "fp8" not in r["variant"]), key=lambda r: r["tokens_per_s"], default={})
    gpu = device.type == "cuda"                      # a CPU's timings are noise: no ratio is claimed there

    def ratio(a: dict[str, Any], b: dict[str, Any]) -> float | None:
        return a["tokens_per_s"] / b["tokens_per_s"] if gpu and a and b else None

    headline = {"preset": first, "best_variant": ours.get("variant"), "tokens_per_s": ours.get("tokens_per_s"),
                "step_ms": ours.get("step_ms"), "hf_tokens_per_s": hf.get("tokens_per_s"),
                "nanogpt_tokens_per_s": peer.get("tokens_per_s"), "nanogpt_step_ms": peer.get("step_ms"),
                "speedup_vs_nanogpt": ratio(ours, peer), "speedup_vs_nanogpt_bf16": ratio(ours_bf16, peer),
                "speedup_vs_hf": ratio(ours, hf),
                "mfu": ours.get("mfu"), "matmul_ceiling_tflops": ceiling / 1e12,
                "mfu_of_measured_ceiling": ours["tokens_per_s"] * mf.build_model(gpt2_config(
                    PRESETS[first]["model"])).flops_per_token(PRESETS[first]["seq"]) / ceiling if ours else None}
    headline["fp8_loss_gap"] = None
    filename = f"{args.results_name}.json"
    path = write_result("throughput", headline, rows, device, args.out, filename=filename)  # kept if the gap fails
    if args.fp8_loss_steps and not fp8_supported(device)[0]:
        print(f"fp8_loss_gap skipped: {fp8_supported(device)[1]} has no FP8 matmuls (needs compute capability >= 8.9)")
    elif args.fp8_loss_steps:
        gap, curves = fp8_loss_gap(args.fp8_loss_config, args.fp8_loss_steps, args.fp8_loss_set, args.device,
                                   precisions=tuple(args.fp8_loss_precision))
        headline["fp8_loss_gap"] = gap
        headline["fp8_loss_gaps"] = {r["variant"].removeprefix("loss curve "): r["relative_gap"] for r in curves[1:]}
        rows += curves
        print_table(curves, ["variant", "steps", "first_loss", "loss_last_100", "relative_gap"])
        path = write_result("throughput", headline, rows, device, args.out, filename=filename)
    print(f"headline: {headline}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
