"""Autoregressive sampling shared by decoder models: greedy, temperature, top-k, top-p."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from modformer.layers.attention.kernels import changing_shapes, use_backend
from modformer.layers.cache import KVCache, StaticKVCache
from modformer.layers.matvec import matvec_linears


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


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """ValueError unless temperature >= 0 (finite), top_k >= 1 or None, 0 < top_p <= 1 or None.

    A negative temperature would sample the least likely tokens, top_p > 1 or top_k <= 0 would silently
    mean 'no filter' or crash deep inside torch.topk."""
    def real(x: object) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    if not real(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1 or None, got {top_k!r}")
    if top_p is not None and (not real(top_p) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be a number in (0, 1] or None, got {top_p!r}")


def check_prompt(idx: Tensor, max_new_tokens: int, vocab_size: int, eos_token_id: int | None) -> None:
    """ValueError for an empty or non-(B, T) integer prompt, out-of-vocabulary ids, or max_new_tokens < 0.

    The id range is read on every device, once per ``generate`` call (one host sync before decoding, none per
    token): the prompt is the only input that can be out of range, since every generated id is sampled from
    ``vocab_size`` logits. (The forward checks ids itself only on CPU, where reading them costs no sync.)"""
    if not isinstance(idx, Tensor) or idx.dim() != 2 or idx.dtype not in (torch.long, torch.int32):
        got = f"{idx.dtype} of shape {tuple(idx.shape)}" if isinstance(idx, Tensor) else type(idx).__name__
        raise ValueError(f"the prompt must be an integer tensor of shape (B, T); got {got}")
    if idx.shape[0] == 0 or idx.shape[1] == 0:
        raise ValueError(f"the prompt is empty (shape {tuple(idx.shape)}); give at least one token per sequence")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if eos_token_id is not None and not 0 <= eos_token_id < vocab_size:
        raise ValueError(f"eos_token_id must be in [0, {vocab_size}), got {eos_token_id!r}")
    lo, hi = (int(v) for v in torch.aminmax(idx))
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"prompt token ids must be in [0, {vocab_size}); got min {lo}, max {hi}")


# torch.compile ``options`` of the decode step's forward, by the name ``generate(compile=NAME)`` takes. Our own
# CUDA graph wraps the step, so Inductor's cudagraphs stay off. "max-autotune" times Triton GEMM templates
# against cuBLAS for each projection (batch-1 decoding is 48 GEMVs per token on GPT-2-124M) and fuses bias /
# activation / residual epilogues into the chosen template; it compiles for minutes, not seconds.
# "coordinate-descent" times only the block sizes of Inductor's own Triton kernels (no GEMM templates): what the
# matrix-vector reductions of ``decode_linear="matvec"`` are made of; it compiles in seconds to a minute.
COMPILE_PRESETS: dict[str, dict | None] = {
    "default": None,
    "max-autotune": {"max_autotune": True, "coordinate_descent_tuning": True, "triton.cudagraphs": False},
    "coordinate-descent": {"coordinate_descent_tuning": True, "triton.cudagraphs": False},
}


DECODE_LINEARS = ("gemm", "matvec")       # generate(decode_linear=): how the compiled step runs its linears


def check_compile(compile: bool | str, graph_steps: int, decode_backend: str | None = None,
                  prefill_buckets: int = 1, decode_linear: str | None = None) -> str:
    """The compile preset name of ``generate(compile=...)`` (``"default"`` for True/False); ValueError for an
    unknown name, ``graph_steps`` or ``prefill_buckets`` that is not an integer >= 1, an unknown ``decode_linear``,
    or an option of the compiled decoder (``decode_backend``, ``prefill_buckets``, ``decode_linear``) without
    ``compile``."""
    for name, value in (("graph_steps", graph_steps), ("prefill_buckets", prefill_buckets)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if decode_backend is not None and not compile:
        raise ValueError(f"decode_backend={decode_backend!r} is an option of the compiled decoder: pass compile=True")
    if prefill_buckets > 1 and not compile:
        raise ValueError("prefill_buckets is an option of the compiled decoder: pass compile=True")
    if decode_linear is not None:
        if decode_linear not in DECODE_LINEARS:
            raise ValueError(f"decode_linear must be one of {', '.join(DECODE_LINEARS)}; got {decode_linear!r}")
        if not compile:
            raise ValueError(f"decode_linear={decode_linear!r} is an option of the compiled decoder: pass compile=True")
    if isinstance(compile, bool):
        return "default"
    if not isinstance(compile, str) or compile not in COMPILE_PRESETS:
        raise ValueError(f"compile must be True, False or one of {', '.join(COMPILE_PRESETS)}; got {compile!r}")
    return compile


class GenerationMixin:
    """``generate`` for models whose forward accepts ``cache=``/``return_cache=``/``last_only=``."""

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, use_cache: bool = True, static_cache: bool = False,
                 eos_token_id: int | None = None, generator: torch.Generator | None = None,
                 compile: bool | str = False, attention_mask: Tensor | None = None,
                 pad_token_id: int | None = None, graph_steps: int = 1,
                 decode_backend: str | None = None, prefill_buckets: int = 1,
                 decode_linear: str | None = None) -> Tensor:
        """Append ``max_new_tokens`` sampled tokens to ``idx`` ``(B, T)``; returns ``(B, T + new)``.

        ``attention_mask`` ``(B, T)`` 0/1 marks left padding of a batch of prompts of different lengths:
        each row then decodes exactly as it would alone. A row stops at ``eos_token_id``; its later tokens
        are ``pad_token_id`` (default: the EOS id), and decoding ends once every row has stopped.

        Without a cache each step re-runs the whole (cropped) context; with one, only the new
        token. Greedy decoding (temperature=0) gives identical tokens either way. ``compile=True``
        (implies a static cache) runs the decode loop as a ``GraphDecoder``: the forward is compiled
        with torch.compile and, on GPU, one whole decode step (forward, sampling, bookkeeping) is
        captured once as a CUDA graph and replayed for every token, with no host work in between.
        ``compile`` may name an Inductor preset instead of True (``COMPILE_PRESETS``: ``"default"``,
        ``"max-autotune"``); ``graph_steps`` > 1 captures that many decode steps in one graph (fewer
        launches; the last ``(max_new_tokens - 1) % graph_steps`` steps replay a one-step graph).
        ``decode_backend`` (with ``compile``) names the attention backend of the compiled decode step only;
        the prefill keeps the model's (None: the model's ``attn_backend``; ``"decode"``: multiply-and-sum over the
        cache, which Inductor fuses; ``"eager"``: two matmuls). ``prefill_buckets`` > 1 (with ``compile`` and an
        ``attention_mask``) runs the prefill in that many groups of rows of similar prompt length, each padded only
        to its own longest prompt (``bucketed_prefill``): less work on left padding, the same tokens.
        ``decode_linear="matvec"`` (with ``compile``) runs the step's linears on at most 4 rows as float32
        matrix-vector reductions that Inductor fuses with their epilogues (``layers.matvec``) instead of cuBLAS GEMMs
        (None or ``"gemm"``).
        """
        check_sampling(temperature, top_k, top_p)
        preset = check_compile(compile, graph_steps, decode_backend, prefill_buckets, decode_linear)
        check_prompt(idx, max_new_tokens, self.cfg.vocab_size, eos_token_id)
        was_training = self.training
        self.eval()
        static_cache = static_cache or bool(compile)
        max_len = self.position.max_len
        if use_cache and max_len is not None and idx.shape[1] + max_new_tokens > max_len:
            raise ValueError(f"prompt ({idx.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds "
                             f"model.max_seq_len={max_len}; use use_cache=False to slide the window")
        pad = eos_token_id if pad_token_id is None else pad_token_id
        if attention_mask is not None and bool(attention_mask.bool().all()):
            attention_mask = None                        # nothing padded: the unmasked (fast) path
        try:
            if compile and use_cache and max_new_tokens > 0:
                decoder = self._graph_decoder(idx.shape[0], idx.shape[1] + max_new_tokens, idx.device, preset,
                                              graph_steps, decode_backend, decode_linear)
                return decoder.run(idx, max_new_tokens, dict(temperature=temperature, top_k=top_k, top_p=top_p),
                                   eos_token_id, generator, attention_mask, pad, prefill_buckets)
            cache = None
            if use_cache:
                cache = self.new_cache(idx.shape[0], static=static_cache,
                                       max_len=idx.shape[1] + max_new_tokens if static_cache else None)
            finished = torch.zeros(idx.shape[0], 1, dtype=torch.bool, device=idx.device)
            step_input = idx
            # without a cache every step's context is one token longer: a new attention shape each time
            with changing_shapes() if cache is None else contextlib.nullcontext():
                for _ in range(max_new_tokens):
                    mask = attention_mask
                    if cache is None:
                        step_input = idx if max_len is None else idx[:, -max_len:]
                        mask = mask if mask is None or max_len is None else mask[:, -max_len:]
                    logits = self(step_input, cache=cache, last_only=True, attention_mask=mask)[:, -1]
                    nxt = sample_next(logits, temperature, top_k, top_p, generator)
                    if eos_token_id is not None:
                        nxt = nxt.masked_fill(finished, pad)
                        finished |= nxt == eos_token_id
                    idx = torch.cat([idx, nxt], dim=1)
                    step_input = nxt
                    if attention_mask is not None:       # the cache keeps it; without one the context grows
                        attention_mask = None if cache is not None else F.pad(attention_mask, (0, 1), value=1)
                    if eos_token_id is not None and bool(finished.all()):
                        break
            return idx
        finally:
            self.train(was_training)

    def release_decoder(self) -> None:
        """Drop the graph decoder the last compiled ``generate`` kept (its static cache and CUDA graphs); the next
        compiled call builds a new one."""
        object.__setattr__(self, "_decoder", None)

    def _graph_decoder(self, batch: int, length: int, device: torch.device, preset: str = "default",
                       graph_steps: int = 1, decode_backend: str | None = None,
                       decode_linear: str | None = None) -> GraphDecoder:
        """The model's ``GraphDecoder`` for this batch size, total length, compile preset, steps per graph and
        decode attention backend (one kept at a time).

        A captured graph reads the weights at fixed addresses, so the decoder is rebuilt whenever a tensor
        of the model was replaced (``model.to(...)``, ``load_state_dict(assign=True)``); in-place updates
        such as optimizer steps keep the addresses and reach the graph."""
        key = (batch, length, device, preset, graph_steps, decode_backend, decode_linear,
               tuple(t.data_ptr() for t in (*self.parameters(), *self.buffers())))
        dec = getattr(self, "_decoder", None)
        if dec is None or dec.key != key:
            self.release_decoder()                        # free the old cache and graphs before allocating new ones
            dec = GraphDecoder(self, batch, length, device, key, COMPILE_PRESETS[preset], graph_steps,
                               decode_backend, decode_linear)
            object.__setattr__(self, "_decoder", dec)     # not a submodule: keep it out of state_dict
        return dec


def bucketed_prefill(model: torch.nn.Module, cache: StaticKVCache, idx: Tensor, attention_mask: Tensor,
                     buckets: int) -> Tensor:
    """Prefill a left-padded batch ``idx (B, P)`` into the empty static ``cache`` in ``buckets`` groups of rows
    sorted by prompt length, each group cut to its own longest prompt (its leftmost columns are padding only), so
    the layers compute on fewer padding slots; each group's keys and values land at the slots the whole batch's
    prefill would give them, with the batch's padding mask. Returns the last tokens' logits ``(B, V)``.

    Every row's result is that of the whole-batch prefill up to the matmuls' summation order (other matrix
    shapes). Needs attention that caches keys and values only (mha, gqa, ...); rows must hold a real token."""
    B, P = idx.shape
    valid = attention_mask.to(torch.bool)
    if bool((valid[:, :-1] & ~valid[:, 1:]).any()):
        raise ValueError("prefill_buckets needs left padding (every row's padding before its tokens)")
    lengths = valid.sum(1)
    logits = None
    for rows in lengths.argsort(stable=True).tensor_split(buckets):
        if rows.numel() == 0:
            continue
        width = int(lengths[rows].max())
        part = KVCache(len(cache.keys))
        out = model(idx[rows, P - width:], cache=part, last_only=True,
                    attention_mask=attention_mask[rows, P - width:])[:, -1]
        if part.tensors or any(k is None for k in part.keys):
            raise ValueError("prefill_buckets needs attention that caches keys and values only (mha, gqa, mqa, "
                             "sparse patterns); this model caches other tensors")
        for layer, (k, v) in enumerate(zip(part.keys, part.values)):
            cache.write_rows(layer, rows, P - width, k, v, B)
        logits = out.new_empty(B, out.shape[-1]) if logits is None else logits
        logits[rows] = out
    cache.positions = torch.arange(P, device=idx.device)
    cache.update_mask("valid", valid)
    cache.advance(P)
    return logits


class GraphDecoder:
    """Decoding whose per-token step reads and writes only fixed buffers, so it can be a CUDA graph.

    The step runs the compiled forward on the last token at position ``pos`` (a tensor), samples,
    writes the token into the output buffer and advances ``pos``, all in place. On CUDA ``graph_steps``
    consecutive steps are captured once per sampling setting and replayed; the host then only launches
    the graph, which removes the per-token Python and launch overhead that dominates batch-1 decoding
    (the step count not divisible by ``graph_steps`` replays a one-step graph). The static KV cache and
    buffers are reused across calls of the same batch size and total length.
    """

    check_every = 32                        # with an EOS token: steps between host checks for "all finished"
    compile_options: dict | None = None     # default torch.compile ``options`` (Inductor config) of the forward
    sdpa_backends: list | None = None       # SDPA backends for the decode step (None: PyTorch's choice)

    def __init__(self, model: torch.nn.Module, batch: int, length: int, device: torch.device,
                 key: tuple = (), compile_options: dict | None = None, graph_steps: int = 1,
                 decode_backend: str | None = None, decode_linear: str | None = None) -> None:
        with use_backend(decode_backend):       # an unknown name fails here, before anything is allocated
            pass
        self.model, self.device, self.key, self.graph_steps = model, device, key, graph_steps
        self.decode_backend = decode_backend
        self.matvec = decode_linear == "matvec"
        self.cache = model.new_cache(batch, static=True, max_len=length)
        options = compile_options if compile_options is not None else self.compile_options
        # every decoder compiles the same ``_logits`` code for another self: one more dynamo cache entry each;
        # past the default limit (8) torch.compile would silently fall back to eager
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        self.logits_fn = torch.compile(self._logits, dynamic=False, options=options)
        self.tok = torch.zeros(batch, 1, dtype=torch.long, device=device)      # input of the next step
        self.pos = torch.zeros(1, dtype=torch.long, device=device)             # its absolute position
        self.out = torch.zeros(batch, length, dtype=torch.long, device=device)
        self.finished = torch.zeros(batch, 1, dtype=torch.bool, device=device)
        self.graphs: dict[tuple, object] = {}

    def _logits(self, tok: Tensor, pos: Tensor) -> Tensor:
        from torch.nn.attention import sdpa_kernel

        with (sdpa_kernel(self.sdpa_backends) if self.sdpa_backends else contextlib.nullcontext(),
              matvec_linears() if self.matvec else contextlib.nullcontext()):
            return self.model(tok, cache=self.cache, pos=pos, last_only=True)[:, -1]

    pad: int | None = None                  # token written after a row's EOS (set by ``run``)

    def _step(self, sampling: dict, eos: int | None, generator: torch.Generator | None) -> None:
        with use_backend(self.decode_backend):      # read while tracing: the compiled step keeps it
            logits = self.logits_fn(self.tok, self.pos)
        nxt = sample_next(logits, generator=generator, **sampling)
        if eos is not None:
            nxt = nxt.masked_fill(self.finished, self.pad if self.pad is not None else eos)
            self.finished |= nxt == eos
        self.out.index_copy_(1, self.pos + 1, nxt)                              # the token after ``tok``
        self.tok.copy_(nxt)
        self.pos.add_(1)

    def _steps(self, n: int, sampling: dict, eos: int | None, generator: torch.Generator | None) -> None:
        for _ in range(n):
            self._step(sampling, eos, generator)

    def _state(self) -> list[Tensor]:
        return [self.tok, self.pos, self.out, self.finished]

    def _graph(self, steps: int, sampling: dict, eos: int | None, generator: torch.Generator | None,
               warmup: int) -> object | None:
        """The captured ``steps`` decode steps for this sampling setting (None off CUDA: the steps then run
        directly). ``warmup`` (>= 1) steps run first, outside the capture, then are undone: the caller makes
        sure that many steps still fit the buffers."""
        if self.device.type != "cuda" or (generator is not None
                                           and not hasattr(torch.cuda.CUDAGraph, "register_generator_state")):
            return None
        # a cache that holds a padding mask runs the masked forward: another graph
        key = (tuple(sampling.values()), eos, self.pad, id(generator), "valid" in self.cache.masks, steps)
        if key not in self.graphs:
            graph = torch.cuda.CUDAGraph()
            if generator is not None:
                graph.register_generator_state(generator)
            saved = [t.clone() for t in self._state()]
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):     # warm-up: compile, autotune and allocate outside the capture
                self._steps(warmup, sampling, eos, generator)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            for t, s in zip(self._state(), saved):   # undo the warm-up (its cache writes are overwritten)
                t.copy_(s)
            with torch.cuda.graph(graph):
                self._steps(steps, sampling, eos, generator)
            self.graphs[key] = graph
        return self.graphs[key]

    def run(self, idx: Tensor, max_new_tokens: int, sampling: dict, eos: int | None,
            generator: torch.Generator | None, attention_mask: Tensor | None = None,
            pad: int | None = None, prefill_buckets: int = 1) -> Tensor:
        """``idx`` followed by ``max_new_tokens`` tokens (fewer if every sequence reached ``eos``); rows of a
        left-padded ``idx`` (``attention_mask``) decode as alone, finished rows continue with ``pad``."""
        prompt_len = idx.shape[1]
        self.cache.length = 0
        self.pad = pad
        # prefill, eager; once the cache holds a padding mask (fixed buffer) later runs keep the masked path
        if attention_mask is not None and prefill_buckets > 1 and bool(attention_mask.bool().any(1).all()):
            logits = bucketed_prefill(self.model, self.cache, idx, attention_mask, prefill_buckets)
        else:
            logits = self.model(idx, cache=self.cache, last_only=True, attention_mask=attention_mask)[:, -1]
        first = sample_next(logits, generator=generator, **sampling)
        self.finished.copy_(first == eos if eos is not None else torch.zeros_like(self.finished))
        self.out[:, :prompt_len] = idx
        self.out[:, prompt_len:prompt_len + 1] = first
        self.tok.copy_(first)
        self.pos.fill_(prompt_len)
        left = max_new_tokens - 1                   # decode steps after the prefill's token
        done, checked, graphs = 0, 0, {}
        while left > 0:
            n = self.graph_steps if left >= self.graph_steps else 1
            if n not in graphs:     # a capture's warm-up steps must fit the buffers too (each writes after pos)
                graphs[n] = self._graph(n, sampling, eos, generator, warmup=min(2, left))
            graph = graphs[n]
            graph.replay() if graph is not None else self._steps(n, sampling, eos, generator)
            left, done = left - n, done + n
            if eos is not None and done - checked >= self.check_every:
                checked = done
                if bool(self.finished.all()):
                    break
        out = self.out[:, :prompt_len + max_new_tokens].clone()
        if eos is not None:              # drop the columns after the step at which every sequence had finished
            hit = out[:, prompt_len:] == eos
            if bool(hit.any(dim=1).all()):
                out = out[:, :prompt_len + int(hit.float().argmax(dim=1).max()) + 1]
        return out

    def kernels_per_step(self, steps: int = 8) -> float | None:
        """CUDA kernels one decode step launches (what one graph replay per token runs); None off CUDA.
        See ``profile_step``."""
        prof = self.profile_step(steps)
        return prof["kernels"] if prof is not None else None

    @torch.no_grad()    # as in generate: another grad mode would fail the compiled step's guards and retrace it
    def uncaptured_steps(self, steps: int) -> None:
        """Run ``steps`` greedy decode steps of the compiled forward directly (not a graph replay) over the last
        ``steps`` slots, so every write stays in bounds; ``pos`` is put back, and the slots the steps write are
        overwritten by the next run. Call after ``run`` (the decoder must be warm)."""
        start = int(self.pos)
        self.pos.fill_(self.out.shape[1] - 1 - steps)
        self._steps(steps, dict(temperature=0, top_k=None, top_p=None), None, None)
        self.pos.fill_(start)

    def profile_step(self, steps: int = 8, top: int = 8) -> dict | None:
        """One decode step's CUDA kernels, profiled with torch.profiler over ``steps`` direct, uncaptured steps
        of the compiled forward (greedy): ``kernels`` per step, their summed ``device_us`` per step, and the
        ``top`` kernels as ``[name, calls per step, share of device time]``; None off CUDA. Call after ``run``
        (``uncaptured_steps``)."""
        if self.device.type != "cuda":
            return None
        from torch.profiler import ProfilerActivity, profile

        steps = max(1, min(steps, self.out.shape[1] - 1))
        torch.cuda.synchronize(self.device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            self.uncaptured_steps(steps)
            torch.cuda.synchronize(self.device)
        # kernel rows carry device time of their own; CPU-side ops (aten::mm, cudaLaunchKernel) carry none
        kernels = [e for e in prof.key_averages() if e.self_device_time_total > 0
                   and not e.key.startswith(("Memcpy", "Memset"))]
        total = sum(e.self_device_time_total for e in kernels)
        ranked = sorted(kernels, key=lambda e: -e.self_device_time_total)[:top]
        return {"kernels": sum(e.count for e in kernels) / steps, "device_us": total / steps,
                "top": [[e.key[:100], e.count / steps, e.self_device_time_total / max(total, 1e-9)] for e in ranked]}


def left_pad(prompts: list[list[int]], pad_id: int = 0, max_len: int | None = None,
             device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Token id lists -> ``(idx, attention_mask)`` ``(B, T)``, left-padded with ``pad_id`` (each row keeps its
    last ``max_len`` tokens when given): the input of ``generate(idx, attention_mask=...)``."""
    rows = [p[-max_len:] if max_len else p for p in prompts]
    T = max(len(r) for r in rows)
    idx = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            idx[i, T - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, T - len(r):] = 1
    return idx.to(device), mask.to(device)
