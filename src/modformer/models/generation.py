"""Autoregressive sampling shared by decoder models: greedy, temperature, top-k, top-p."""

from __future__ import annotations

import torch
from torch import Tensor


def sample_next(logits: Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Next token ids ``(B, 1)`` from last-position logits ``(B, V)``; temperature 0 = greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum - sorted_logits.softmax(-1) > top_p       # keep the smallest nucleus >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)


class GenerationMixin:
    """``generate`` for models whose forward accepts ``cache=``/``return_cache=``/``last_only=``."""

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, use_cache: bool = True, static_cache: bool = False,
                 eos_token_id: int | None = None, generator: torch.Generator | None = None,
                 compile: bool = False) -> Tensor:
        """Append ``max_new_tokens`` sampled tokens to ``idx`` ``(B, T)``; returns ``(B, T + new)``.

        Without a cache each step re-runs the whole (cropped) context; with one, only the new
        token. Greedy decoding (temperature=0) gives identical tokens either way. ``compile=True``
        (implies a static cache) compiles the one-token decode step with torch.compile in
        "reduce-overhead" mode, i.e. CUDA graphs on GPU: positions enter as a tensor, so one graph
        serves every step.
        """
        was_training = self.training
        self.eval()
        static_cache = static_cache or compile
        max_len = self.position.max_len
        if use_cache and max_len is not None and idx.shape[1] + max_new_tokens > max_len:
            raise ValueError(f"prompt ({idx.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds "
                             f"model.max_seq_len={max_len}; use use_cache=False to slide the window")
        cache = None
        if use_cache:
            cache = self.new_cache(idx.shape[0], static=static_cache,
                                   max_len=idx.shape[1] + max_new_tokens if static_cache else None)
        step_fn = self._decode_step_fn() if compile and use_cache else None
        pos = None
        finished = torch.zeros(idx.shape[0], 1, dtype=torch.bool, device=idx.device)
        step_input = idx
        for i in range(max_new_tokens):
            if cache is None:
                step_input = idx if max_len is None else idx[:, -max_len:]
            if step_fn is not None and i > 0:          # prefill runs eagerly; decode steps use the graph
                if pos is None:
                    pos = torch.tensor([cache.length], device=idx.device)
                else:
                    pos.add_(1)
                logits = step_fn(step_input, pos, cache)[:, -1]
                cache.length += 1
            else:
                logits = self(step_input, cache=cache, last_only=True)[:, -1]
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
            if eos_token_id is not None:
                nxt = nxt.masked_fill(finished, eos_token_id)
                finished |= nxt == eos_token_id
            idx = torch.cat([idx, nxt], dim=1)
            step_input = nxt
            if eos_token_id is not None and bool(finished.all()):
                break
        self.train(was_training)
        return idx

    def _decode_step_fn(self):  # noqa: ANN202
        """The compiled one-token step ``(idx (B, 1), pos (1,), cache) -> logits``, built once per model."""
        fn = getattr(self, "_compiled_decode", None)
        if fn is None:
            def step(idx: Tensor, pos: Tensor, cache: object) -> Tensor:
                return self(idx, cache=cache, pos=pos, last_only=True).clone()

            mode = "reduce-overhead" if next(self.parameters()).is_cuda else "default"
            fn = torch.compile(step, mode=mode)
            object.__setattr__(self, "_compiled_decode", fn)
        return fn
