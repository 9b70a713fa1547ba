"""Attention / FFN variants (issue 5) on WikiText-2 word level at a fixed token budget (the H100 half).

The same variants as ``modformer bench variants`` (each variant's ``d_ff`` matched so its non-embedding
parameters are the closest to the MHA baseline's), trained with the same recipe and seed for the same
number of tokens: a small ``configs/wikitext2.yaml`` GPT (4 layers, width 256, context 256, 32 x 256
tokens a step, dropout 0.2, eager). Per variant: parameters, training FLOPs per token, KV-cache bytes per
token, final validation loss and word-level perplexity, training tokens/s, last aux loss. FLOPs are counted
by ``torch.utils.flop_counter`` on one forward+backward (so MoE counts only routed experts and
multi-channel attention every channel), not estimated as 6N.

Seed 001's claim — multi-channel attention gives more expressiveness per FLOP than a longer latent
sequence — is tested by three extra hourglass rows with the same token layers (1 in, 1 out, shorten by 4)
and a 2-layer latent stack: one latent per group (``hg_k1``), a twice longer latent sequence (two latents
per group, ``hg_k2``) and one latent per group processed by 2-channel attention (``hg_mc2``).

    modformer bench variants-lm --device cuda --jobs 4      # -> OUT/variants_wikitext2.json
    modformer bench variants-lm --steps 3 --only mha,moe,hg_mc2 --device cpu --out /tmp/v.json   # smoke

``--speed-only`` adds ``tokens_per_s_alone`` to an existing result: each variant trained alone for
``--speed-steps`` AdamW steps on random tokens (bf16 autocast on GPU), timed after 5 warm-up steps.

    modformer bench variants-lm --device cuda --speed-only     # updates OUT/variants_wikitext2.json

``--jobs N`` trains N variants at once as separate processes (small models leave an H100 idle between
kernel launches, so sharing it raises total throughput; tokens/s is then measured under sharing, which
is fair between variants run the same way but lower than alone).
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import modformer as mf
from modformer.bench.common import (
    CONFIGS,
    DEFAULT_OUT,
    cases,
    command_line,
    counted_train_flops_per_token,
    print_table,
    sync,
    write_result,
)
from modformer.bench.studies.variants import VARIANTS, count, kv_bytes_per_token, match_params
from modformer.cli import HelpFormatter
from modformer.config import ModelConfig, load_config
from modformer.train.logging import read_metrics, steady_tokens_per_s
from modformer.train.trainer import Trainer
from modformer.utils import atomic_write_text

HOURGLASS = {"model": "hourglass", "n_layer": 2,
             "model_options": {"levels": 1, "group_len": 4, "n_latents": 1, "encoder_layers": [1, 0],
                               "decoder_layers": [1], "schedule": "global"}}
LATENT_MC2 = {"attention": "multichannel", "attn_only": True, "attention_options": {"n_channels": 2}}
EXTRA: dict[str, dict] = {
    "hg_k1": HOURGLASS,
    "hg_k2": {**HOURGLASS, "model_options": {**HOURGLASS["model_options"], "n_latents": 2}},
    "hg_mc2": {**HOURGLASS, "model_options": {**HOURGLASS["model_options"], "latent_block": LATENT_MC2}},
}
ALL = {**VARIANTS, **EXTRA}


def base_run(args: argparse.Namespace):
    run = load_config(CONFIGS / "wikitext2.yaml")
    m, t = run.model, run.train
    m.n_layer, m.d_model, m.n_head, m.max_seq_len, m.dropout = args.n_layer, args.d_model, args.n_head, \
        args.seq_len, args.dropout
    run.data.seq_len = args.seq_len
    t.steps, t.batch_size, t.warmup_steps, t.lr = args.steps, args.batch, max(1, args.steps // 10), args.lr
    t.eval_every, t.eval_batches, t.log_every = args.steps, args.eval_batches, max(1, args.steps // 20)
    t.compile, t.device, t.progress, t.tensorboard, t.sample_tokens = False, args.device, False, False, 0
    t.seed = getattr(args, "seed", 0)          # variants-lm: seed 0; the multichannel study sets its seeds
    t.threads, t.ema_decay = args.threads, 0.0   # the recipe's weight averaging is not part of this comparison
    return run


def model_config(name: str, base: ModelConfig, vocab: int) -> tuple[ModelConfig, int | None]:
    """Variant ``name`` of ``base`` (vocabulary ``vocab``) and its matched ``d_ff`` (None: unchanged)."""
    base = copy.deepcopy(base)
    base.vocab_size = vocab
    if name == "mha":
        return base, None
    if name in EXTRA:   # hourglass rows: a different shape, compared by FLOPs rather than matched
        cfg = copy.deepcopy(base)
        for k, v in copy.deepcopy(EXTRA[name]).items():
            setattr(cfg, k, v)
        return cfg, None
    return match_params(base, VARIANTS[name], count(base))


def corpus_vocab(args: argparse.Namespace) -> int:
    from modformer.data import build_dataset

    return build_dataset(base_run(args).data).vocab_size


def train_one(name: str, args: argparse.Namespace) -> dict:
    run = base_run(args)
    vocab = corpus_vocab(args)
    cfg, d_ff = model_config(name, run.model, vocab)
    model = mf.build_model(cfg)
    row = {"variant": name, "model": cfg.model, "attention": cfg.attention, "ffn": cfg.ffn,
           "d_ff": d_ff or cfg.d_ff or 4 * cfg.d_model, "params": model.num_params(),
           "non_embedding_params": count(cfg),
           "flops_per_token": counted_train_flops_per_token(model, args.seq_len, vocab),
           "kv_bytes_per_token": kv_bytes_per_token(cfg) if cfg.model == "gpt" else None}
    del model
    run.name, run.out_dir, run.model = name, args.runs_dir, cfg
    t0 = time.perf_counter()
    summary = Trainer(run, overwrite=True).fit()
    train_rows = [r for r in read_metrics(Path(args.runs_dir) / name / "metrics.jsonl") if r["split"] == "train"]
    row.update({"final_val_loss": summary.get("final_val_loss"), "final_val_word_ppl": summary.get("final_val_word_ppl",
                summary.get("final_val_ppl")), "train_loss": train_rows[-1]["loss"] if train_rows else None,
                "train_tokens_per_s": steady_tokens_per_s(train_rows),
                "aux_loss": train_rows[-1].get("aux_loss") if train_rows else None,
                "tokens": args.steps * args.batch * args.seq_len, "wall_s": time.perf_counter() - t0})
    return row


def speed_alone(name: str, args: argparse.Namespace, vocab: int) -> float:
    """Training tokens/s of one variant with the GPU to itself (random tokens; the data pipeline is not timed)."""
    cfg, _ = model_config(name, base_run(args).model, vocab)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    model = mf.build_model(cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(vocab, (args.batch, args.seq_len + 1), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten())
        (loss if model.aux_loss is None else loss + model.aux_loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(5):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.speed_steps):
        step()
    sync(device)
    return args.speed_steps * args.batch * args.seq_len / (time.perf_counter() - t0)


def child_argv(args: argparse.Namespace, name: str, out: Path) -> list[str]:
    keep = ["steps", "batch", "seq_len", "n_layer", "d_model", "n_head", "dropout", "lr", "eval_batches", "device",
            "runs_dir"]
    argv = [sys.executable, __file__, "--only", name, "--part", str(out)]
    for k in keep:
        argv += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    return argv


def run_parallel(names: list[str], args: argparse.Namespace) -> list[dict]:
    """Each variant in its own process, ``--jobs`` at a time; rows in the order of ``names``."""
    parts = Path(args.runs_dir) / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    pending, running, rows = list(names), {}, {}
    while pending or running:
        while pending and len(running) < args.jobs:
            name = pending.pop(0)
            log = open(parts / f"{name}.log", "w")
            running[name] = (subprocess.Popen(child_argv(args, name, parts / f"{name}.json"), stdout=log,
                                              stderr=subprocess.STDOUT), log)
        time.sleep(2)
        for name, (proc, log) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[name]
            part = parts / f"{name}.json"
            if proc.returncode == 0 and part.is_file():
                rows[name] = json.loads(part.read_text())
                print(f"{name}: val loss {rows[name]['final_val_loss']:.4f}, "
                      f"{rows[name]['train_tokens_per_s']:.0f} tokens/s", flush=True)
            else:
                tail = (parts / f"{name}.log").read_text().strip().splitlines()[-1:]
                rows[name] = {"variant": name, "error": tail[0] if tail else f"exit {proc.returncode}"}
                print(f"{name}: FAILED ({rows[name]['error']})", flush=True)
            write(args, [rows[n] for n in names if n in rows])
    return [rows[n] for n in names]


def write(args: argparse.Namespace, rows: list[dict]) -> Path:
    ok = [r for r in rows if "final_val_loss" in r]
    mha = next((r for r in ok if r["variant"] == "mha"), None)
    headline = {}
    if ok:
        best = min(ok, key=lambda r: r["final_val_loss"])
        headline = {"best_variant": best["variant"], "best_val_loss": best["final_val_loss"]}
    if mha:
        headline["mha_val_loss"] = mha["final_val_loss"]
        for r in ok:
            r["val_loss_minus_mha"] = r["final_val_loss"] - mha["final_val_loss"]
            r["flops_ratio_vs_mha"] = r["flops_per_token"] / mha["flops_per_token"]
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "runs_dir", "only", "part")}
    out = Path(args.out)
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    path = write_result(out.stem, headline, rows, device, out_dir=out.parent, extra={"settings": settings})
    plot(ok, out.with_suffix(".png"))
    return path


def plot(rows: list[dict], path: Path) -> None:
    """Validation loss against training FLOPs per token, one labelled point per variant."""
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for r in rows:
        color = "tab:red" if r["variant"].startswith("hg_") else \
            "tab:green" if "multichannel" in r["variant"] else "tab:blue"
        ax.scatter(r["flops_per_token"], r["final_val_loss"], color=color)
        ax.annotate(r["variant"], (r["flops_per_token"], r["final_val_loss"]), fontsize=7,
                    xytext=(3, 2), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs per token")
    ax.set_ylabel("final validation loss (nats)")
    ax.set_title("WikiText-2 variants at a fixed token budget (red: hourglass, green: multi-channel)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="modformer bench variants-lm", description=__doc__.split("\n")[0],
                                 formatter_class=HelpFormatter,
                                 epilog="examples:\n  modformer bench variants-lm --device cuda --steps 1500")
    ap.add_argument("--steps", type=int, default=2000, help="training steps per variant")
    ap.add_argument("--batch", type=int, default=32, help="batch size")
    ap.add_argument("--seq-len", type=int, default=256, help="context length")
    ap.add_argument("--n-layer", type=int, default=4, help="layers")
    ap.add_argument("--d-model", type=int, default=256, help="model width")
    ap.add_argument("--n-head", type=int, default=4, help="attention heads")
    ap.add_argument("--dropout", type=float, default=0.2, help="dropout")
    ap.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    ap.add_argument("--eval-batches", type=int, default=0, help="0 = the whole validation split")
    ap.add_argument("--device", default="auto", help="device: auto (cuda if available), cpu, cuda, cuda:N")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--jobs", type=int, default=1, help="variants trained at once (separate processes)")
    ap.add_argument("--only", default=None, help="comma-separated variant names")
    ap.add_argument("--runs-dir", default=None, help="folder for the training runs (default: a temporary folder)")
    ap.add_argument("--speed-only", action="store_true", help="add tokens/s measured alone to an existing --out")
    ap.add_argument("--speed-steps", type=int, default=50, help="timed training steps per variant for tokens/s")
    ap.add_argument("--part", default=None, help=argparse.SUPPRESS)   # child process: write one row here
    ap.add_argument("--out", default=f"{DEFAULT_OUT}/variants_wikitext2.json", help="result JSON file")
    args = ap.parse_args(argv)
    names = args.only.split(",") if args.only else list(ALL)
    unknown = [n for n in names if n not in ALL]
    if unknown:
        sys.exit(f"unknown variants {unknown}; known: {', '.join(ALL)}")
    args.runs_dir = args.runs_dir or tempfile.mkdtemp(prefix="variants-lm-")
    if args.speed_only:
        result = json.loads(Path(args.out).read_text())
        vocab = corpus_vocab(args)
        chosen = [r for r in result["rows"] if r["variant"] in names]
        for r in cases(chosen, "variants-lm speed", lambda r: f"next: {r['variant']}"):
            r["tokens_per_s_alone"] = speed_alone(r["variant"], args, vocab)
            print(f"{r['variant']}: {r['tokens_per_s_alone']:.0f} tokens/s alone", flush=True)
        result["speed_command"] = command_line()
        atomic_write_text(args.out, json.dumps(result, indent=2))
        return 0
    if args.part:
        atomic_write_text(args.part, json.dumps(train_one(names[0], args)))
        return 0
    if args.jobs > 1:
        rows = run_parallel(names, args)
    else:
        rows = []
        for name in cases(names, "variants-lm", lambda n: f"next: {n}"):
            rows.append(train_one(name, args))
            print(f"{name}: val loss {rows[-1]['final_val_loss']:.4f}", flush=True)
            write(args, rows)
    path = write(args, rows)
    print_table([r for r in rows if "final_val_loss" in r],
                ["variant", "non_embedding_params", "flops_per_token", "kv_bytes_per_token", "final_val_loss",
                 "final_val_word_ppl", "train_tokens_per_s", "aux_loss"])
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
