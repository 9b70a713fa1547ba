"""A 2-layer attention-only model that forms an induction circuit on CPU in about a minute.

``RepeatedSpans``: windows of uniform random tokens in which one span of ``min_span..max_span`` tokens is copied to
a random later place; targets only inside the copy. Fresh random windows every batch (nothing to memorise), and the
span's length and both places vary, so neither position nor length tells where the earlier copy is: the only
solution is a previous-token head in layer 0 feeding an induction head in layer 1. ``shift``: the target is the
token ``shift`` after the earlier copy of the current token (1: ordinary induction; 2: a "skip" copy, the new
behaviour the LoRA circuit study teaches).

Measured (2-core shared CPU, width 64, 4 heads, vocabulary 64, 48 tokens, lr 3e-3, batch 64, shortformer
positions): loss flat near ln 64 for ~1,200 steps, then the phase change: best layer-1 prefix matching 0.56 at
1,500 steps, 0.69 at 2,000, 0.72 at 2,500 (~60 s); lr 1e-2 formed nothing in 2,000 steps. The pruning study's
``MixedInduction`` (fixed pools of examples) formed no induction head on CPU.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from modformer.config import ModelConfig
from modformer.data.base import Dataset


class RepeatedSpans(Dataset):
    """Random-token windows with one repeated span; loss on the copy (see the module docstring)."""

    kind = "task"

    def __init__(self, vocab_size: int = 64, seq_len: int = 48, min_span: int = 4, max_span: int = 16,
                 shift: int = 1, seed: int = 0) -> None:
        if not 1 <= shift < min_span:
            raise ValueError(f"shift must be in [1, min_span), got shift={shift}, min_span={min_span}")
        if 2 * max_span > seq_len:
            raise ValueError(f"2 * max_span ({2 * max_span}) exceeds seq_len ({seq_len})")
        self.vocab_size, self.seq_len, self.min_span, self.max_span = vocab_size, seq_len, min_span, max_span
        self.shift, self.seed = shift, seed

    def get_batch(self, split: str, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        B, T, g = batch_size, self.seq_len, generator
        x = torch.randint(self.vocab_size, (B, T), generator=g)
        y = torch.full((B, T), -100)
        for r in range(B):
            L = int(torch.randint(self.min_span, self.max_span + 1, (1,), generator=g))
            a = int(torch.randint(0, T - 2 * L + 1, (1,), generator=g))
            b = int(torch.randint(a + L, T - L + 1, (1,), generator=g))
            x[r, b:b + L] = x[r, a:a + L]
            y[r, b:b + L - self.shift] = x[r, a + self.shift:a + L]
        return x, y

    def iter_eval(self, split: str, batch_size: int, max_batches: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """Deterministic batches (a generator seeded by the split); ``max_batches`` 0 means 4."""
        g = torch.Generator().manual_seed(self.seed + (1 if split == "val" else 2) * 1_000_003)
        for _ in range(max_batches or 4):
            yield self.get_batch(split, batch_size, g)

    def split_size(self, split: str) -> int:
        return 4 * 64

    def metrics(self, loss_sum: float, n_targets: int, n_correct: int) -> dict[str, float]:
        n = max(n_targets, 1)
        return {"loss": loss_sum / n, "acc": n_correct / n}

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in text.split()]

    def decode(self, ids: list[int]) -> str:
        return " ".join(str(i) for i in ids)


def train_toy_induction(steps: int = 2500, d_model: int = 64, n_head: int = 4, vocab_size: int = 64,
                        seq_len: int = 48, lr: float = 3e-3, batch_size: int = 64, position: str = "shortformer",
                        seed: int = 0) -> tuple[nn.Module, RepeatedSpans, list[float]]:
    """Train the 2-layer attention-only model on ``RepeatedSpans`` (float32, the current device: CPU); returns
    the model (eval mode), its data and the training losses."""
    from modformer.interp.studies import fit_plain
    from modformer.saving import build_model

    torch.manual_seed(seed)
    data = RepeatedSpans(vocab_size, seq_len, seed=seed)
    model = build_model(ModelConfig(vocab_size=vocab_size, n_layer=2, d_model=d_model, n_head=n_head,
                                    max_seq_len=seq_len, attn_only=True, position=position, norm="layernorm"))
    losses = fit_plain(model, lambda g: data.get_batch("train", batch_size, g), steps, lr, batch_size, seed)
    return model.eval(), data, losses


def induction_model(path: str | None = None, steps: int = 2500, seed: int = 0, max_span: int = 16,
                    save_to: str | None = None) -> tuple[nn.Module, RepeatedSpans, dict]:
    """The model the circuit studies work on: a trained 2-layer model (``path``: a run folder such as
    ``configs/induction_2l.yaml``'s, or a saved model folder; its ``RepeatedSpans`` use the model's vocabulary and
    up to 128 of its positions) or the toy model trained here (saved to ``save_to`` when given, ``mf.save``).
    Returns ``(model, data, info)``."""
    import time

    from modformer.saving import save

    t0 = time.time()
    if path is not None:
        from modformer.runs import load_any

        model = load_any(path).eval()
        if len(model.blocks) != 2:
            raise ValueError(f"the circuit studies expect a 2-layer model, {path} has {len(model.blocks)}")
        T = min(int(model.cfg.max_seq_len), 128)
        return model, RepeatedSpans(model.cfg.vocab_size, T, max_span=min(max_span, T // 2), seed=seed), {
            "model": str(path)}
    model, data, losses = train_toy_induction(steps=steps, seed=seed)
    if save_to:
        save(model, save_to)
    return model, data, {"steps": steps, "seed": seed, "final_train_loss": round(sum(losses[-50:]) / max(
        len(losses[-50:]), 1), 4), "train_seconds": round(time.time() - t0, 1), "d_model": model.cfg.d_model,
        "n_head": model.cfg.n_head, "vocab_size": data.vocab_size, "seq_len": data.seq_len}
