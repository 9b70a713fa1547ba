"""Circuits reproductions (issue 9): copying heads in a 1-layer and induction heads in a 2-layer
attention-only transformer trained on text with the Trainer, analysed with ``modformer.interp``.

Elhage et al. (2021) report that 10 of 12 heads of their 1-layer attention-only model copy (OV
eigenvalues mostly positive) and that the 2-layer model forms induction heads whose keys K-compose
with a previous-token head. Here, on WikiText-2 BPE (small vocabulary, CPU-sized models):

- 1 layer: copying score sum(lambda)/sum|lambda| of every head; ``copying_heads_fraction_1l`` = the
  fraction of heads with score > ``--copy-threshold`` (0.5).
- 2 layers: prefix-matching (induction) score on repeated random tokens; ``induction_prefix_matching``
  = the best layer-1 head's score; for each layer-1 head with score >= 0.5, the layer-0 head with the
  largest baseline-subtracted K-composition score and whether it is the strongest previous-token head.

    modformer bench circuits                         # -> OUT/circuits.json
    modformer bench circuits --steps-1l 20 --steps-2l 20 --out /tmp/c.json     # smoke test

Each run also gets the full ``modformer circuits`` report (HTML, plots, head table) in
``RUNS/<name>/circuits``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from modformer import interp
from modformer.bench.common import DEFAULT_OUT, device_name, write_result
from modformer.cli import HelpFormatter
from modformer.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from modformer.interp import heads
from modformer.interp.report import analyze
from modformer.train.trainer import Trainer


def run_config(name: str, n_layer: int, args: argparse.Namespace, runs: Path) -> RunConfig:
    return RunConfig(
        name=name, out_dir=str(runs),
        model=ModelConfig(n_layer=n_layer, d_model=args.d_model, n_head=args.n_head, max_seq_len=args.seq_len,
                          attn_only=True, position=args.position, norm=args.norm, tie_embeddings=args.tie,
                          dropout=args.dropout),
        data=DataConfig(name="bpe", seq_len=args.seq_len, options={"vocab_size": args.vocab,
                                                                   "repeat_fraction": args.repeat_fraction,
                                                                   "repeat_span": args.repeat_span}),
        train=TrainConfig(steps=args.steps_1l if n_layer == 1 else args.steps_2l, batch_size=args.batch,
                          lr=args.lr, weight_decay=args.wd, warmup_steps=args.warmup, eval_every=100, eval_batches=4,
                          log_every=50, progress=False, tensorboard=False, device=args.device,
                          threads=args.threads, seed=args.seed, sample_tokens=0))


def train(name: str, n_layer: int, args: argparse.Namespace, runs: Path) -> tuple[Trainer, dict, float]:
    t0 = time.perf_counter()
    trainer = Trainer(run_config(name, n_layer, args, runs), overwrite=True)
    if args.pos_init_std is not None:
        torch.nn.init.normal_(trainer.raw_model.position.wpe.weight, 0.0, args.pos_init_std)
    summary = trainer.fit()
    trainer.raw_model.eval()
    return trainer, summary, time.perf_counter() - t0


def notes(result: dict) -> list[str]:
    """What the figures mean for the paper's claims (added to the JSON)."""
    out = []
    s = result["settings"]
    tokens = {n: steps * s["batch"] * s["seq_len"] for n, steps in (("1l", s["steps_1l"]), ("2l", s["steps_2l"]))}
    if result["headline"]["induction_prefix_matching"] < 0.5:
        out.append(f"no layer-1 head reaches prefix matching 0.5: induction heads did not form within "
                   f"{tokens['2l']:,} training tokens (far fewer than the papers' runs)")
    out.append(f"1-layer model trained on {tokens['1l']:,} tokens; copying = OV eigenvalue score "
               f"> {s['copy_threshold']} (paper: 10 of 12 heads copy)")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="modformer bench circuits", description=__doc__.splitlines()[0],
                                 formatter_class=HelpFormatter,
                                 epilog=("examples:\n"
                                         "  modformer bench circuits\n"
                                         "  modformer bench circuits --device cuda"))
    ap.add_argument("--steps-1l", type=int, default=400, help="training steps of the 1-layer model")
    ap.add_argument("--steps-2l", type=int, default=600, help="training steps of the 2-layer model")
    ap.add_argument("--d-model", type=int, default=128, help="model width")
    ap.add_argument("--n-head", type=int, default=8, help="attention heads")
    ap.add_argument("--seq-len", type=int, default=128, help="context length")
    ap.add_argument("--batch", type=int, default=16, help="batch size")
    ap.add_argument("--vocab", type=int, default=2048, help="BPE vocabulary size")
    ap.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    ap.add_argument("--wd", type=float, default=0.01, help="weight decay")
    ap.add_argument("--warmup", type=int, default=20, help="warmup steps")
    ap.add_argument("--position", default="learned", help="learned | shortformer | rope | sinusoidal | alibi | none")
    ap.add_argument("--pos-init-std", type=float, default=None,
                    help="re-initialise the position table with this std (default: the position's own init)")
    ap.add_argument("--norm", default="layernorm", help="normalisation layer: layernorm, rmsnorm, none")
    ap.add_argument("--tie", action="store_true", help="tie the embedding and unembedding")
    ap.add_argument("--repeat-fraction", type=float, default=0.0,
                    help="share of training windows holding one span of the text twice (bpe data)")
    ap.add_argument("--repeat-span", default="half", choices=["half", "random"],
                    help="half: the window is one span twice; random: a random span copied to a random later place")
    ap.add_argument("--dropout", type=float, default=0.0, help="dropout")
    ap.add_argument("--seed", type=int, default=0, help="training seed (initialisation and batch order)")
    ap.add_argument("--copy-threshold", type=float, default=0.5,
                    help="copying score above which a 1-layer head counts as a copying head")
    ap.add_argument("--probe-pool", type=int, default=1000,
                    help="also probe induction with repeated tokens drawn from the N most frequent training tokens")
    ap.add_argument("--device", default="cpu", help="device: cpu, cuda, cuda:N")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--runs-dir", default=None, help="folder for the training runs (default: a temporary folder)")
    ap.add_argument("--out", default=f"{DEFAULT_OUT}/circuits.json", help="result JSON file")
    args = ap.parse_args(argv)
    runs = Path(args.runs_dir or tempfile.mkdtemp(prefix="circuits_runs_"))
    rows = []

    tr1, s1, t1 = train("attn_only_1l", 1, args, runs)
    model1 = tr1.raw_model
    w1 = interp.extract_weights(model1)
    copy1 = interp.copying_scores(w1)[0]
    frac = float((copy1 > args.copy_threshold).float().mean())
    analyze(model1, runs / "attn_only_1l" / "circuits", tr1.data, title="1-layer attention-only")
    rows.append({"model": "attn_only_1l", "steps": args.steps_1l, "train_s": round(t1, 1),
                 "val_loss": s1.get("final_val_loss"), "copying_scores": [round(float(v), 3) for v in copy1],
                 "copying_heads": int((copy1 > args.copy_threshold).sum()), "n_heads": len(copy1)})
    write(args, runs, rows, {"copying_heads_fraction_1l": round(frac, 4)})

    tr2, s2, t2 = train("attn_only_2l", 2, args, runs)
    model2 = tr2.raw_model
    w2 = interp.extract_weights(model2)
    probe_len = min(32, args.seq_len // 2)
    scores = interp.head_scores(model2, length=probe_len, batch=32)
    pool = interp.frequent_tokens(torch.tensor(tr2.data.stream("train")), args.probe_pool, model2.cfg.vocab_size)
    ind_freq = interp.head_scores(model2, length=probe_len, batch=32, token_pool=pool)["induction"]
    pats = heads.stack_patterns(heads.attention_patterns(
        model2, interp.repeated_random_tokens(model2.cfg.vocab_size, probe_len, 32).to(args.device)), 2)
    breakdown = {k: [round(float(x), 3) for x in v[1]] for k, v in heads.induction_breakdown(pats, probe_len).items()}
    by_length = {}
    for n in (8, 16, 32, 64, 128):
        if 2 * n <= args.seq_len:
            by_length[n] = round(float(interp.head_scores(model2, length=n, batch=32)["induction"][1].max()), 3)
    kcomp = interp.composition_scores(w2, "k", baseline=True)
    ind, prev = scores["induction"], scores["prev_token"]
    best_prev = int(prev[0].argmax())
    pairs = []
    for h in range(args.n_head):
        if ind[1, h] >= 0.5:
            src = int(kcomp[0, :, 1, h].argmax())
            pairs.append({"induction_head": f"L1H{h}", "induction": round(float(ind[1, h]), 3),
                          "top_k_composition_from": f"L0H{src}", "k_comp": round(float(kcomp[0, src, 1, h]), 3),
                          "is_top_prev_token_head": src == best_prev,
                          "prev_token_score_of_it": round(float(prev[0, src]), 3)})
    analyze(model2, runs / "attn_only_2l" / "circuits", tr2.data, title="2-layer attention-only")
    rows.append({"model": "attn_only_2l", "steps": args.steps_2l, "train_s": round(t2, 1),
                 "val_loss": s2.get("final_val_loss"),
                 "induction_scores_l1": [round(float(v), 3) for v in ind[1]],
                 "induction_scores_l1_frequent_tokens": [round(float(v), 3) for v in ind_freq[1]],
                 "prev_token_scores_l0": [round(float(v), 3) for v in prev[0]],
                 "induction_breakdown_l1": breakdown, "best_induction_by_probe_length": by_length,
                 "induction_heads": pairs, "copying_scores": [[round(float(v), 3) for v in r]
                                                              for r in interp.copying_scores(w2)]})
    write(args, runs, rows, {"induction_prefix_matching": round(float(ind[1].max()), 4),
                             "induction_prefix_matching_frequent_tokens": round(float(ind_freq[1].max()), 4),
                             "copying_heads_fraction_1l": round(frac, 4)})
    return 0


def write(args: argparse.Namespace, runs: Path, rows: list[dict], headline: dict) -> None:
    """Write the result JSON (also after the 1-layer run, so a cut-off run keeps its first half)."""
    extra = {"settings": {k: v for k, v in vars(args).items() if k not in ("out", "runs_dir")}, "runs_dir": str(runs)}
    if "induction_prefix_matching" in headline:
        extra["notes"] = notes({"headline": headline, "rows": rows, **extra})
    out = Path(args.out)
    path = write_result("circuits", headline, rows, device_name(args.device), out.parent, extra, filename=out.name)
    print(json.dumps(headline), "->", path, flush=True)


if __name__ == "__main__":
    sys.exit(main())
