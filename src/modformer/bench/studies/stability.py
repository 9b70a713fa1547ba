"""Seed 003's claims (issue 12, study 1): the 2017 transformer against the modern one at equal size.

Seed 003 claims that modern components (pre-norm, RMSNorm, RoPE, SwiGLU, ReZero) train deeper and faster
than the 2017 design (post-norm LayerNorm, sinusoidal positions, ReLU MLP, no KV cache): "max stable
depth 12 -> 48+ layers", forward 1.9-4x faster, generation 3.7x faster. Two parts:

    modformer bench stability speed --device cuda            # timings -> OUT/stability_speed.json
    modformer sweep configs/sweeps/stability.yaml                 # depth x stabiliser training runs
    modformer bench stability depth runs/sweeps/stability [more sweep folders]   # -> OUT/stability.json

``speed``: both recipes at the same width and depth (SwiGLU's LLaMA-rounded hidden size keeps the MLP
parameter count within a few % of the ReLU MLP's), bf16 autocast on GPU: forward and forward+backward
time at T=128 and 512, and the time to generate 100 tokens for one sequence — the 2017 model without a
cache (as the seed describes it), and both models with the same KV cache, which separates the cache's
effect from the architecture's. The 2017 model scales its token embeddings by sqrt(d_model) (Vaswani et
al. 3.4; no effect on speed).

``depth``: reads the sweep's results table; a run is *diverged* when it failed with a non-finite loss,
*stalled* when its final validation loss stays above ``--stall-loss`` (default 6.0 nats = word-level
ppl 403, about what a unigram model reaches), otherwise *trained*. The headline gives, per recipe and
stabiliser, the deepest trained run and the final validation loss at each depth.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F

import modformer as mf
from modformer.bench.common import DEFAULT_OUT, cases, print_table, sync, time_fn, write_result
from modformer.cli import HelpFormatter
from modformer.config import ModelConfig

RECIPES = {   # the two columns of the seed's comparison; keys match configs/sweeps/stability.yaml
    "y2017": {"norm_placement": "post", "norm": "layernorm", "position": "sinusoidal", "ffn": "relu",
              "final_norm": False, "bias": True, "scale_embeddings": True},
    "modern": {"norm_placement": "pre", "norm": "rmsnorm", "position": "rope", "ffn": "swiglu",
               "final_norm": True, "bias": False},
}


def build(recipe: str, args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    cfg = ModelConfig(vocab_size=args.vocab, n_layer=args.n_layer, d_model=args.d_model, n_head=args.n_head,
                      max_seq_len=max(args.seq_lens) + args.new_tokens + args.prompt_len, **RECIPES[recipe])
    return mf.build_model(cfg).to(device)


def autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def measure(recipe: str, args: argparse.Namespace, device: torch.device) -> dict:
    """Forward, forward+backward and generation milliseconds of one recipe's model."""
    torch.manual_seed(0)
    model = build(recipe, args, device)
    row = {"recipe": recipe, "params": model.num_params(), "non_embedding_params": model.num_params(True)}
    for t in args.seq_lens:
        x = torch.randint(args.vocab, (args.batch, t), device=device)

        def fwd(x=x):
            with torch.no_grad(), autocast(device):
                model(x)

        def fwd_bwd(x=x):
            with autocast(device):
                logits = model(x)
            F.cross_entropy(logits.flatten(0, 1).float(), x.flatten()).backward()

        model.eval()
        row[f"fwd_ms_T{t}"] = 1e3 * time_fn(fwd, device, iters=args.iters)
        model.train()
        row[f"fwd_bwd_ms_T{t}"] = 1e3 * time_fn(fwd_bwd, device, iters=args.iters)
        model.zero_grad(set_to_none=True)
    model.eval()
    prompt = torch.randint(args.vocab, (1, args.prompt_len), device=device)
    for use_cache in (False, True):
        def gen(use_cache=use_cache):
            with autocast(device):
                model.generate(prompt, args.new_tokens, temperature=0.0, use_cache=use_cache)

        row[f"gen_ms_{'cache' if use_cache else 'no_cache'}"] = 1e3 * time_fn(gen, device, warmup=1, iters=3)
    return row


def speed(args: argparse.Namespace) -> int:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = []
    for recipe in cases(list(RECIPES), "stability speed", lambda r: f"next: {r} recipe"):
        rows.append(measure(recipe, args, device))
        sync(device)
    old, new = rows
    ratios = {f"{k}_ratio_2017_over_modern": old[k] / new[k] for k in old if k.endswith(tuple("0123456789"))
              or k.startswith("gen_ms")}
    ratios["generation_ratio_2017_no_cache_over_modern_cache"] = old["gen_ms_no_cache"] / new["gen_ms_cache"]
    print_table(rows)
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}")
    path = write_result(args.name, ratios, rows, device, out_dir=args.out,
                        extra={"settings": {k: v for k, v in vars(args).items() if k not in ("func", "out")}})
    print(f"wrote {path}")
    return 0


def classify(row: dict, stall_loss: float) -> str:
    loss = row.get("final_val_loss")
    if row.get("status") == "failed" or not isinstance(loss, (int, float)) or not math.isfinite(loss):
        return "diverged"
    return "stalled" if loss > stall_loss else "trained"


def depth(args: argparse.Namespace) -> int:
    import yaml

    from modformer.sweep.results import read_table

    table = []
    for d in args.sweep_dirs:
        spec = yaml.safe_load((Path(d) / "sweep.yaml").read_text())
        groups = spec["space"]["recipe"]["group"]
        for r in read_table(Path(d) / "results.jsonl"):
            recipe = r.get("recipe")
            if recipe == "y2017" and not groups[recipe].get("model.scale_embeddings"):
                recipe = "y2017_unscaled"   # first runs, before the sqrt(d) embedding scale (BENCHMARKS.md)
            table.append({**r, "recipe": recipe, "lr": spec["overrides"].get("train.lr")})
    rows = [{"recipe": r["recipe"], "lr": r["lr"], "stabiliser": r.get("stabiliser"),
             "n_layer": r.get("model.n_layer"),
             "params": r.get("params"), "final_val_loss": r.get("final_val_loss"),
             "final_val_word_ppl": r.get("final_val_word_ppl"), "wall_s": r.get("wall_s"),
             "outcome": classify(r, args.stall_loss), "error": (r.get("error") or "")[:120]} for r in table]
    rows.sort(key=lambda r: (r["recipe"] or "", -(r["lr"] or 0), r["stabiliser"] or "", r["n_layer"] or 0))
    print_table(rows, ["recipe", "lr", "stabiliser", "n_layer", "final_val_loss", "outcome", "wall_s"])
    headline = {}
    for r in rows:
        key = f"{r['recipe']}/lr{r['lr']:g}/{r['stabiliser']}"
        if r["outcome"] == "trained":
            headline[f"max_stable_depth/{key}"] = max(headline.get(f"max_stable_depth/{key}", 0), r["n_layer"])
        headline.setdefault(f"max_stable_depth/{key}", 0)
        headline.setdefault(f"depths_run/{key}", []).append(r["n_layer"])
        headline[f"final_val_loss/{key}/L{r['n_layer']}"] = r["final_val_loss"]
    device = next((r.get("device") for r in table if r.get("device")), "unknown")
    path = write_result(args.name, headline, rows, device, out_dir=args.out,
                        extra={"sweep_dirs": [str(d) for d in args.sweep_dirs], "stall_loss": args.stall_loss})
    print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="modformer bench stability", description=__doc__.splitlines()[0],
                                 formatter_class=HelpFormatter,
                                 epilog=("examples:\n"
                                         "  modformer bench stability speed --device cuda\n"
                                         "  modformer bench stability depth runs/sweeps/stability_lr1e-3"))
    sub = ap.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("speed", help="forward/backward and generation timings of the two recipes",
                        formatter_class=HelpFormatter,
                        epilog="examples:\n  modformer bench stability speed --device cuda --seq-lens 128 512")
    sp.add_argument("--n-layer", type=int, default=12, help="layers")
    sp.add_argument("--d-model", type=int, default=768, help="model width")
    sp.add_argument("--n-head", type=int, default=12, help="attention heads")
    sp.add_argument("--vocab", type=int, default=33278, help="vocabulary size")
    sp.add_argument("--batch", type=int, default=16, help="batch size")
    sp.add_argument("--seq-lens", type=int, nargs="+", default=[128, 512], help="sequence lengths timed")
    sp.add_argument("--prompt-len", type=int, default=16, help="prompt tokens for the generation timing")
    sp.add_argument("--new-tokens", type=int, default=100, help="generated tokens")
    sp.add_argument("--iters", type=int, default=20, help="timed iterations per measurement")
    sp.add_argument("--device", default="auto", help="device: auto (cuda if available), cpu, cuda, cuda:N")
    sp.add_argument("--name", default="stability_speed", help="result file name, without .json")
    sp.set_defaults(func=speed)
    dp = sub.add_parser("depth", help="summarise the depth x stabiliser sweep", formatter_class=HelpFormatter,
                        epilog="examples:\n  modformer bench stability depth runs/sweeps/stability_lr1e-3")
    dp.add_argument("sweep_dirs", nargs="+", help="sweep folders (e.g. the 1e-3 and 3e-4 learning-rate sweeps)")
    dp.add_argument("--stall-loss", type=float, default=6.0,
                    help="final loss above which a finite run counts as stalled")
    dp.add_argument("--name", default="stability", help="result file name, without .json")
    dp.set_defaults(func=depth)
    for p in (sp, dp):
        p.add_argument("--out", default=DEFAULT_OUT, help="result folder (benchmarks/results: the committed answer)")
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
