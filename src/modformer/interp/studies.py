"""Circuit studies across the toolbox (issue 28): what structured head pruning leaves of an induction circuit.

``pruning_circuits_study()`` trains a tiny 2-layer attention-only model on the ``induction`` task on CPU, finds
its previous-token and induction heads (detectors on repeated random tokens), scores every head by ablation
(``compress.importance``), removes the lowest-scoring 25 / 50 / 75 % (``compress.structured.remove_heads``) and
reports, per level, which of the named heads survive, the induction (prefix-matching) score, the K-composition of
the surviving previous-token -> induction pair, the patching recovery of the named heads and the loss.

Training sequences: the task's ``[r_1..r_L, r_1..r_L]`` for L drawn per example from ``lengths``, after a random
filler prefix that pads every sequence to the same length (targets on the repeat only). With one L the model can
solve the task positionally (attend to t - L + 1); mixing L leaves induction as the solution.

    from modformer.interp.studies import pruning_circuits_study
    result = pruning_circuits_study()            # {"headline": {...}, "rows": [...], "heads": [...], ...}
    result = pruning_circuits_study(run_dir="runs/induction_2l")   # a trained 2-layer induction run instead

Measured (2-core CPU, shared): the default 600 steps (51 s) reach val loss 3.21 and form no induction head
(best prefix matching 0.20); neither did 1,500-4,000 steps with shortformer or RoPE positions (loss 2.5-2.8,
layer-1 prefix matching <= 0.22). A fixed repeat length is solved positionally by layer 0 in ~100 steps (prefix
matching 0.84 in layer 0, i.e. not induction). For a real circuit, pass ``run_dir`` (configs/induction_2l.yaml).
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modformer.cli import HelpFormatter
from modformer.config import ModelConfig, TrainConfig
from modformer.data.tasks import InductionTask
from modformer.interp import composition, heads, patching
from modformer.interp.weights import extract_weights
from modformer.saving import build_model
from modformer.train.optim import build_optimizer


class MixedInduction:
    """Batches of the ``induction`` task with a per-example repeat length, placed at a random offset inside random
    filler of a fixed total length (targets on the repeat only), so neither the repeat's length nor its position
    tells where the earlier copy is."""

    def __init__(self, lengths: tuple[int, ...], n_symbols: int, seq_len: int | None = None, n_examples: int = 2000,
                 seed: int = 0) -> None:
        self.tasks = [InductionTask(length=L, n_symbols=n_symbols, n_examples=n_examples, seed=seed + L)
                      for L in lengths]
        self.seq_len = seq_len or 2 * max(lengths) - 1
        if self.seq_len < 2 * max(lengths) - 1:
            raise ValueError(f"seq_len {self.seq_len} is shorter than the longest repeat block {2 * max(lengths) - 1}")
        self.n_symbols = n_symbols

    def batch(self, split: str, size: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        which = torch.randint(len(self.tasks), (size,), generator=g)
        x = torch.randint(self.n_symbols, (size, self.seq_len), generator=g)
        y = torch.full((size, self.seq_len), -100)
        for k in range(len(self.tasks)):
            rows = (which == k).nonzero().flatten()
            if len(rows) == 0:
                continue
            bx, by = self.tasks[k].get_batch(split, len(rows), g)
            n = bx.shape[1]
            starts = torch.randint(self.seq_len - n + 1, (len(rows),), generator=g)
            for r, s0, ex, ey in zip(rows.tolist(), starts.tolist(), bx, by):
                x[r, s0:s0 + n] = ex
                y[r, s0:s0 + n] = ey
                if s0 + n < self.seq_len:                # the block's last token is an input after it
                    x[r, s0 + n] = ey[-1]
        return x, y


def train_induction_model(steps: int = 600, d_model: int = 64, n_head: int = 4,
                          lengths: tuple[int, ...] = tuple(range(2, 13)), n_symbols: int = 64, seq_len: int = 32,
                          lr: float = 3e-3, batch_size: int = 64, position: str = "shortformer",
                          seed: int = 0) -> tuple[nn.Module, MixedInduction, list[float]]:
    """A 2-layer attention-only model trained on mixed-length induction (CPU, float32); returns it, the data
    and the training losses."""
    torch.manual_seed(seed)
    data = MixedInduction(tuple(lengths), n_symbols, seq_len, seed=seed)
    cfg = ModelConfig(vocab_size=n_symbols, n_layer=2, d_model=d_model, n_head=n_head, max_seq_len=data.seq_len,
                      attn_only=True, position=position, norm="layernorm")
    model = build_model(cfg)
    losses = fit_plain(model, lambda g: data.batch("train", batch_size, g), steps, lr, batch_size, seed)
    return model.eval(), data, losses


def fit_plain(model: nn.Module, draw: Any, steps: int, lr: float, batch_size: int, seed: int) -> list[float]:
    """``steps`` AdamW steps (no weight decay) on batches ``draw(generator)``; the per-step training losses.
    The toy studies' loop: small, seeded and silent (runs that need a run folder use the Trainer)."""
    opt = build_optimizer(model, TrainConfig(lr=lr, weight_decay=0.0, batch_size=batch_size))
    g = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for _ in range(steps):
        x, y = draw(g)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@torch.no_grad()
def loss_and_accuracy(model: nn.Module, batches: list[tuple[Tensor, Tensor]]) -> tuple[float, float]:
    total, correct, n = 0.0, 0, 0
    for x, y in batches:
        logits = model(x)
        total += float(F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum"))
        keep = y != -100
        correct += int(((logits.argmax(-1) == y) & keep).sum())
        n += int(keep.sum())
    return total / max(n, 1), correct / max(n, 1)


def induction_pair(length: int, n_symbols: int, batch: int = 32, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Clean ``[r, r]`` and corrupted ``[reversed r, r]`` (the first copy reversed, so every token's successor in
    it changes) sequences and the clean targets on the repeat (``-100`` elsewhere)."""
    half = heads.repeated_random_tokens(n_symbols, length, batch, seed)[:, :length]
    clean = torch.cat([half, half], 1)
    corrupted = torch.cat([half.flip(1), half], 1)
    targets = torch.full_like(clean, -100)
    targets[:, length:-1] = clean[:, length + 1:]
    return clean, corrupted, targets


def patch_heads_together(model: nn.Module, corrupted: Tensor, clean: Tensor, chosen: dict[int, list[int]],
                         metric: patching.Metric) -> float:
    """Metric of the corrupted run with the clean output (``hook_z``) of every chosen head patched in at once."""
    names = [f"blocks.{i}.attn.hook_z" for i in chosen]
    with torch.no_grad():
        _, cache = model.run_with_cache(clean, names_filter=names)

        def hook_for(i: int):  # noqa: ANN202
            def hook(x: Tensor, _h: object) -> Tensor:
                x = x.clone()
                x[:, chosen[i]] = cache[f"blocks.{i}.attn.hook_z"][:, chosen[i]]
                return x
            return hook

        return float(metric(model.run_with_hooks(corrupted, [(f"blocks.{i}.attn.hook_z", hook_for(i))
                                                             for i in chosen])))


def measure(model: nn.Module, batches: list, length: int, n_symbols: int, names: list[list[str]],
            threshold: float) -> dict[str, Any]:
    """Loss, accuracy, detector heads, K-composition of the best pair and patching recovery of the named heads.
    ``names[layer][head]``: the original name of each head of this (possibly pruned) model."""
    loss, acc = loss_and_accuracy(model, batches)
    s = heads.head_scores(model, length=length, batch=16)
    prev, ind = s["prev_token"].nan_to_num(-1.0), s["induction"].nan_to_num(-1.0)
    ind_heads = [names[1][h] for h in range(len(names[1])) if ind[1, h] >= threshold]
    prev_heads = [names[0][h] for h in range(len(names[0])) if prev[0, h] >= threshold]
    best_prev, best_ind = int(prev[0].argmax()), int(ind[1].argmax())
    w = extract_weights(model)
    kc = composition.composition_scores(w, "k")[0, best_prev, 1, best_ind] - composition.composition_baseline(
        w.d_model, w.d_head)
    clean, corrupted, targets = induction_pair(length, n_symbols)
    metric = patching.target_logit(targets)
    with torch.no_grad():
        m_clean, m_corr = float(metric(model(clean))), float(metric(model(corrupted)))
    chosen = {0: [h for h in range(len(names[0])) if prev[0, h] >= threshold],
              1: [h for h in range(len(names[1])) if ind[1, h] >= threshold]}
    chosen = {i: hs for i, hs in chosen.items() if hs}
    recovery = None
    if chosen and m_clean != m_corr:
        recovery = (patch_heads_together(model, corrupted, clean, chosen, metric) - m_corr) / (m_clean - m_corr)
    return {"loss": round(loss, 4), "acc": round(acc, 4),
            "induction_score": round(float(ind[1].max()), 4), "prev_token_score": round(float(prev[0].max()), 4),
            "induction_heads": ind_heads, "prev_token_heads": prev_heads,
            "best_pair": [names[0][best_prev], names[1][best_ind]], "k_composition_minus_baseline": round(float(kc), 4),
            "target_logit_clean": round(m_clean, 4), "target_logit_corrupted": round(m_corr, 4),
            "patching_recovery_named_heads": None if recovery is None else round(recovery, 4)}


def pruning_circuits_study(levels: tuple[float, ...] = (0.25, 0.5, 0.75), steps: int = 600, d_model: int = 64,
                           n_head: int = 4, probe_length: int = 7, threshold: float = 0.4, seed: int = 0,
                           importance: str = "ablation", run_dir: str | None = None,
                           **train_options: Any) -> dict[str, Any]:
    """Train (or load ``run_dir``: any 2-layer mha run, e.g. ``configs/induction_2l.yaml``, with its own data for
    the loss), name the circuit's heads, prune heads by ``importance`` at each level, re-measure: returns
    ``{"headline", "rows", "heads", "train"}`` (rows: one per level, level 0 = the unpruned model).
    ``probe_length``: the repeated-random-token probe's half length (not one of the training lengths)."""
    from modformer.compress.importance import head_importance
    from modformer.compress.structured import lowest, remove_heads

    t0 = time.time()
    g = torch.Generator().manual_seed(seed + 1)
    if run_dir is None:
        model, data, losses = train_induction_model(steps=steps, d_model=d_model, n_head=n_head, seed=seed,
                                                    **train_options)
        val = [data.batch("val", 256, g) for _ in range(4)]
        score_batches = [data.batch("train", 256, g) for _ in range(2)]
        vocab = data.n_symbols
        train_info: dict[str, Any] = {"steps": steps, "d_model": d_model, "n_head": n_head,
                                      "final_train_loss": losses[-1], **train_options}
    else:
        from modformer.runs import run_dataset, run_model

        model, data = run_model(run_dir).eval(), run_dataset(run_dir)
        if len(model.blocks) != 2:
            raise ValueError(f"the pruning study expects a 2-layer model, {run_dir} has {len(model.blocks)}")
        val = list(data.iter_eval("val", 16, 4))
        score_batches = [data.get_batch("train", 16, g) for _ in range(2)]
        vocab, n_head = model.cfg.vocab_size, model.cfg.n_head
        train_info = {"run_dir": str(run_dir)}
    train_info.update(seconds=round(time.time() - t0, 1), importance=importance)
    original = [[f"L{i}H{h}" for h in range(n_head)] for i in range(2)]
    base = measure(model, val, probe_length, vocab, original, threshold)
    rows = [{"level": 0.0, "removed": [], **base, "induction_heads_kept": base["induction_heads"],
             "prev_token_heads_kept": base["prev_token_heads"], "loss_ratio": 1.0}]
    scores = head_importance(model, score_batches, importance)
    table = heads.head_table(heads.head_scores(model, length=probe_length, batch=16))
    for row in table:
        row["importance"] = round(float(scores[row["layer"]][row["head"]]), 5)
    for level in levels:
        removed = lowest([s.clone() for s in scores], level)
        pruned = remove_heads(model, removed)
        names = [[n for h, n in enumerate(original[i]) if h not in removed.get(i, [])] for i in range(2)]
        m = measure(pruned, val, probe_length, vocab, names, threshold)
        m["induction_heads_kept"] = [n for n in base["induction_heads"] if n in names[1]]
        m["prev_token_heads_kept"] = [n for n in base["prev_token_heads"] if n in names[0]]
        rows.append({"level": level, "removed": [original[i][h] for i, hs in removed.items() for h in hs], **m,
                     "loss_ratio": round(m["loss"] / max(base["loss"], 1e-12), 4)})
    within = [r["level"] for r in rows if r["loss_ratio"] <= 1.05]
    # the circuit survives a level when a named previous-token and a named induction head both remain and the
    # pruned model still scores as an induction model
    survives = [r["level"] for r in rows if r["induction_heads_kept"] and r["prev_token_heads_kept"]
                and r["induction_score"] >= threshold]
    headline = {"induction_score": base["induction_score"], "prev_token_score": base["prev_token_score"],
                "val_loss": base["loss"], "largest_level_within_5pct_loss": max(within),
                "circuit_survives_that_level": max(within) in survives,
                "patching_recovery_named_heads": base["patching_recovery_named_heads"]}
    return {"headline": headline, "rows": rows, "heads": table, "train": train_info}


def main(argv: list[str] | None = None) -> int:
    """``modformer bench``-style entry: run the study and write ``OUT/circuits_pruning.json``."""
    import argparse

    from modformer.bench.common import DEFAULT_OUT, print_table, write_result

    p = argparse.ArgumentParser(prog="modformer bench circuits-pruning", description=__doc__.split("\n")[0],
                                formatter_class=HelpFormatter,
                                epilog="examples:\n  modformer bench circuits-pruning --run runs/induction_2l")
    p.add_argument("--steps", type=int, default=600, help="training steps of the toy induction model (without --run)")
    p.add_argument("--seed", type=int, default=0, help="seed")
    p.add_argument("--importance", default="ablation", choices=["ablation", "gradient"],
                   help="head importance: ablation (loss change) or gradient")
    p.add_argument("--run", default=None, help="study this 2-layer run instead of training one")
    p.add_argument("--probe-length", type=int, default=7, help="half-length of the repeated random-token probe")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="result folder (benchmarks/results: the committed answer)")
    args = p.parse_args(argv)
    result = pruning_circuits_study(steps=args.steps, seed=args.seed, importance=args.importance, run_dir=args.run,
                                    probe_length=args.probe_length)
    print_table([{k: r[k] for k in ("level", "loss", "acc", "induction_score", "prev_token_score",
                                    "k_composition_minus_baseline", "patching_recovery_named_heads")}
                 for r in result["rows"]])
    path = write_result("circuits_pruning", result["headline"], result["rows"], "cpu", args.out,
                        extra={"heads": result["heads"], "train": result["train"]})
    print(f"wrote {path}")
    return 0
