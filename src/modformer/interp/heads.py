"""Head detectors from attention patterns on repeated random tokens, and the per-head table.

Olsson et al. (2022), "In-context Learning and Induction Heads": feed ``[r_1..r_L, r_1..r_L]`` (random
tokens repeated once) and average, over the destinations of the second half, the attention to

- previous token:   position t-1 (all destinations t >= 1)
- duplicate token:  t-L, the earlier copy of the same token
- induction:        t-L+1, the token after the earlier copy ("prefix matching"; >= 0.8 is a clear
                    induction head)

plus ``positional``: 1 - the mean total-variation distance between each sequence's attention row and
the batch-mean row, i.e. 1 when the pattern depends on positions only (the same for every input).
Copying comes in two forms: ``copying`` = the OV-eigenvalue score (Elhage et al. 2021, used by
Olsson et al.) from ``circuits.copying_scores``; ``copying_rank`` = empirically, the mean percentile of
the most-attended source token among the head's direct logit effects, at destinations where the head
attends sharply (1: the head raises exactly the token it attends to; 0.5: unrelated).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from modformer.interp.circuits import copying_scores
from modformer.interp.views import circuit_view
from modformer.interp.weights import ModelWeights, extract_weights


def repeated_random_tokens(vocab_size: int, length: int, batch: int = 16, seed: int = 0,
                           distinct: bool = True, pool: Tensor | None = None) -> Tensor:
    """``(batch, 2 * length)``: random tokens (distinct within a half when possible), repeated once.

    ``pool`` (1-D token ids) restricts the draw, e.g. to the tokens frequent in the training data: with a
    large BPE vocabulary and little text, rare tokens keep near-initial embeddings and uniform draws
    measure those as much as the heads."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.arange(vocab_size) if pool is None else pool.flatten().long().cpu()
    if distinct and len(ids) >= length:
        half = ids[torch.rand(batch, len(ids), generator=g).argsort(1)[:, :length]]
    else:
        half = ids[torch.randint(len(ids), (batch, length), generator=g)]
    return torch.cat([half, half], 1)


def frequent_tokens(tokens: Tensor, n: int, vocab_size: int) -> Tensor:
    """The ``n`` most frequent ids of a token stream (ties by id), for ``repeated_random_tokens(pool=...)``."""
    counts = torch.bincount(tokens.flatten().long(), minlength=vocab_size)
    return counts.argsort(descending=True, stable=True)[:n]


@torch.no_grad()
def attention_patterns(model: nn.Module, idx: Tensor, extra: tuple[str, ...] = ()) -> dict[str, Tensor]:
    """Run once and cache every ``hook_pattern`` ``(B, H, T, T)`` (plus hook names ending in ``extra``), named
    ``blocks.{i}.attn.hook_pattern`` for the layers ``circuit_view(model)`` reads (views.py: for the hourglass,
    its token-level layers)."""
    model = circuit_view(model)
    suffixes = ("attn.hook_pattern", *extra)
    _, cache = model.run_with_cache(idx, names_filter=lambda n: n.endswith(suffixes))
    return cache


def stack_patterns(cache: dict[str, Tensor], n_layer: int) -> Tensor:
    """``(L, B, H, T, T)`` from ``blocks.{i}.attn.hook_pattern`` entries."""
    names = [f"blocks.{i}.attn.hook_pattern" for i in range(n_layer)]
    missing = [n for n in names if n not in cache]
    if missing:
        raise ValueError(f"no attention pattern at {missing[0]}: this attention variant exposes none per block")
    pats = [cache[n].float() for n in names]
    H = max(p.shape[1] for p in pats)            # pruned layers have fewer heads: zero patterns pad them
    return torch.stack([torch.cat([p, p.new_zeros(p.shape[0], H - p.shape[1], *p.shape[2:])], 1) for p in pats])


def present_heads(model: nn.Module) -> Tensor:
    """``(L, H_max)`` bool: which heads each layer has (structured pruning leaves per-layer head counts)."""
    model = circuit_view(model)
    counts = [int(b.attn.n_head) for b in model.blocks]
    return torch.arange(max(counts))[None, :] < torch.tensor(counts)[:, None]


def offset_attention(patterns: Tensor, offset: int, start: int = 0) -> Tensor:
    """Mean attention ``(L, H)`` from destination t to t - offset, over destinations t >= max(start, offset)."""
    T = patterns.shape[-1]
    t = torch.arange(max(start, offset), T)
    return patterns[..., t, t - offset].mean((1, -1))


def band_mass(patterns: Tensor, width: int) -> Tensor:
    """Diagonal dominance ``(L, H)``: the attention mass inside the causal band of ``width`` keys, averaged
    over every query position and batch row.

    For query ``i`` the band holds keys ``j`` with ``0 <= i - j < width`` (itself and the ``width - 1``
    keys before it), so a row's band mass is ``sum_{i-width < j <= i} A[i, j]``; 1 means the head attends
    only locally. A sliding window of ``w`` keys gives exactly 1 at ``width = w``; uniform causal attention
    gives ``min(i + 1, width) / (i + 1)`` per row."""
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    T = patterns.shape[-1]
    dist = torch.arange(T, device=patterns.device)[:, None] - torch.arange(T, device=patterns.device)[None, :]
    band = (dist >= 0) & (dist < width)
    return (patterns * band).sum(-1).mean((1, -1))


def previous_token_scores(patterns: Tensor) -> Tensor:
    return offset_attention(patterns, 1)


def duplicate_token_scores(patterns: Tensor, length: int) -> Tensor:
    return offset_attention(patterns, length, start=length)


def induction_scores(patterns: Tensor, length: int) -> Tensor:
    """Prefix-matching score: attention to the token after the earlier copy."""
    return offset_attention(patterns, length - 1, start=length)


def induction_breakdown(patterns: Tensor, length: int) -> dict[str, Tensor]:
    """Where the second half's attention goes, ``(L, H)`` each, summing to 1 per head: the induction target
    (t-L+1), the duplicate (t-L), the previous token (t-1), itself, position 0, the rest of the first half and
    the rest of the second half. Shows what keeps a prefix-matching score below 1."""
    T, dev = patterns.shape[-1], patterns.device
    t = torch.arange(length, T, device=dev)
    rows_i = torch.arange(T - length, device=dev)
    rows = patterns[..., t, :]                                          # (L, B, H, T - length, T)
    named = {"induction": t - length + 1, "duplicate": t - length, "previous": t - 1, "self": t,
             "first_position": torch.zeros_like(t)}
    taken = torch.zeros(T - length, T, dtype=torch.bool, device=dev)
    out = {}
    for name, src in named.items():
        fresh = ~taken[rows_i, src]                       # count each source once
        out[name] = (rows[..., rows_i, src] * fresh).mean((1, -1))
        taken[rows_i, src] = True
    first_half = torch.arange(T, device=dev) < length
    out["other_first_half"] = (rows * (~taken & first_half)).sum(-1).mean((1, -1))
    out["other_second_half"] = (rows * (~taken & ~first_half)).sum(-1).mean((1, -1))
    return out


def positional_scores(patterns: Tensor) -> Tensor:
    """1 - mean total variation between each input's attention rows and the batch mean ``(L, H)``."""
    mean = patterns.mean(1, keepdim=True)
    tv = 0.5 * (patterns - mean).abs().sum(-1)                      # (L, B, H, T)
    return 1 - tv[..., 1:].mean((1, -1))                            # row 0 can only attend to itself


@torch.no_grad()
def copying_rank_scores(model: nn.Module, idx: Tensor, min_attention: float = 0.5) -> Tensor:
    """Empirical copying ``(L, H)``: percentile of the most-attended source token in the head's direct logits.

    Averaged over destinations where the head puts at least ``min_attention`` on one position (all
    destinations if there are none), so that "the attended token" is well defined. Needs only
    ``hook_pattern`` and ``hook_result`` (any attention variant that has them). Layers without a direct path to
    the logits (``direct_to_logits`` of a view, e.g. an hourglass without skips) get NaN.
    """
    model = circuit_view(model)
    L = len(model.blocks)
    last = getattr(model, "final_resid_hook", f"blocks.{L - 1}.hook_resid_post")
    names = {f"blocks.{i}.attn.{h}" for i in range(L) for h in ("hook_pattern", "hook_result")} | {last}
    _, cache = model.run_with_cache(idx, names_filter=lambda n: n in names)
    resid = cache[last].float()
    final_norm = getattr(model, "ln_f", None)
    kind = {"LayerNorm": "layernorm", "RMSNorm": "rmsnorm"}.get(type(final_norm).__name__, "none")
    eps = getattr(final_norm, "eps", 1e-5) or 1e-5
    W_U = model.lm_head.weight.detach().float().T                         # (D, V), final-norm weight folded in
    if kind != "none" and getattr(final_norm, "weight", None) is not None:
        W_U = W_U * final_norm.weight.detach().float()[:, None]
    if kind == "none":
        scale = torch.ones_like(resid[..., :1])
    elif kind == "rmsnorm":
        scale = 1 / torch.sqrt(resid.pow(2).mean(-1, keepdim=True) + eps)
    else:
        scale = 1 / torch.sqrt(resid.var(-1, unbiased=False, keepdim=True) + eps)
    counts = [cache[f"blocks.{i}.attn.hook_pattern"].shape[1] for i in range(L)]
    out = torch.full((L, max(counts)), float("nan"))
    V = W_U.shape[1]
    for i in range(L):
        n_head = counts[i]
        pat = cache[f"blocks.{i}.attn.hook_pattern"].float()[:, :, 1:]   # (B, H, T-1, T) rows t >= 1
        res = cache[f"blocks.{i}.attn.hook_result"].float()[:, 1:]       # (B, T-1, H, D)
        if kind == "layernorm":
            res = res - res.mean(-1, keepdim=True)
        res = res * scale[:, 1:, None]
        top, src = pat.max(-1)                                            # (B, H, T-1) most-attended position
        for h in range(n_head):
            logits = res[:, :, h] @ W_U                                 # (B, T-1, V) direct logit effect
            tok = idx.gather(1, src[:, h])                                # (B, T-1) the attended token
            own = logits.gather(-1, tok[..., None])
            less, ties = (logits < own).float().sum(-1), (logits == own).float().sum(-1) - 1
            pct = (less + 0.5 * ties) / max(V - 1, 1)                     # (B, T-1) mid-rank percentile
            sharp = top[:, h] >= min_attention
            out[i, h] = pct[sharp].mean() if sharp.any() else pct.mean()
    for i, direct in enumerate(getattr(model, "direct_to_logits", [True] * L)):
        if not direct:
            out[i] = float("nan")
    return out


@torch.no_grad()
def head_scores(model: nn.Module, length: int | None = None, batch: int = 16, seed: int = 0,
                w: ModelWeights | None = None, token_pool: Tensor | None = None) -> dict[str, Tensor]:
    """Every detector's ``(L, H)`` scores on repeated random tokens (``length`` fits the position table;
    ``token_pool``: draw the repeated tokens from these ids only, see ``repeated_random_tokens``). Layer ``i`` is
    ``circuit_view(model).blocks[i]``: for the hourglass its token-level layers (``layer_names`` has their paths)."""
    model = circuit_view(model)
    was_training = model.training
    model.eval()
    cfg = model.cfg
    max_len = getattr(model.position, "max_len", None) or 256
    length = length or min(32, max_len // 2)
    if 2 * length > max_len:
        raise ValueError(f"2 * length = {2 * length} exceeds the model's max_seq_len {max_len}")
    if w is None:
        try:
            w = extract_weights(model, fold_ln=True)
        except ValueError:          # attention without fused per-head weights: pattern-based scores only
            w = None
    device = model.tok_emb.weight.device
    idx = repeated_random_tokens(cfg.vocab_size, length, batch, seed, pool=token_pool).to(device)
    pats = stack_patterns(attention_patterns(model, idx), cfg.n_layer)
    scores = {
        "prev_token": previous_token_scores(pats),
        "duplicate_token": duplicate_token_scores(pats, length),
        "induction": induction_scores(pats, length),
    }
    if w is not None:
        scores["copying"] = copying_scores(w)
    try:
        scores["copying_rank"] = copying_rank_scores(model, idx[:8])
    except KeyError:                # no hook_result
        pass
    rand = torch.randint(cfg.vocab_size, (batch, 2 * length), generator=torch.Generator().manual_seed(seed + 1))
    scores["positional"] = positional_scores(stack_patterns(attention_patterns(model, rand.to(device)),
                                                            cfg.n_layer))
    from modformer.interp.gradflow import attention_distance, attention_entropy

    scores["entropy"] = attention_entropy(pats)
    scores["distance"] = attention_distance(pats)
    model.train(was_training)
    absent = ~present_heads(model)
    return {k: v.float().cpu().masked_fill(absent, float("nan")) for k, v in scores.items()}


def head_table(scores: dict[str, Tensor], modules: list[str] | None = None) -> list[dict]:
    """One row per head: ``{"layer", "head", "name", <score>: float, ...}``; heads whose scores are all NaN
    (absent in a pruned layer) have no row; a single score that does not apply to a present head (NaN) is None,
    so the rows stay strict JSON. ``modules``: each layer's module path, added as ``"module"``."""
    L, H = next(iter(scores.values())).shape
    where = (lambda i: {"module": modules[i]}) if modules else (lambda i: {})

    def value(x: Tensor) -> float | None:
        return None if bool(x.isnan()) else round(float(x), 4)

    return [{"layer": i, "head": h, "name": f"L{i}H{h}", **where(i), **{k: value(v[i, h]) for k, v in scores.items()}}
            for i in range(L) for h in range(H) if not all(bool(v[i, h].isnan()) for v in scores.values())]


def table_markdown(rows: list[dict]) -> str:
    """The per-head table as a markdown table."""
    if not rows:
        return ""
    keys = [k for k in rows[0] if k not in ("layer", "head")]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[k]:.3f}" if isinstance(r[k], float) else "n/a" if r[k] is None
                                       else str(r[k]) for k in keys) + " |")
    return "\n".join(lines) + "\n"
