"""Track induction-head formation during training: prefix-matching and previous-token scores over steps.

Trains an attention-only transformer with the Trainer (on WikiText-2 BPE or the synthetic ``induction``
task) and, every ``--probe-every`` steps, measures on repeated random tokens (as ``interp.head_scores``
and benchmarks/circuits.py do) the best head's prefix-matching (induction) score in the last layer, the
best previous-token score in layer 0, and the loss on the repeated half vs the first half of the
sequence (an induction head makes the repeat cheap: the "in-context" drop). One JSON line per probe.

    python benchmarks/induction_probe.py --data induction --steps 300 --threads 1          # sanity check
    python benchmarks/induction_probe.py --steps 2000 --lr 3e-3 --position rope --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from modformer.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from modformer.data.base import StreamDataset
from modformer.interp.heads import (
    attention_patterns,
    induction_scores,
    previous_token_scores,
    repeated_random_tokens,
    stack_patterns,
)
from modformer.registry import register
from modformer.train.logging import read_metrics
from modformer.train.trainer import Trainer


@register("corpus", "random_repeats")
class RandomRepeats(StreamDataset):
    """A stream of random segments (``min_len``..``max_len`` tokens), each repeated later with probability
    ``p_repeat`` after 0..``max_gap`` other tokens; windows start anywhere, so (unlike the fixed-length
    ``induction`` task, which absolute positions alone solve) only a real induction circuit predicts the
    repeats."""

    def __init__(self, seq_len: int = 128, root: Path | None = None, *, vocab_size: int = 512,
                 min_len: int = 4, max_len: int = 32, max_gap: int = 32, p_repeat: float = 0.5,
                 n_tokens: int = 2_000_000, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        out: list[np.ndarray] = []
        n = 0
        while n < n_tokens:
            seg = rng.integers(vocab_size, size=rng.integers(min_len, max_len + 1))
            gap = rng.integers(vocab_size, size=rng.integers(0, max_gap + 1))
            parts = [seg, gap, seg] if rng.random() < p_repeat else [seg, gap]
            out += parts
            n += sum(len(p) for p in parts)
        s = np.concatenate(out).astype(np.int32)
        cut = int(0.95 * len(s))
        super().__init__({"train": s[:cut], "val": s[cut:]}, vocab_size, seq_len)


@torch.no_grad()
def probe(model: torch.nn.Module, length: int, batch: int = 32, seed: int = 0,
          frequent: torch.Tensor | None = None) -> dict:
    """Prefix matching (last layer), previous-token (layer 0) and first/second-half loss on repeated tokens.

    ``frequent`` (token ids): also score repeats drawn from these tokens only (``induction_freq``), since
    rare tokens' embeddings stay near their initialisation in a small corpus.
    """
    was = model.training
    model.eval()
    cfg = model.cfg
    device = model.tok_emb.weight.device
    idx = repeated_random_tokens(cfg.vocab_size, length, batch, seed).to(device)
    pats = stack_patterns(attention_patterns(model, idx), cfg.n_layer)
    ind, prev = induction_scores(pats, length), previous_token_scores(pats)
    logp = F.log_softmax(model(idx).float(), -1)
    nll = -logp[:, :-1].gather(-1, idx[:, 1:, None])[..., 0]                  # (B, 2L-1), target t+1
    out = {"induction": round(float(ind[-1].max()), 3), "induction_head": int(ind[-1].argmax()),
           "prev_token_l0": round(float(prev[0].max()), 3), "prev_head": int(prev[0].argmax()),
           "loss_first_half": round(float(nll[:, :length - 1].mean()), 3),
           "loss_repeat": round(float(nll[:, length:].mean()), 3)}
    if frequent is not None:
        idx = frequent[repeated_random_tokens(len(frequent), length, batch, seed + 1)].to(device)
        ind = induction_scores(stack_patterns(attention_patterns(model, idx), cfg.n_layer), length)
        out["induction_freq"] = round(float(ind[-1].max()), 3)
    model.train(was)
    return out


def run_config(args: argparse.Namespace, runs: Path) -> RunConfig:
    if args.data == "induction":
        data = DataConfig(name="induction", options={"length": args.task_length, "n_symbols": args.vocab,
                                                     "n_examples": 20000})
        seq_len = 2 * args.task_length
    elif args.data == "random_repeats":
        data = DataConfig(name="random_repeats", seq_len=args.seq_len,
                          options={"vocab_size": args.vocab, "p_repeat": args.p_repeat, "max_gap": args.max_gap})
        seq_len = args.seq_len
    else:
        data = DataConfig(name="bpe", seq_len=args.seq_len, options={"vocab_size": args.vocab,
                                                                      "repeat_fraction": args.repeat_fraction})
        seq_len = args.seq_len
    return RunConfig(
        name="probe", out_dir=str(runs),
        model=ModelConfig(n_layer=args.n_layer, d_model=args.d_model, n_head=args.n_head, max_seq_len=seq_len,
                          attn_only=True, position=args.position, norm=args.norm, tie_embeddings=args.tie),
        data=data,
        train=TrainConfig(steps=args.steps, batch_size=args.batch, lr=args.lr, weight_decay=args.wd,
                          warmup_steps=args.warmup, schedule=args.schedule, eval_every=args.probe_every,
                          eval_batches=4, log_every=args.probe_every, progress=False, tensorboard=False,
                          device=args.device, threads=args.threads, seed=args.seed, sample_tokens=0))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", choices=["bpe", "induction", "random_repeats"], default="bpe")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--probe-every", type=int, default=100)
    ap.add_argument("--n-layer", type=int, default=2)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--task-length", type=int, default=16, help="half length of the synthetic induction task")
    ap.add_argument("--p-repeat", type=float, default=0.5, help="random_repeats: share of repeated segments")
    ap.add_argument("--max-gap", type=int, default=32, help="random_repeats: longest gap before a repeat")
    ap.add_argument("--repeat-fraction", type=float, default=0.0,
                    help="share of training windows holding one span of the text twice (bpe data)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--wd", type=float, default=0.01)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--schedule", default="cosine")
    ap.add_argument("--position", default="learned")
    ap.add_argument("--norm", default="layernorm")
    ap.add_argument("--tie", action="store_true")
    ap.add_argument("--probe-length", type=int, default=None, help="half length of the probe (default T/2)")
    ap.add_argument("--n-frequent", type=int, default=512, help="most frequent tokens for induction_freq")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="JSON-lines file (default: stdout only)")
    args = ap.parse_args()
    runs = Path(tempfile.mkdtemp(prefix="induction_probe_"))
    cfg = run_config(args, runs)
    length = args.probe_length or min(32, (2 * args.task_length if args.data == "induction" else args.seq_len) // 2)
    out = open(args.out, "a") if args.out else None  # noqa: SIM115
    t0 = time.perf_counter()
    val: dict = {}
    frequent = None

    def callback(trainer: Trainer, step: int) -> None:
        nonlocal frequent
        if frequent is None and trainer.data.kind == "corpus":
            counts = np.bincount(trainer.data.stream("train"), minlength=trainer.data.vocab_size)
            frequent = torch.from_numpy(np.argsort(-counts)[:args.n_frequent].copy())
        if step % args.probe_every and step != args.steps:
            return
        rows = read_metrics(trainer.logger.path) if trainer.logger.path.is_file() else []
        v = next((r for r in reversed(rows) if r.get("split") == "val"), {})
        row = {"step": step, "tokens": step * args.batch * trainer.data.seq_len,
               "val_loss": round(v["loss"], 3) if "loss" in v else None,
               **probe(trainer.raw_model, length, frequent=frequent), "wall_s": round(time.perf_counter() - t0, 1)}
        val.update(row)
        line = json.dumps(row)
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()

    trainer = Trainer(cfg, overwrite=True, callbacks=[callback])
    summary = trainer.fit()
    final = {"final": True, "settings": {k: v for k, v in vars(args).items() if k != "out"},
             "final_val_loss": summary.get("final_val_loss"), **{k: val.get(k) for k in ("induction", "prev_token_l0")},
             "wall_s": round(time.perf_counter() - t0, 1)}
    print(json.dumps(final), flush=True)
    if out:
        out.write(json.dumps(final) + "\n")
        out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
