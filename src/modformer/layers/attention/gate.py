"""Learned block-sparse attention (registry attention ``learned_gate``; after SeerAttention, Gao et al. 2024).

Same parameters as ``mha`` plus a small gate (``gate_q``, ``gate_k``). Per head, the sequence is cut into
blocks of ``block_size`` tokens. Query block j is summarised by the mean query over the ``block_size``
positions ending at the block's first token (so the choice made for block j depends only on tokens every
query in it can see: no future leakage), key block b by the mean and max of its keys. The gate scores
``S[j, b] = (W_q q_j) . (W_k [mean_b; max_b]) / sqrt(d_gate)`` over the strictly past blocks b < j and keeps

- ``select: topk``: the ``top_k - 1`` best past blocks (``top_k`` blocks with the diagonal);
- ``select: threshold``: past blocks whose softmax gate exceeds ``threshold``;
- ``select: sparsemax``: past blocks with non-zero sparsemax weight (Martins & Astudillo 2016);

plus, always, the diagonal block (causal inside). ``top_k >= n_blocks`` or ``threshold <= 0`` keeps every
causal block, which is exactly dense attention. The gate starts as the identity map (``W_q = I``,
``W_k = [I, 0]``: pooled attention logits), so it is sensible before training.

Training the gate (options):
- ``gate_loss`` (weight, default 1.0): SeerAttention's distillation target, the layer's own dense
  attention map pooled to blocks (mass per key block, mean over each query block's rows, renormalised over
  past blocks), matched by KL to the softmax gate; added to ``self.aux_loss`` (training mode only).
- ``grad: ste``: additionally, end to end, the attention probabilities of kept blocks are multiplied by
  ``1 + g - stopgrad(g)`` (value 1, gradient to the gate ``g``): straight-through top-k. ``grad: none``
  (default) trains the gate through ``gate_loss`` only. With ``select: sparsemax``, ``g`` is the sparsemax weight.
The aux-loss route is the one that works in our measurements (`modformer bench sparse-fidelity`,
docs/studies/sparse_attention.md); STE alone only sees kept blocks, so it cannot learn to promote a dropped one.

Execution: the flex backend on CUDA builds a ``BlockMask`` from the kept block indices (off-diagonal
blocks full, diagonal block partial with the causal ``mask_mod``): dropped blocks are never computed. This
needs ``block_size`` to be a multiple of 128 (the compiled kernel's tile; smaller blocks failed to lower on
the H100); other sizes run through the dense keep-mask below.
Elsewhere a dense keep-mask goes to the eager / SDPA kernel. KV caches store the queries too
(``cache.append(layer, "gate_q", q)``) for the causal query summaries.

Decoding (one token per cached step, past the first block, batches without padding): the choice for a query
block is made once, on its first decoded token, and kept in ``cache.state``; each step gathers only the kept blocks'
keys and values (plus the current block) and attends to them, so the dropped blocks of the cache are never read (KV
block skipping). At tensor positions (the compiled CUDA-graph decoder, ``generate(compile=True)``; static cache, top-k,
no padding) every shape is fixed instead: each step rewrites its block's pooled key summary in a buffer the static
cache keeps (filled at prefill), rescores the past blocks from that buffer and gathers the ``top_k - 1`` chosen blocks
plus the current one; the same inputs give the same choice at every token of a block.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modformer.config import ModelConfig
from modformer.layers.attention.kernels import AttnSpec, active_backend, attend, eager_attention, position_block_mask
from modformer.layers.attention.masks import segments
from modformer.layers.attention.mha import MultiHeadAttention
from modformer.layers.attention.sparse import FLEX_TILE, use_flex
from modformer.layers.cache import StaticKVCache
from modformer.layers.context import Context
from modformer.registry import ConfigError, register

TARGET_CHUNK = 1 << 22        # query rows x keys of the dense map the gate's training target holds at once


def sparsemax(z: Tensor, dim: int = -1) -> Tensor:
    """Euclidean projection onto the simplex along ``dim`` (-inf entries get 0; all -inf rows give 0)."""
    finite = torch.isfinite(z)
    z = torch.where(finite, z, torch.full_like(z, -1e9))
    zs, _ = z.sort(dim=dim, descending=True)
    rng = torch.arange(1, z.shape[dim] + 1, device=z.device, dtype=z.dtype)
    rng = rng.view([-1 if i == (dim % z.dim()) else 1 for i in range(z.dim())])
    cs = zs.cumsum(dim)
    support = (1 + rng * zs > cs).to(z.dtype)
    k = support.sum(dim=dim, keepdim=True).clamp_min(1)
    tau = (cs.gather(dim, k.long() - 1) - 1) / k
    return (z - tau).clamp_min(0) * finite.any(dim, keepdim=True)


def _ordered(dense: Tensor) -> tuple[Tensor, Tensor]:
    """A dense block matrix ``(..., rows, cols)`` as FlexAttention's ordered form: blocks per row and the column
    indices of the set blocks first (ascending), as torch's own conversion orders them."""
    dense = dense.to(torch.int32)
    return dense.sum(-1).to(torch.int32), dense.argsort(dim=-1, descending=True, stable=True).to(torch.int32)


def block_mask_tensors(keep: Tensor, qb: Tensor) -> dict[str, Tensor]:
    """The index tensors of a FlexAttention ``BlockMask`` from kept blocks ``(B, H, nq, nk)`` of query blocks ``qb``:
    one partial block per query block (the diagonal, causal inside) and the off-diagonal kept blocks, full; for the
    forward (``kv_*``: key blocks per query block) and the backward (``q_*``: query blocks per key block, the
    transpose). Plain tensor ops with no host sync, so a compiled gate can produce them; building the transpose
    here replaces ``BlockMask.from_kv_blocks``'s own, which took 2.0 ms of host time per call on an H100 (0.5 ms for
    the whole compiled gate)."""
    B, H, nq, nk = keep.shape
    diag = (torch.arange(nk, device=keep.device)[None, :] == qb[:, None]).expand(B, H, nq, nk)
    full = keep & ~diag
    kv_num, kv_idx = _ordered(diag)
    full_kv_num, full_kv_idx = _ordered(full)
    q_num, q_idx = _ordered(diag.transpose(-2, -1))
    full_q_num, full_q_idx = _ordered(full.transpose(-2, -1))
    return {"kv_num_blocks": kv_num, "kv_indices": kv_idx, "full_kv_num_blocks": full_kv_num,
            "full_kv_indices": full_kv_idx, "q_num_blocks": q_num, "q_indices": q_idx,
            "full_q_num_blocks": full_q_num, "full_q_indices": full_q_idx}


def block_mask_from_blocks(keep: Tensor, qb: Tensor, tq: int, tk: int, block_size: int,
                           first_block: int = 0, parts: dict[str, Tensor] | None = None) -> object:
    """FlexAttention BlockMask from kept blocks ``(B, H, nq, nk)`` of query blocks ``qb`` (``first_block`` =
    ``qb[0]``, given so that building the mask never waits for the GPU; prefill: qb = 0..nq-1): off-diagonal
    kept blocks full (no mask_mod work), the diagonal block partial with the causal mask_mod. ``parts``: the
    ``block_mask_tensors`` of ``keep``, when already made."""
    from torch.nn.attention.flex_attention import BlockMask

    B, H = keep.shape[:2]
    q0 = first_block

    def kept_causal(b, h, q_idx, kv_idx):  # noqa: ANN001, ANN202
        # the block choice is in mask_mod too, so references that only evaluate mask_mod (eager flex on CPU)
        # agree; compiled flex evaluates it only on the partial (diagonal) blocks
        bi, hi = (b if B > 1 else 0), (h if H > 1 else 0)
        return keep[bi, hi, q_idx // block_size - q0, kv_idx // block_size] & (q_idx >= kv_idx)

    return BlockMask(seq_lengths=(tq, tk), **(parts or block_mask_tensors(keep, qb)),
                     BLOCK_SIZE=(block_size, block_size), mask_mod=kept_causal)


def _pool_blocks(k: Tensor, bs: int) -> tuple[Tensor, Tensor]:
    """Mean and max of each ``bs``-token block of ``k`` ``(B, H, L, Dh)`` (the last block may be short), as two
    reductions over a view: no padded copy of the keys."""
    B, H, L, Dh = k.shape
    n_full = L // bs
    full = k[:, :, :n_full * bs].view(B, H, n_full, bs, Dh)
    mean, mx = full.sum(3) / bs, full.amax(3)
    if L > n_full * bs:
        tail = k[:, :, n_full * bs:]
        mean = torch.cat([mean, tail.sum(2, keepdim=True) / tail.shape[2]], 2)
        mx = torch.cat([mx, tail.amax(2, keepdim=True)], 2)
    return mean, mx


def _query_summaries(q: Tensor, bs: int, j0: int, j1: int) -> Tensor:
    """Float32 mean query over the ``bs`` positions ending at the first token of each block j in [j0, j1) (fewer
    at the start): block j-1 without its first token, plus block j's first token."""
    B, H, _, Dh = q.shape
    firsts = q[:, :, j0 * bs::bs].float()                                          # (B, H, j1 - j0, Dh)
    lo = max(j0 - 1, 0)
    inner = q[:, :, lo * bs:(j1 - 1) * bs].view(B, H, j1 - 1 - lo, bs, Dh)[:, :, :, 1:].sum(3, dtype=torch.float32)
    counts = torch.full((j1 - j0, 1), float(bs), device=q.device)
    if j0 == 0:                                                                    # block 0: its first token only
        inner = F.pad(inner, (0, 0, 1, 0))
        counts[0] = 1.0
    return (firsts + inner) / counts


def step_block_mask(blocks: Tensor, ok: Tensor, j: Tensor, p: Tensor, cap: int, block_size: int) -> object:
    """``kernels.position_block_mask`` of one decoding step at the tensor position ``p`` (in block ``j``): the chosen
    past blocks ``blocks`` ``(B, H, k)`` where ``ok`` (top-k order: the valid ones first) as full blocks, the current
    block partial. FlexAttention then reads only those blocks of the cache, in place: no gather, and a single query
    takes the split-KV decoding kernel when compiled."""
    B, H, k = blocks.shape
    n = -(-cap // block_size)
    order = torch.arange(n, device=blocks.device)
    kept = blocks.new_zeros(B, H, n, dtype=torch.bool).scatter(2, blocks, ok) | (order == j)   # invalid picks are >= j
    return position_block_mask(p, cap, block_size, ok.sum(-1, keepdim=True).to(torch.int32),
                               F.pad(blocks.to(torch.int32), (0, n - k))[:, :, None], kept)


def _flat_slots(slots: Tensor, kv_head: Tensor, cap: int) -> Tensor:
    """Cache slots ``(B, H, n)`` per query head as indices into the keys flattened over (kv head, slot): ``(B, H n)``;
    ``kv_head`` ``(H,)`` is each query head's kv head, ``cap`` the cache's slots."""
    return (slots + (kv_head * cap)[None, :, None]).flatten(1)


def _gather_slots(x: Tensor, index: Tensor, heads: int) -> Tensor:
    """Keys or values ``(B, Hkv, cap, Dh)`` at the ``_flat_slots`` ``index``: ``(B, heads, n, Dh)``, one gather."""
    B, _, _, Dh = x.shape
    return x.reshape(B, -1, Dh).gather(1, index[..., None].expand(-1, -1, Dh)).view(B, heads, -1, Dh)


@register("attention", "learned_gate")
class LearnedGateAttention(MultiHeadAttention):
    """``mha`` attending, per query block, to the key blocks a small learned gate picks (see module doc)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, block_size: int = 64, top_k: int = 4,
                 threshold: float = 0.0, select: str = "topk", grad: str = "none", gate_loss: float = 1.0,
                 d_gate: int | None = None, n_kv_heads: int | None = None) -> None:
        super().__init__(cfg, layer_idx, n_kv_heads)
        if select not in ("topk", "threshold", "sparsemax") or grad not in ("none", "ste"):
            raise ConfigError(f"learned_gate: select must be topk | threshold | sparsemax and grad none | ste; "
                              f"got {select!r}, {grad!r}")
        if block_size < 1 or top_k < 1 or not cfg.causal or cfg.position == "alibi":
            raise ConfigError("learned_gate needs block_size >= 1, top_k >= 1, causal attention and no ALiBi")
        self.block_size, self.top_k, self.threshold = block_size, top_k, threshold
        self.select, self.grad, self.gate_loss = select, grad, gate_loss
        Dh = self.head_dim
        dg = d_gate or Dh
        self.gate_q = nn.Linear(Dh, dg, bias=False)
        self.gate_k = nn.Linear(2 * Dh, dg, bias=False)
        self.reset_gate()
        self.aux_loss: Tensor | None = None
        self.last_keep: Tensor | None = None     # (B, H, n_qblocks, n_kblocks) kept blocks of the last call

    @torch.no_grad()
    def reset_gate(self) -> None:
        """Identity start: the gate scores are the attention logits of the pooled query and mean key."""
        dg, Dh = self.gate_q.weight.shape
        eye = torch.eye(dg, Dh)
        self.gate_q.weight.copy_(eye)
        self.gate_k.weight.copy_(torch.cat([eye, torch.zeros(dg, Dh)], 1) * math.sqrt(dg / Dh))

    def _keeps_all(self, n_kblocks: int) -> bool:
        return (self.select == "topk" and self.top_k >= n_kblocks) or (self.select == "threshold"
                                                                       and self.threshold <= 0)

    def _block_scores(self, q_sum: Tensor, pooled: Tensor) -> Tensor:
        """Float32 gate logits ``(B, H, nq, nk)`` of query summaries ``(B, H, nq, Dh)`` against pooled key blocks
        ``(B, Hkv, nk, 2 Dh)`` ([mean; max], shared by each kv head's queries); the one formula of the eager gate and
        the compiled step, so both choose alike."""
        gq, gk = self.gate_q(q_sum), self.gate_k(pooled)           # gate_k on the kv heads, then repeated
        if gk.shape[1] != gq.shape[1]:
            gk = gk.repeat_interleave(gq.shape[1] // gk.shape[1], dim=1)
        return (gq @ gk.transpose(-2, -1)).float() / math.sqrt(gq.shape[-1])

    def gate(self, q_all: Tensor, k: Tensor, offset: int, tq: int,
             pooled: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Scores ``(B, H, nq, nk)`` over strictly past blocks (-inf elsewhere), kept blocks (bool), the
        absolute query-block indices ``(nq,)`` and the past-block mask ``(nq, nk)``. ``pooled`` ``(B, Hkv, nk,
        2 Dh)``: the keys' block summaries where the static cache already holds them (else pooled from ``k``)."""
        bs, L = self.block_size, offset + tq
        # the gate reads q/k but never trains them: its losses (gate_loss, STE) update gate_q/gate_k only, as
        # SeerAttention trains the gate with the attention frozen (a gradient into q/k from the gate loss
        # reshaped the attention itself and raised the student's KL 0.08 -> 0.29 in the H100 run)
        q_all = q_all.detach()
        if pooled is None:                                   # pooled on the kv heads, then shared by their queries
            pooled = torch.cat(_pool_blocks(k.detach()[:, :, :L], bs), -1)
        pooled = pooled.detach()
        j0, j1 = offset // bs, (L - 1) // bs + 1                                     # query blocks [j0, j1)
        qb = torch.arange(j0, j1, device=k.device)                                   # (nq,) absolute blocks
        q_sum = _query_summaries(q_all[:, :, :L], bs, j0, j1).to(k.dtype)
        scores = self._block_scores(q_sum, pooled)                                   # (B, H, nq, nk)
        nk = pooled.shape[2]
        past = torch.arange(nk, device=k.device)[None, :] < qb[:, None]              # (nq, nk)
        scores = scores.masked_fill(~past, float("-inf"))
        if self.select == "topk":
            kk = min(self.top_k - 1, nk)
            sel = torch.zeros_like(scores, dtype=torch.bool)
            if kk > 0:
                sel.scatter_(-1, scores.topk(kk, dim=-1).indices, True)
        elif self.select == "threshold":
            sel = torch.softmax(scores, -1).nan_to_num(0.0) > self.threshold
        else:
            sel = sparsemax(scores) > 0
        diag = torch.arange(nk, device=k.device)[None, :] == qb[:, None]
        return scores, (sel & past) | diag, qb, past

    def _dense_keep(self, keep: Tensor, qb: Tensor, offset: int, tq: int, tk: int) -> Tensor:
        """Token-level keep-mask ``(B, H, Tq, Tk)`` from kept blocks (causal inside)."""
        qpos = torch.arange(offset, offset + tq, device=keep.device)
        return self._expand_blocks(keep, qb, offset, tq, tk) & (qpos[:, None] >= torch.arange(tk, device=keep.device))

    def _block_mass(self, q: Tensor, k: Tensor) -> Tensor:
        """The dense causal attention's mass per (query block, key block), summed over each query block's rows:
        ``(B, H, nq, nk)``. Computed a few query blocks at a time (``TARGET_CHUNK`` query rows x keys per batch row
        and head at most), so the full ``(B, H, T, T)`` map never exists: at T=4096 it was 805 MB of float32 per
        layer for a batch of 2 x 6 heads."""
        B, H, T, _ = q.shape
        bs = self.block_size
        nk = -(-T // bs)
        rows = max(bs, TARGET_CHUNK // T // bs * bs)
        chunks = []
        for r0 in range(0, T, rows):
            r1 = min(T, r0 + rows)
            keys = k[:, :, :r1]
            # values of width 1: only the probabilities are wanted, not their product with V
            _, probs = eager_attention(q[:, :, r0:r1], keys, keys[..., :1], AttnSpec(causal=True, q_offset=r0),
                                       need_weights=True)                           # (B, H, r, r1)
            nkc, nqc = -(-r1 // bs), -(-(r1 - r0) // bs)
            mass = F.pad(probs, (0, nkc * bs - r1)).view(B, H, r1 - r0, nkc, bs).sum(-1)
            mass = F.pad(mass, (0, 0, 0, nqc * bs - (r1 - r0))).view(B, H, nqc, bs, nkc).sum(3)
            chunks.append(F.pad(mass, (0, nk - nkc)))
        return torch.cat(chunks, 2)

    def _gate_target_loss(self, q: Tensor, k: Tensor, scores: Tensor, past: Tensor) -> Tensor:
        """KL(pooled dense attention || softmax gate) over past blocks (SeerAttention's gate distillation)."""
        with torch.no_grad():
            target = self._block_mass(q, k).masked_fill(~past, 0.0)
            has = target.sum(-1, keepdim=True) > 0
            target = target / target.sum(-1, keepdim=True).clamp_min(1e-12)
        logp = torch.log_softmax(scores, -1).masked_fill(~past, 0.0)
        kl = (target * (target.clamp_min(1e-12).log() - logp)).sum(-1, keepdim=True)
        return (kl * has).sum() / has.sum().clamp_min(1)

    def project_qkv(self, x: Tensor, ctx: Context) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = super().project_qkv(x, ctx)
        # the causal query summaries need every earlier query: keep them in the cache's generic store
        self._q_all = ctx.cache.append(self.layer_idx, "gate_q", q) if ctx.cache is not None else q
        return q, k, v

    def forward(self, x: Tensor, ctx: Context) -> Tensor:
        B, T, _ = x.shape
        self.aux_loss, self.last_keep = None, None
        if ctx.q_offset is None:
            return self._graph_step(x, ctx)
        train_gate = self.training and self.gate_loss > 0 and ctx.q_offset == 0
        if self._keeps_all(-(-(ctx.q_offset + T) // self.block_size)) and not train_gate:
            out = super().forward(x, ctx)                                    # sparsity 0: exactly mha
            if isinstance(ctx.cache, StaticKVCache) and ctx.key_valid is None:   # later compiled steps read it
                self._write_pool(ctx.cache, ctx.cache.keys[self.layer_idx], ctx.q_offset, ctx.q_offset + T)
            return out
        q, k, v = self.project_qkv(x, ctx)
        if ctx.cache is not None:
            k, v = ctx.cache.update(self.layer_idx, k, v)
        if ctx.key_valid is not None:
            return self._forward_rows(q, k, v, ctx, train_gate)
        offset, tk = ctx.q_offset, k.shape[2]
        if isinstance(ctx.cache, StaticKVCache):            # written once: the gate below scores this same pool
            self._write_pool(ctx.cache, k, offset, offset + T)
        if self._skips_kv(ctx, T):
            return self.merge_heads(self._attend_kept_blocks(q, k, v, ctx), B, T)
        spec = self.attn_spec(q, k, ctx)
        scores, keep, qb, past = self.gate(self._q_all, k, offset, T, self._cached_pool(ctx, k, offset + T))
        self.last_keep = keep.detach()
        if train_gate:
            self.aux_loss = self.gate_loss * self._gate_target_loss(q.detach(), k.detach(), scores, past)
        ste = self.training and self.grad == "ste"
        if self._keeps_all(keep.shape[-1]):
            z, _ = attend(q, k, v, spec, self.backend)
        elif ste or self.hook_pattern.active:
            spec.keep = self._dense_keep(keep, qb, offset, T, tk)
            _, probs = eager_attention(q, k, v, spec, need_weights=True)
            if ste:
                g = sparsemax(scores) if self.select == "sparsemax" else torch.softmax(scores, -1).nan_to_num(0.0)
                probs = probs * self._expand_blocks(keep.to(g.dtype) + g - g.detach(), qb, offset, T, tk)
            probs = self.hook_pattern(probs)
            rep = self.n_head // self.n_kv_heads
            z = torch.matmul(probs.to(v.dtype), v.repeat_interleave(rep, dim=1))
        elif use_flex(self.backend, q, ctx) and offset == 0 and self.block_size % FLEX_TILE == 0:
            spec.block_mask = block_mask_from_blocks(keep, qb, T, tk, self.block_size)
            z, _ = attend(q, k, v, spec, "flex")
        else:
            spec.keep = self._dense_keep(keep, qb, offset, T, tk)
            z, _ = attend(q, k, v, spec, self.backend)
        return self.merge_heads(z, B, T)

    def _skips_kv(self, ctx: Context, tq: int) -> bool:
        """A cached single-token step (decoding) past the first block, with nothing that needs the dense keep-mask:
        it reads only the kept key/value blocks."""
        return (tq == 1 and ctx.cache is not None and not self.training and not self.hook_pattern.active
                and ctx.q_offset >= self.block_size)

    def _kept_past_blocks(self, k: Tensor, ctx: Context) -> dict:
        """The gate's choice for the query block of this decoding step, made on the block's first decoded token (it
        depends only on tokens up to that one) and kept in the cache for the block's other tokens: ``index``
        ``(B, H * n bs)``, the kept past blocks' token slots in the cache's keys flattened over (kv head, slot)
        (rebuilt when a growing cache's capacity changes); ``keep`` ``(B, H, n bs)`` or None when every row keeps n
        blocks; ``block_keep`` the block keep-mask ``(B, H, 1, nk)``."""
        bs, j, cap = self.block_size, ctx.q_offset // self.block_size, k.shape[2]
        choice = ctx.cache.state.get((self.layer_idx, "gate_blocks"))
        if choice is None or choice["block"] != j:
            _, keep, _, _ = self.gate(self._q_all, k, ctx.q_offset, 1, self._cached_pool(ctx, k, ctx.q_offset + 1))
            H = keep.shape[1]
            past = keep[:, :, 0, :j]                                                # (B, H, j): chosen past blocks
            n = int(past.sum(-1).max())                                             # one sync per block of tokens
            blocks = past.to(torch.int8).argsort(dim=-1, descending=True, stable=True)[..., :n]   # (B, H, n)
            valid = past.gather(-1, blocks)
            choice = {"block": j, "cap": None, "block_keep": keep,
                      "slots": (blocks[..., None] * bs + torch.arange(bs, device=k.device)).flatten(2),
                      "keep": None if bool(valid.all()) else valid.repeat_interleave(bs, -1),
                      "kv_head": torch.arange(H, device=k.device) // (H // k.shape[1])}
            ctx.cache.state[(self.layer_idx, "gate_blocks")] = choice
        if choice["cap"] != cap:
            choice["index"] = _flat_slots(choice["slots"], choice["kv_head"], cap)
            choice["cap"] = cap
        return choice

    def _attend_kept_blocks(self, q: Tensor, k: Tensor, v: Tensor, ctx: Context) -> Tensor:
        """Decoding step over the kept blocks only: their keys/values are gathered from the cache (one gather each,
        indices from ``_kept_past_blocks``), the current block up to this token appended, and attended without a
        causal mask, so dropped blocks are never read."""
        H = q.shape[1]
        start, offset = ctx.q_offset // self.block_size * self.block_size, ctx.q_offset
        choice = self._kept_past_blocks(k, ctx)
        self.last_keep = choice["block_keep"]
        rep = H // k.shape[1]

        def take(x: Tensor) -> Tensor:
            past = _gather_slots(x, choice["index"], H)
            current = x[:, :, start:offset + 1]
            if rep > 1:
                current = current.index_select(1, choice["kv_head"])
            return torch.cat([past, current], 2)                                   # (B, H, n bs + t, Dh)

        keys, vals = take(k), take(v)
        spec = self.attn_spec(q, keys, ctx)
        spec.causal = False
        if choice["keep"] is not None:
            spec.keep = F.pad(choice["keep"], (0, offset + 1 - start), value=True)[:, :, None]
        z, _ = attend(q, keys, vals, spec, "sdpa" if self.backend == "flex" else self.backend)
        return z

    def _pool_buffer(self, cache: StaticKVCache, k: Tensor) -> Tensor:
        """The static cache's pooled key summaries ``(B, Hkv, n blocks, 2 Dh)`` ([mean; max] per block), in its
        per-block store: what compiled decoding scores without reading the whole key cache."""
        B, Hkv, _, Dh = k.shape
        shape = (B, Hkv, -(-cache.max_len // self.block_size), 2 * Dh)
        return cache.block_buffer(self.layer_idx, "gate_pool", shape, self.block_size, k)

    def _cached_pool(self, ctx: Context, k: Tensor, length: int) -> Tensor | None:
        """The static cache's summaries of the blocks of the first ``length`` slots (None without a static cache)."""
        if not isinstance(ctx.cache, StaticKVCache):
            return None
        return self._pool_buffer(ctx.cache, k)[:, :, :-(-length // self.block_size)]

    def _write_pool(self, cache: StaticKVCache, k: Tensor, start: int, end: int) -> None:
        """Pooled summaries of the blocks that cached slots ``[start, end)`` touch (eager calls: prefill, steps)."""
        bs = self.block_size
        j0 = start // bs
        mean, mx = _pool_blocks(k[:, :, j0 * bs:end], bs)
        self._pool_buffer(cache, k)[:, :, j0:j0 + mean.shape[2]] = torch.cat([mean, mx], -1)

    def _graph_step(self, x: Tensor, ctx: Context) -> Tensor:
        """A one-token step at a tensor position (compiled decoding, ``generate(compile=True)``: one CUDA graph per
        step), every shape fixed: the current block's pooled summary is rewritten, the gate scores every past block
        from the pooled buffer, and only the ``top_k - 1`` chosen blocks' keys and values plus the current block are
        gathered and attended to. The choice is recomputed each step from the same inputs (the block's query summary
        and complete past blocks), so it equals the choice the eager path keeps for the block."""
        B, T, _ = x.shape
        cache = ctx.cache
        if (T != 1 or not isinstance(cache, StaticKVCache) or ctx.key_valid is not None or self.select != "topk"
                or self.training or self.hook_pattern.active):
            raise ValueError("learned_gate at tensor positions (compiled decoding) needs one-token steps over a "
                             "static cache, no padding, select: topk and no attention hook")
        if self._keeps_all(-(-cache.max_len // self.block_size)):
            return super().forward(x, ctx)                                   # sparsity 0: exactly mha
        q, k, v = self.project_qkv(x, ctx)
        k, v = cache.update(self.layer_idx, k, v)
        bs, H, (_, Hkv, cap, _) = self.block_size, q.shape[1], k.shape
        dev = q.device
        p = ctx.pos.reshape(-1)[-1]
        j = torch.div(p, bs, rounding_mode="floor")
        ar = torch.arange(bs, device=dev)
        cur, cur_ok = (j * bs + ar).clamp(max=cap - 1), j * bs + ar <= p         # this block's slots up to p
        kc = k.index_select(2, cur)
        n_cur = cur_ok.sum()
        mean = (kc * cur_ok[:, None].to(kc.dtype)).sum(2) / n_cur
        mx = kc.masked_fill(~cur_ok[:, None], float("-inf")).amax(2)
        pool = self._pool_buffer(cache, k)
        pool.index_copy_(2, j.view(1), torch.cat([mean, mx], -1)[:, :, None].to(pool.dtype))
        qi = j * bs - (bs - 1) + ar                               # the bs queries ending at the block's first token
        q_ok = qi >= 0
        qs = self._q_all.index_select(2, qi.clamp(min=0)).float()
        q_sum = ((qs * q_ok[:, None]).sum(2, keepdim=True) / q_ok.sum()).to(k.dtype)        # (B, H, 1, Dh)
        scores = self._block_scores(q_sum, pool)                                     # (B, H, 1, n blocks)
        nk = scores.shape[-1]
        scores = scores.masked_fill(torch.arange(nk, device=dev) >= j, float("-inf"))
        top = scores.topk(min(self.top_k - 1, nk), dim=-1)
        blocks, ok = top.indices[:, :, 0], top.values[:, :, 0].isfinite()           # (B, H, k)
        if active_backend(self.backend) == "flex" and (bs % FLEX_TILE == 0 or dev.type != "cuda"):
            spec = self.attn_spec(q, k, ctx)
            spec.block_mask = step_block_mask(blocks, ok, j, p, cap, bs)
            z, _ = attend(q, k, v, spec, "flex")
            return self.merge_heads(z, B, T)
        slots = torch.cat([(blocks[..., None] * bs + ar).flatten(2).clamp(max=cap - 1), cur.expand(B, H, bs)], 2)
        keep = torch.cat([ok[..., None].expand(-1, -1, -1, bs).flatten(2), cur_ok.expand(B, H, bs)], 2)
        kv_head = torch.arange(H, device=dev) // (H // Hkv)
        index = _flat_slots(slots, kv_head, cap)
        keys, vals = _gather_slots(k, index, H), _gather_slots(v, index, H)
        spec = self.attn_spec(q, keys, ctx)
        spec.causal, spec.keep = False, keep[:, :, None]
        z, _ = attend(q, keys, vals, spec, "sdpa" if self.backend == "flex" else self.backend)
        return self.merge_heads(z, B, T)

    def _forward_rows(self, q: Tensor, k: Tensor, v: Tensor, ctx: Context, train_gate: bool) -> Tensor:
        """Padded / packed batches: the gate chooses blocks for each row and document alone (blocks counted
        from its first real token, as unpadded); the choices become one slot-level keep-mask for the kernel."""
        B, H, T, _ = q.shape
        tk = k.shape[2]
        keep_tok = torch.zeros(B, H, T, tk, dtype=torch.bool, device=q.device)
        ste = self.training and self.grad == "ste"
        weight = torch.ones(B, H, T, tk, device=q.device) if ste else None
        losses = []
        for b, rows, cols in segments(ctx.key_valid, ctx.key_doc, ctx.q_slots):
            n, off = len(cols), len(cols) - len(rows)
            kb = k[b:b + 1, :, cols]
            scores, keep, qb, past = self.gate(self._q_all[b:b + 1, :, cols], kb, off, len(rows))
            keep_tok[b][:, rows[:, None], cols[None, :]] = self._dense_keep(keep, qb, off, len(rows), n)[0]
            if train_gate:
                losses.append(self._gate_target_loss(q[b:b + 1, :, rows].detach(), kb.detach(), scores, past))
            if ste:
                g = sparsemax(scores) if self.select == "sparsemax" else torch.softmax(scores, -1).nan_to_num(0.0)
                w = self._expand_blocks(keep.to(g.dtype) + g - g.detach(), qb, off, len(rows), n)[0]
                weight[b][:, rows[:, None], cols[None, :]] = w.to(weight.dtype)
        if losses:
            self.aux_loss = self.gate_loss * torch.stack(losses).mean()
        spec = self.attn_spec(q, k, ctx)
        spec.keep = keep_tok
        if ste or self.hook_pattern.active:
            _, probs = eager_attention(q, k, v, spec, need_weights=True)
            probs = self.hook_pattern(probs * weight if ste else probs)
            z = torch.matmul(probs.to(v.dtype), v.repeat_interleave(self.n_head // self.n_kv_heads, dim=1))
        else:
            z, _ = attend(q, k, v, spec, self.backend)
        return self.merge_heads(z, B, T)

    def _expand_blocks(self, blocks: Tensor, qb: Tensor, offset: int, tq: int, tk: int) -> Tensor:
        """Block values ``(B, H, nq, nk)`` -> token grid ``(B, H, Tq, Tk)``."""
        qpos = torch.arange(offset, offset + tq, device=blocks.device)
        cols = (torch.arange(tk, device=blocks.device) // self.block_size).clamp_max(blocks.shape[-1] - 1)
        return blocks[:, :, qpos // self.block_size - qb[0]][..., cols]
