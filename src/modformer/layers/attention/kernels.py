"""One attention-kernel dispatcher shared by every attention variant.

Backends (registry kind ``attn_backend``):
- ``sdpa``: ``F.scaled_dot_product_attention`` (flash / cuDNN / memory-efficient on GPU).
- ``eager``: explicit softmax in float32; the only backend that returns probabilities, used
  for analysis (hook_pattern) and as the test reference.
- ``flex``: FlexAttention with a BlockMask (compiled on GPU; forward-only reference on CPU);
  structured and learned sparsity plug in through ``block_mask``; compiled single-query decode steps take
  the flex-decoding (split-KV) kernel.
- ``decode``: single-query steps as a multiply-and-sum over the cache (compiled decoding's default), else eager.

All backends take q ``(B, H, Tq, Dh)`` and k, v ``(B, Hkv, Tk, Dh)`` with ``H % Hkv == 0``
(GQA/MQA). Query ``i`` sits at absolute position ``q_offset + i`` and key ``j`` at position ``j``;
``causal`` keeps keys with position <= the query's, which also hides unwritten slots of a
preallocated (static) KV cache.

Padded and packed batches (``AttnSpec.key_valid`` set): a boolean keep-mask per row combines causality
(by slot), padding (``key_valid``), documents (``key_doc``: attention stays inside a document) and a sparse
kind's ``pattern`` (on per-row positions ``key_pos``, counted from each row's first real token or document
start); a padding query sees only its own slot, so no row is empty and no backend returns NaN. Eager and
sdpa take it as a dense mask, flex as a ``mask_mod``. Without ``key_valid`` nothing of this runs: plain
causal calls still reach SDPA with ``is_causal=True``.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from modformer.registry import register


@dataclass
class AttnSpec:
    """How one attention call is masked and biased."""

    causal: bool = True
    q_offset: int | None = 0             # None: positions only known as the tensor q_pos (graph-safe decoding)
    q_pos: Tensor | None = None          # (Tq,) absolute query positions, used when q_offset is None
    alibi_slopes: Tensor | None = None   # (H,) ALiBi slopes, bias = -slope * (q_pos - k_pos)
    scale: float | None = None
    dropout_p: float = 0.0
    block_mask: object | None = None     # flex BlockMask overriding the causal mask (sparse variants)
    keep: Tensor | None = None           # dense bool keep-mask (Tq, Tk) or (B|1, H|1, Tq, Tk) overriding the causal
                                         # mask: the sparse variants' reference path (eager / sdpa)
    memo: dict | None = None             # the forward's Context.memo: the mask bias is built once for all layers
    key_valid: Tensor | None = None      # (B, Tk) bool, False for padding keys: turns on the per-row mask below
    key_pos: Tensor | None = None        # (B, Tk) per-row positions (from the first real token / document start)
    key_doc: Tensor | None = None        # (B, Tk) document ids: a query sees only keys of its own document
    pattern: tuple | None = None         # (keep(q_pos, k_pos, *params), params): a sparse kind on per-row positions
    bias: Tensor | None = None           # additive float mask (B|1, H|1, Tq, Tk), e.g. modformer.nn's float masks


def row_keep(spec: AttnSpec, tq: int, tk: int, device: torch.device) -> Tensor:
    """Boolean keep-mask ``(B, 1|H, Tq, Tk)`` of a padded / packed call (``spec.key_valid`` set): causal by slot,
    real keys only, same document, the sparse pattern and ``spec.keep``; padding queries keep their own slot."""
    key = ("row_keep", tq, tk, spec.causal, spec.pattern, str(device))
    if spec.memo is not None and spec.keep is None and key in spec.memo:
        return spec.memo[key]
    q_slot, k_slot = _positions(spec, tq, tk, device)
    valid = spec.key_valid.to(device)
    keep = valid[:, None, :].expand(-1, tq, -1)                                      # (B, Tq, Tk)
    if spec.causal:
        keep = keep & (q_slot[:, None] >= k_slot[None, :])
    if spec.key_doc is not None:
        doc = spec.key_doc.to(device)
        keep = keep & (doc[:, q_slot, None] == doc[:, None, :])
    if spec.pattern is not None:
        fn, params = spec.pattern
        kpos = spec.key_pos.to(device)
        keep = keep & fn(kpos[:, q_slot, None], kpos[:, None, :], *params)
    keep = keep.unsqueeze(1)                                                         # (B, 1, Tq, Tk)
    if spec.keep is not None:
        keep = keep & spec.keep.to(device)
    own = (~valid[:, q_slot, None] & (q_slot[:, None] == k_slot[None, :])).unsqueeze(1)
    keep = keep | own
    if spec.memo is not None and spec.keep is None:
        spec.memo[key] = keep
    return keep


def alibi_bias(spec: AttnSpec, n_head: int, tq: int, tk: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``(H, Tq, Tk)`` ALiBi bias ``-slope * |q_slot - k_slot|`` (slot distance = position distance inside a row)."""
    q_pos, k_pos = _positions(spec, tq, tk, device)
    rel = (q_pos[:, None] - k_pos[None, :]).to(dtype).abs()
    return -spec.alibi_slopes.to(device, dtype).view(n_head, 1, 1) * rel


def _positions(spec: AttnSpec, tq: int, tk: int, device: torch.device) -> tuple[Tensor, Tensor]:
    if spec.q_offset is None:
        q_pos = spec.q_pos.to(device)
    else:
        q_pos = torch.arange(spec.q_offset, spec.q_offset + tq, device=device)
    return q_pos, torch.arange(tk, device=device)


def attn_bias(spec: AttnSpec, n_head: int, tq: int, tk: int, device: torch.device,
              dtype: torch.dtype) -> Tensor | None:
    """Additive float bias ``(1|H, Tq, Tk)`` (0 / -inf plus ALiBi), or None when not needed."""
    all_visible = not spec.causal or (spec.q_offset is not None and tk <= spec.q_offset + 1)
    if spec.alibi_slopes is None and all_visible:
        return None
    key = ("causal_bias", tq, tk, dtype, str(device)) if spec.memo is not None and spec.alibi_slopes is None else None
    if key is not None and key in spec.memo:
        return spec.memo[key]
    q_pos, k_pos = _positions(spec, tq, tk, device)
    rel = (q_pos[:, None] - k_pos[None, :]).to(dtype)             # (Tq, Tk) distance to the key
    bias = torch.zeros(1, tq, tk, device=device, dtype=dtype)
    if spec.alibi_slopes is not None:
        bias = -spec.alibi_slopes.to(device, dtype).view(n_head, 1, 1) * rel.abs().unsqueeze(0)
    if spec.causal:
        bias = bias.masked_fill((rel < 0).unsqueeze(0), float("-inf"))
    if key is not None:
        spec.memo[key] = bias
    return bias


def _expand_kv(k: Tensor, v: Tensor, n_head: int) -> tuple[Tensor, Tensor]:
    rep = n_head // k.shape[1]
    if rep == 1:
        return k, v
    return k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)


@register("attn_backend", "eager")
def eager_attention(q: Tensor, k: Tensor, v: Tensor, spec: AttnSpec,
                    need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
    """Reference path: softmax(q k^T * scale + bias) v, softmax in >= float32; returns probs."""
    H = q.shape[1]
    k, v = _expand_kv(k, v, H)
    acc = torch.promote_types(q.dtype, torch.float32)                     # fp32 softmax for bf16/fp16
    scores = torch.matmul(q, k.transpose(-2, -1)).to(acc) * _scale(spec, q)  # (B, H, Tq, Tk)
    probs = _masked_softmax(scores, spec)
    drop = F.dropout(probs, spec.dropout_p) if spec.dropout_p > 0 else probs
    out = torch.matmul(drop.to(v.dtype), v)
    return out, (probs if need_weights else None)


@register("attn_backend", "decode")
def decode_attention(q: Tensor, k: Tensor, v: Tensor, spec: AttnSpec,
                     need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
    """Single-query steps (``Tq == 1``, cached decoding) as multiply-and-sum over the cache in >= float32; any
    other call takes the eager path.

    For compiled decoding (``generate(compile=True, decode_backend="decode")``): Inductor fuses each product into one
    bandwidth-bound reduction, where the eager path's matmuls become one slow batched matrix-vector product per
    row and head (cuBLAS gemv: 40% of a GPT-2-124M fp32 decode step of 64 rows, H100) and SDPA's kernels fill
    a 64-row query tile with one useful row. Uncompiled it materialises ``(B, H, Tk, Dh)`` products: slower."""
    if q.shape[2] != 1 or need_weights or spec.dropout_p > 0:
        return eager_attention(q, k, v, spec, need_weights)
    k, v = _expand_kv(k, v, q.shape[1])
    acc = torch.promote_types(q.dtype, torch.float32)
    scores = (q.to(acc) * k.to(acc)).sum(-1).unsqueeze(-2) * _scale(spec, q)      # (B, H, 1, Tk)
    probs = _masked_softmax(scores, spec)
    out = (probs.transpose(-2, -1) * v.to(acc)).sum(-2, keepdim=True)              # (B, H, 1, Dh)
    return out.to(v.dtype), None


def _scale(spec: AttnSpec, q: Tensor) -> float:
    return spec.scale if spec.scale is not None else 1.0 / math.sqrt(q.shape[-1])


def _masked_softmax(scores: Tensor, spec: AttnSpec) -> Tensor:
    """Softmax over keys of scaled scores ``(B, H, Tq, Tk)`` (>= float32) after every mask and bias of ``spec``;
    rows with no visible key give 0."""
    _, H, Tq, Tk = scores.shape
    device, acc = scores.device, scores.dtype
    if spec.key_valid is not None:
        if spec.alibi_slopes is not None:
            scores = scores + alibi_bias(spec, H, Tq, Tk, device, acc)
        scores = scores.masked_fill(~row_keep(spec, Tq, Tk, device), float("-inf"))
    elif spec.keep is not None:
        scores = scores.masked_fill(~spec.keep.to(device), float("-inf"))
    elif spec.block_mask is not None:
        keep = dense_from_block_mask(spec.block_mask, Tq, Tk).to(device)
        scores = scores.masked_fill(~keep, float("-inf"))
    else:
        bias = attn_bias(spec, H, Tq, Tk, device, acc)
        if bias is not None:
            scores = scores + bias
    if spec.bias is not None:
        scores = scores + spec.bias.to(device, acc)
    return torch.softmax(scores, dim=-1).nan_to_num(0.0)


@register("attn_backend", "sdpa")
def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, spec: AttnSpec,
                   need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
    """PyTorch SDPA; uses ``is_causal`` (flash-eligible) whenever the mask is plain causal."""
    if need_weights or spec.block_mask is not None or (spec.bias is not None and (spec.keep is not None
                                                                                  or spec.key_valid is not None)):
        return eager_attention(q, k, v, spec, need_weights)
    B, H, Tq, Dh = q.shape
    Tk = k.shape[2]
    causal_only = (spec.causal and spec.q_offset == 0 and spec.alibi_slopes is None and spec.keep is None
                   and spec.key_valid is None and spec.bias is None)
    if causal_only and Tk > Tq:
        # a prefill into a static cache: the slots past the queries are unwritten and causally hidden, so the
        # queries' own keys (a view) make it plain causal, flash-eligible, instead of a masked kernel (at 64 x 16k
        # the masked prefill made generate(compile=True) ~6 ms a token slower, counted over 256 new tokens)
        k, v, Tk = k[:, :, :Tq], v[:, :, :Tq], Tq
    plain_causal = causal_only and Tq == Tk
    if spec.key_valid is not None:
        mask = row_keep(spec, Tq, Tk, q.device)
        if spec.alibi_slopes is not None:
            mask = alibi_bias(spec, H, Tq, Tk, q.device, q.dtype).masked_fill(~mask, float("-inf"))
    else:
        mask = spec.keep if spec.keep is not None else (
            None if plain_causal else attn_bias(spec, H, Tq, Tk, q.device, q.dtype))
    if k.shape[1] != H and (mask is not None or q.device.type != "cuda"):
        k, v = _expand_kv(k, v, H)   # enable_gqa only pays off on the fused GPU kernels
    if spec.bias is not None:
        bias = spec.bias.to(q.device, q.dtype)
        mask = bias if mask is None else mask.to(q.dtype) + bias       # attn_bias is 0 / -inf (+ ALiBi)
    if mask is not None and mask.dim() < 4:
        mask = mask.unsqueeze(0)
    with _without_cudnn() if _skip_cudnn(q, plain_causal) else contextlib.nullcontext():
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=plain_causal,
            dropout_p=spec.dropout_p, scale=spec.scale, enable_gqa=k.shape[1] != H)
    return out, None


_changing_shapes = 0   # depth of open ``changing_shapes()`` blocks


@contextlib.contextmanager
def changing_shapes() -> Iterator[None]:
    """Mark calls whose shapes change every time (generation without a cache re-runs a context one token
    longer per step): SDPA leaves cuDNN out inside, as for cached decoding (see ``_skip_cudnn``)."""
    global _changing_shapes
    _changing_shapes += 1
    try:
        yield
    finally:
        _changing_shapes -= 1


def _skip_cudnn(q: Tensor, plain_causal: bool) -> bool:
    """Eager inference on GPU avoids cuDNN attention where shapes keep changing: cuDNN builds a new execution
    plan for every new shape (~40 ms on an H200), and in cached decoding (a query offset: not plain causal) or
    inside ``changing_shapes()`` the key length changes at every token, which made eager generation
    ~50 ms/token. Plain causal forwards (evaluation, prefill), training and compiled graphs keep cuDNN,
    whose forward is ~2x flash-2's on an H200 (``bench attention``)."""
    return (q.is_cuda and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and (not plain_causal or _changing_shapes > 0) and torch.backends.cuda.cudnn_sdp_enabled())


def _without_cudnn() -> contextlib.AbstractContextManager:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    enabled = {SDPBackend.FLASH_ATTENTION: torch.backends.cuda.flash_sdp_enabled(),
               SDPBackend.EFFICIENT_ATTENTION: torch.backends.cuda.mem_efficient_sdp_enabled(),
               SDPBackend.MATH: torch.backends.cuda.math_sdp_enabled()}
    return sdpa_kernel([b for b, on in enabled.items() if on] or [SDPBackend.MATH])


@lru_cache(maxsize=64)
def causal_block_mask(tq: int, tk: int, q_offset: int, device: str) -> object:
    """Cached FlexAttention BlockMask for causal attention with a query offset."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):  # noqa: ANN001, ANN202
        return kv_idx <= q_idx + q_offset

    # _compile builds the mask blockwise on GPU instead of materialising the (Tq, Tk) grid, which cost
    # 39 GiB at T=16k in the memory benchmark
    return create_block_mask(mask_mod, None, None, tq, tk, device=device, _compile=device.startswith("cuda"))


def row_mask_mod(spec: AttnSpec, tq: int, device: torch.device) -> Callable:
    """FlexAttention ``mask_mod`` equal to ``row_keep``: causal + padding + document + sparse pattern. The per-row
    tables are padded past every index a compiled kernel may read in its last partial tile (128 wide)."""
    off, causal = spec.q_offset, spec.causal
    tk = spec.key_valid.shape[1]
    extra = (-(-(off + tq) // 128) * 128 + -(-tk // 128) * 128) - tk

    def table(x: Tensor, value: int) -> Tensor:
        return F.pad(x.to(device), (0, extra), value=value)

    valid = table(spec.key_valid, False)
    doc = table(spec.key_doc, -1) if spec.key_doc is not None else None
    kpos = table(spec.key_pos, 0) if spec.pattern is not None else None
    fn, params = spec.pattern if spec.pattern is not None else (None, ())

    def mask_mod(b, h, q_idx, kv_idx):  # noqa: ANN001, ANN202
        qs = q_idx + off
        keep = valid[b, kv_idx]
        if causal:
            keep = keep & (kv_idx <= qs)
        if doc is not None:
            keep = keep & (doc[b, qs] == doc[b, kv_idx])
        if fn is not None:
            keep = keep & fn(kpos[b, qs], kpos[b, kv_idx], *params)
        return keep | (~valid[b, qs] & (kv_idx == qs))

    return mask_mod


def row_block_mask(spec: AttnSpec, batch: int, tq: int, tk: int, device: torch.device) -> object:
    """The BlockMask of a padded / packed call (built once per forward when ``spec.memo`` is shared)."""
    from torch.nn.attention.flex_attention import create_block_mask

    key = ("row_block_mask", tq, tk, spec.causal, spec.pattern, str(device))
    if spec.memo is not None and key in spec.memo:
        return spec.memo[key]
    mask = create_block_mask(row_mask_mod(spec, tq, device), batch, None, tq, tk, device=str(device),
                             _compile=device.type == "cuda")
    if spec.memo is not None:
        spec.memo[key] = mask
    return mask


def dense_from_block_mask(block_mask: object, tq: int, tk: int) -> Tensor:
    """Boolean keep-mask ``(B|1, H|1, Tq, Tk)`` equal to a BlockMask (reference for the eager path)."""
    from torch.nn.attention.flex_attention import create_mask

    bq, bk = block_mask.BLOCK_SIZE
    blocks = block_mask.to_dense().bool()                              # (B, H, Tq/bq, Tk/bk)
    dense = blocks.repeat_interleave(bq, -2).repeat_interleave(bk, -1)[..., :tq, :tk]
    b, h = block_mask.shape[:2]
    return dense & create_mask(block_mask.mask_mod, b, h, tq, tk, device=dense.device)


def position_block_mask(pos: Tensor, cap: int, block: int, full_num: Tensor, full_idx: Tensor,
                        kept: Tensor | None = None) -> object:
    """BlockMask of one query at the tensor position ``pos`` (one element) over a static cache of ``cap`` slots,
    built from tensors in the graph, so one compiled decode step serves every position: the ``full_num`` ``(B, H, 1)``
    key blocks listed first in ``full_idx`` ``(B, H, 1, n)`` are full (no mask evaluated), the query's own block is
    partial (``kv_idx <= pos``) and no other block is visited. ``kept`` ``(B, H, n)`` bool, when the full blocks are a
    choice (learned gate), puts that choice in ``mask_mod`` too: compiled kernels evaluate it only in the partial
    block, while references that evaluate only ``mask_mod`` (eager flex on the CPU) then see the same mask."""
    from torch.nn.attention.flex_attention import BlockMask

    B, H = full_num.shape[:2]
    n = -(-cap // block)
    p = pos.reshape(())
    own = (p // block).to(torch.int32)
    order = torch.arange(n, device=full_num.device, dtype=torch.int32)

    def mask_mod(b, h, q_idx, kv_idx):  # noqa: ANN001, ANN202
        keep = kv_idx <= p
        return keep if kept is None else keep & kept[b, h, kv_idx // block]

    return BlockMask.from_kv_blocks(
        torch.ones(B, H, 1, device=full_num.device, dtype=torch.int32), ((order + own) % n).expand(B, H, 1, n),
        full_kv_num_blocks=full_num, full_kv_indices=full_idx, BLOCK_SIZE=block, mask_mod=mask_mod,
        seq_lengths=(1, cap), compute_q_blocks=False)


def decode_block_mask(spec: AttnSpec, tk: int, device: torch.device, block: int = 128) -> object:
    """Causal ``position_block_mask`` of one query at ``spec.q_pos[0]``: every key block before the query's is full.
    Compiled, a single query takes Inductor's flex-decoding kernel, which splits the keys over the SMs
    (FlashDecoding), where one fused reduction per head leaves most SMs idle at batch 1. Built once per forward
    (``spec.memo``) for all layers."""
    key = ("decode_block_mask", tk, block, str(device))
    if spec.memo is not None and key in spec.memo:
        return spec.memo[key]
    pos = spec.q_pos.to(device).reshape(-1)[:1]
    order = torch.arange(-(-tk // block), device=device, dtype=torch.int32)
    mask = position_block_mask(pos, tk, block, (pos // block).to(torch.int32).view(1, 1, 1), order.view(1, 1, 1, -1))
    if spec.memo is not None:
        spec.memo[key] = mask
    return mask


FLEX_COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
_compiled_flex: dict[str, Callable] = {}      # compile mode -> torch.compile(flex_attention, mode)
_flex_mode = "default"                        # set by ``flex_compile_mode``


@contextlib.contextmanager
def flex_compile_mode(mode: str) -> Iterator[None]:
    """Inside, CUDA flex attention called eagerly (not inside a compiled model) runs through
    ``torch.compile(flex_attention, mode=mode)``: ``max-autotune-no-cudagraphs`` benchmarks the Triton kernels' tile
    sizes and stages for each shape (forward and backward) and keeps the fastest, at the price of a slower first
    call; ``default`` uses the built-in heuristics."""
    global _flex_mode
    if mode not in FLEX_COMPILE_MODES:
        raise ValueError(f"flex compile mode: unknown {mode!r}; allowed: {', '.join(FLEX_COMPILE_MODES)}")
    saved, _flex_mode = _flex_mode, mode
    try:
        yield
    finally:
        _flex_mode = saved


def _flex_fn(device: torch.device) -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention
    fn = _compiled_flex.get(_flex_mode)
    if fn is None:
        # one specialised kernel per shape; the default recompile limit (8) would silently fall
        # back to the unfused reference after a few sequence lengths
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        mode = None if _flex_mode == "default" else _flex_mode
        fn = _compiled_flex[_flex_mode] = torch.compile(flex_attention, dynamic=False, mode=mode)
    return fn


@register("attn_backend", "flex")
def flex_attention_backend(q: Tensor, k: Tensor, v: Tensor, spec: AttnSpec,
                           need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
    """FlexAttention: causal/sparse structure as a BlockMask, ALiBi as a score_mod."""
    if need_weights or spec.dropout_p > 0 or spec.keep is not None or spec.bias is not None:
        return eager_attention(q, k, v, spec, need_weights)
    B, H, Tq, Dh = q.shape
    Tk = k.shape[2]
    block_mask = spec.block_mask
    if spec.q_offset is None:       # tensor positions (compiled decoding): a given block_mask is built for them
        if (Tq != 1 or spec.key_valid is not None or spec.alibi_slopes is not None
                or (block_mask is None and not spec.causal)):
            return sdpa_attention(q, k, v, spec)
        if block_mask is None:
            block_mask = decode_block_mask(spec, Tk, q.device)
    if spec.key_valid is not None:
        block_mask = row_block_mask(spec, B, Tq, Tk, q.device)
    elif block_mask is None and spec.causal:
        block_mask = causal_block_mask(Tq, Tk, spec.q_offset, str(q.device))
    score_mod = None
    if spec.alibi_slopes is not None:
        slopes = spec.alibi_slopes.to(q.device, torch.float32)
        off = spec.q_offset

        def score_mod(score, b, h, q_idx, kv_idx):  # noqa: ANN001, ANN202
            return score - slopes[h] * (q_idx + off - kv_idx).abs()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager (uncompiled) flex on CPU warns it is a slow reference
        out = _flex_fn(q.device)(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=spec.scale,
                                 enable_gqa=k.shape[1] != H)
    return out, None


_backend_override: str | None = None   # set by ``use_backend``


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Inside, every ``attend`` call uses backend ``name`` whatever the model's ``attn_backend`` (None: no
    override). ``GraphDecoder`` compiles its decode step inside one: a single-query step over a padded batch
    is a batched matrix-vector product that SDPA's memory-efficient kernel runs with one useful query row
    per 64-row tile, while the eager path's two matmuls read the cache once."""
    global _backend_override
    if name is not None:
        from modformer import registry

        registry.get("attn_backend", name, field="decode attention backend")      # unknown name: one line
    saved, _backend_override = _backend_override, name
    try:
        yield
    finally:
        _backend_override = saved


def active_backend(backend: str) -> str:
    """The backend ``attend`` will use for a layer whose own is ``backend`` (``use_backend`` overrides it)."""
    return _backend_override or backend


def attend(q: Tensor, k: Tensor, v: Tensor, spec: AttnSpec, backend: str = "sdpa",
           need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
    """Dispatch to a backend (``use_backend`` overrides it); ``need_weights`` forces the eager path and returns
    probabilities."""
    from modformer import registry

    if need_weights:
        return eager_attention(q, k, v, spec, True)
    backend = active_backend(backend)
    return registry.get("attn_backend", backend, field="model.attn_backend")(q, k, v, spec, False)
