"""Helpers shared by the tests (not fixtures, so a plain module)."""

from __future__ import annotations

import torch


def strip(rows: list[dict]) -> list[dict]:
    """Metric rows without the timing fields, which differ between otherwise identical runs."""
    return [{k: v for k, v in r.items() if k not in ("wall_s", "tokens_per_s")} for r in rows]


class Kill(Exception):
    """Raised by ``kill_at`` to simulate a run dying mid-training."""


def kill_at(step: int):
    """A trainer callback that raises ``Kill`` after optimizer step ``step``."""
    def cb(trainer, s):
        if s == step:
            raise Kill
    return cb


def assert_cache_matches_full_forward(model: torch.nn.Module, vocab: int, static: bool):
    """Prefill 9 tokens, decode 3 one at a time, then a 3-token chunk: the logits must equal one full
    forward over the 15 tokens. Returns the cache."""
    idx = torch.randint(0, vocab, (2, 15))
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache(2, static=static, max_len=20)
        first = model(idx[:, :9], cache=cache)
        steps = [model(idx[:, t:t + 1], cache=cache) for t in range(9, 12)]
        chunk = model(idx[:, 12:], cache=cache)
    torch.testing.assert_close(torch.cat([first, *steps, chunk], dim=1), full, atol=1e-5, rtol=1e-5)
    return cache


def randomized(**kw) -> torch.nn.Module:
    """A small attention-only model (override any ModelConfig field) with N(0, 0.3) weights, norm gains N(1, 0.3):
    far from initialisation, so circuit tests see every head and path carry signal."""
    import modformer as mf

    base = dict(vocab_size=37, n_layer=2, d_model=32, n_head=4, max_seq_len=32, attn_only=True)
    base.update(kw)
    model = mf.build_model(mf.ModelConfig(**base)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if name.endswith(("ln1.weight", "ln2.weight", "ln_f.weight")) else 0.0, 0.3)
    return model
