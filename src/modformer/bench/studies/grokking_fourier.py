"""Grokking mechanism (issue 9, Nanda et al. 2023): key frequencies and restricted / excluded loss over training.

Trains ``configs/grokking.yaml`` (modular addition, p=113) with the Trainer, snapshots the weights at every
evaluation, then — with the key frequencies of the grokked model's logits (the snapshot with the best
validation accuracy; the paper uses its final model) — computes for each snapshot: train and test loss,
the restricted loss (logits projected onto the key-frequency directions cos/sin(w_k (a+b)) plus each
output's mean) and the excluded loss on the training pairs (those directions
removed). The paper's signature of the mechanism: restricted loss falls well before test loss (the circuit
forms during "memorisation") and excluded loss rises as the model comes to rely on it; test loss falls at
grokking. Also records the embedding's key frequencies.

    modformer bench grokking-fourier                 # -> OUT/grokking_fourier.json + .png
    modformer bench grokking-fourier --steps 40 --out /tmp/gf.json    # smoke test
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

import torch

from modformer.bench.common import CONFIGS, DEFAULT_OUT, write_result
from modformer.cli import HelpFormatter
from modformer.config import load_config
from modformer.interp import fourier
from modformer.train.trainer import Trainer


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="modformer bench grokking-fourier", description=__doc__.splitlines()[0],
                                 formatter_class=HelpFormatter,
                                 epilog="examples:\n  modformer bench grokking-fourier --steps 300 --threads 1")
    ap.add_argument("--config", default=str(CONFIGS / "grokking.yaml"), help="training config of the grokking model")
    ap.add_argument("--steps", type=int, default=400, help="train this long (no early stop), snapshots every eval")
    ap.add_argument("--eval-every", type=int, default=10, help="steps between Fourier / restricted-loss measurements")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--runs-dir", default=None, help="folder for the training runs (default: a temporary folder)")
    ap.add_argument("--out", default=f"{DEFAULT_OUT}/grokking_fourier.json", help="result JSON file")
    args = ap.parse_args(argv)

    overrides = [f"train.steps={args.steps}", f"train.eval_every={args.eval_every}", "train.early_stop_metric=null",
                 "train.progress=false", "train.tensorboard=false", "train.checkpoint_every=0"]
    if args.threads:
        overrides.append(f"train.threads={args.threads}")
    cfg = load_config(args.config, overrides)
    cfg.out_dir = args.runs_dir or tempfile.mkdtemp(prefix="grokking_fourier_")
    trainer = Trainer(cfg, overwrite=True)
    snapshots: list[tuple[int, dict, dict]] = []
    evaluate = trainer.evaluate

    def snapshot_evaluate(split: str, max_batches: int | None = None) -> dict:
        out = evaluate(split, max_batches)
        if split == "val":
            state = {k: v.detach().clone() for k, v in trainer.raw_model.state_dict().items()}
            snapshots.append((trainer.step, state, out))
        return out

    trainer.evaluate = snapshot_evaluate
    trainer.fit()
    model = copy.deepcopy(trainer.raw_model).eval()
    p = int(cfg.data.options.get("p", 113))
    mask = fourier.train_mask(trainer.data._x["train"], p)
    # reference = the best snapshot (the fast recipe's high learning rate can destabilise the grokked model
    # later, so "the final model" of a fixed-length run is not always the generalising one)
    ref_step, ref_state, _ = max(snapshots, key=lambda s: (s[2].get("acc") or 0.0, s[0]))
    model.load_state_dict(ref_state)
    final = fourier.fourier_report(model, p, mask)
    keys = final["key_frequencies"]

    rows = []
    for step, state, val in snapshots:
        model.load_state_dict(state)
        with torch.no_grad():
            logits = fourier.modular_logits(model, p)
        labels = fourier._labels(p, 1)
        flat = logits.reshape(p * p, -1)
        rows.append({"step": step, "val_acc": val.get("acc"),
                     "train_loss": fourier._loss(flat, labels, mask), "test_loss": fourier._loss(flat, labels, ~mask),
                     "restricted_loss": fourier.restricted_loss(logits, keys), "excluded_loss":
                     fourier.excluded_loss(logits, keys, mask),
                     "embedding_key_frequencies": fourier.key_frequencies(
                         fourier.frequency_norms(model.tok_emb.weight.detach()[:p]), len(keys))})
        print(f"step {step:4d}  val acc {rows[-1]['val_acc']:.3f}  train {rows[-1]['train_loss']:.3f}  "
              f"test {rows[-1]['test_loss']:.3f}  restricted {rows[-1]['restricted_loss']:.3f}  "
              f"excluded {rows[-1]['excluded_loss']:.3f}", flush=True)

    grok = next((r["step"] for r in rows if (r["val_acc"] or 0) >= 0.99), None)
    restricted_below = next((r["step"] for r in rows if r["restricted_loss"] < rows[0]["restricted_loss"] / 2), None)
    headline = {"reference_step": ref_step, "key_frequencies": keys,
                           "embedding_key_frequencies": final["embedding_key_frequencies"],
                           "step_val_acc_99": grok, "step_restricted_loss_halved": restricted_below,
                           "reference_test_loss": final["test_loss"],
                           "reference_restricted_loss": final["restricted_loss"],
                           "reference_excluded_loss": final["excluded_loss"]}
    out = Path(args.out)
    write_result("grokking_fourier", headline, rows, "cpu", out.parent, filename=out.name,
                 extra={"reference": {k: v for k, v in final.items() if k not in ("embedding_norms",)}})
    plot(rows, keys, out.with_suffix(".png"))
    print(json.dumps(headline), "->", out)
    return 0


def plot(rows: list[dict], keys: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in rows]
    for key, label in (("train_loss", "train"), ("test_loss", "test"), ("restricted_loss", "restricted"),
                       ("excluded_loss", "excluded (train pairs)")):
        ax.plot(steps, [r[key] for r in rows], label=label)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    shown = ", ".join(map(str, keys[:6])) + (", ..." if len(keys) > 6 else "")
    ax.set_title(f"modular addition (key frequencies {shown})", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
