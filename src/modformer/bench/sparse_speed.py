"""Attention forward + backward at a given density, the learned gate's own cost included (issue 25).

Per length T (B * T = ``tokens``, random q/k/v, bf16 on CUDA): dense SDPA (``is_causal``: flash / cuDNN) against
FlexAttention whose BlockMask skips the dropped blocks, for

- ``fixed``: a sink + window pattern at the gate's density (``density.tune``), its BlockMask built once (a
  fixed pattern's mask is cached across calls);
- ``learned_gate`` (the largest top-k within the density): ``LearnedGateAttention.gate`` (pooled q/k blocks ->
  scores -> top-k) and the BlockMask built from its choice on every call, then the same flex forward + backward.
  ``gate_ms`` is the gate + mask build alone; ``speedup`` = dense / (gate + attention); ``gate_overhead`` = gate /
  attention. On CUDA the gate's scoring and block indices (``gate.block_mask_tensors``, both directions) also run
  compiled (``torch.compile``, as in a training step with ``train.compile: true``; the BlockMask object is then
  assembled from them), and that is the row's ``gate_ms``; the eager gate stays beside it (``gate_eager_ms``,
  ``gate_overhead_eager``, ``speedup_eager_gate``).

Times are wall-clock medians with the device synchronised (``time_fn``; what a training step pays, Python launch
overhead included); on CUDA the GPU kernel time is recorded too (``*_kernel_ms``). The gate's *training* loss (the
dense attention map pooled to blocks) is a distillation cost and is not part of this timing. On CPU FlexAttention has
no backward, so the sparse rows there run the dense keep-mask reference (no block skipping): CPU rows check the
plumbing, not the speed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from modformer.bench.common import cases, kernel_time, time_fn
from modformer.config import ModelConfig
from modformer.layers.attention.density import gate_density, gate_top_k, pattern_density, tune
from modformer.layers.attention.gate import LearnedGateAttention, block_mask_from_blocks, block_mask_tensors
from modformer.layers.attention.kernels import AttnSpec, attend, eager_attention, flex_compile_mode
from modformer.layers.attention.sparse import PATTERNS, pattern_block_mask


def _fwd_bwd(attn: Any, q: Tensor, k: Tensor, v: Tensor, grad: Tensor) -> None:
    out = attn(q, k, v)
    torch.autograd.grad(out, (q, k, v), grad)


def make_gate(heads: int, head_dim: int, block: int, top_k: int, device: torch.device,
              dtype: torch.dtype) -> LearnedGateAttention:
    """A learned-gate attention layer of the timed shape (only its gate runs here)."""
    cfg = ModelConfig(vocab_size=8, n_layer=1, n_head=heads, d_model=heads * head_dim, max_seq_len=8)
    layer = LearnedGateAttention(cfg, 0, block_size=block, top_k=top_k)
    return layer.to(device=device, dtype=dtype)


def fwd_bwd_speed(seqs: list[int], densities: list[float], device: torch.device, heads: int = 16,
                  head_dim: int = 64, block: int = 128, tokens: int = 65536, iters: int = 10,
                  compile_gate: bool | None = None, flex_modes: Sequence[str] = ("default",)) -> list[dict[str, Any]]:
    """Two rows per T and flex compile mode (sink + window, learned gate): dense SDPA vs block-sparse flex forward +
    backward at ``densities[i]`` for ``seqs[i]`` (see the module doc). ``compile_gate`` (default: on CUDA) also
    times the gate compiled and makes that the row's ``gate_ms``. ``flex_modes``: ``kernels.flex_compile_mode``
    values (``max-autotune-no-cudagraphs`` autotunes the flex kernels); each row records its ``flex_mode``."""
    if compile_gate is None:
        compile_gate = device.type == "cuda"
    rows: list[dict[str, Any]] = []
    for t, dens, mode in cases([(t, d, m) for t, d in zip(seqs, densities) for m in flex_modes], "sparse-speed",
                               lambda s: f"next: T {s[0]}, density {s[1]:g}, flex {s[2]}"):
        with flex_compile_mode(mode):
            for row in _rows_at(t, dens, device, heads, head_dim, block, tokens, iters, compile_gate):
                row["flex_mode"] = mode
                print(f"  fwd+bwd T={t} {row['mask']}: {row}", flush=True)
                rows.append(row)
    return rows


def _rows_at(t: int, dens: float, device: torch.device, heads: int, head_dim: int, block: int, tokens: int,
             iters: int, compile_gate: bool) -> list[dict[str, Any]]:
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    b = max(1, tokens // t)
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v, grad = (torch.randn(b, heads, t, head_dim, device=device, dtype=dtype, generator=g) for _ in range(4))
    q, k, v = q.requires_grad_(), k.requires_grad_(), v.requires_grad_()

    def timed(fn: Any) -> tuple[float, float | None]:
        wall = time_fn(fn, device, 3, iters)
        return wall * 1e3, (kernel_time(fn, 3, iters) * 1e3 if cuda else None)

    def dense_attn(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    dense_ms, dense_k = timed(lambda: _fwd_bwd(dense_attn, q, k, v, grad))
    top_k = gate_top_k(t, block, dens)                     # the densest gate within the density, and the fixed
    opts = tune("sink", t, gate_density(t, block, top_k))  # pattern at the gate's exact density
    pos = torch.arange(t, device=device)
    fixed_keep = None if cuda else PATTERNS["sink_window"][0](pos[:, None], pos[None, :], opts["sinks"],
                                                              opts["window"])

    def fixed_attn(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if cuda:
            bm = pattern_block_mask("sink_window", (opts["sinks"], opts["window"]), t, t, 0, str(device), block)
            return attend(q, k, v, AttnSpec(block_mask=bm), "flex")[0]
        return eager_attention(q, k, v, AttnSpec(keep=fixed_keep))[0]

    fixed_ms, fixed_k = timed(lambda: _fwd_bwd(fixed_attn, q, k, v, grad))
    rows = [{"T": t, "batch": b, "mask": f"sink{opts['sinks']}_window{opts['window']}",
             "density": pattern_density("sink_window", opts, t), "dense_sdpa_ms": dense_ms, "sparse_ms": fixed_ms,
             "gate_ms": 0.0, "speedup": dense_ms / fixed_ms, "dense_sdpa_kernel_ms": dense_k,
             "sparse_kernel_ms": fixed_k, "speedup_kernel": dense_k / fixed_k if cuda else None,
             "block_skipping": cuda}]

    gate = make_gate(heads, head_dim, block, top_k, device, dtype)
    qd, kd = q.detach(), k.detach()

    def gate_parts(qd: Tensor, kd: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        _, keep, qb, _ = gate.gate(qd, kd, 0, t)
        return keep, qb, block_mask_tensors(keep, qb)

    def gate_fn(parts_fn: Any = gate_parts) -> object:
        with torch.no_grad():
            keep, qb, parts = parts_fn(qd, kd)
        if cuda:
            return block_mask_from_blocks(keep, qb, t, t, block, parts=parts)
        return gate._dense_keep(keep, qb, 0, t, t)

    mask = gate_fn()

    def gated_attn(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if cuda:
            return attend(q, k, v, AttnSpec(block_mask=mask), "flex")[0]
        return eager_attention(q, k, v, AttnSpec(keep=mask))[0]

    eager_ms, eager_k = timed(gate_fn)
    attn_ms, attn_k = timed(lambda: _fwd_bwd(gated_attn, q, k, v, grad))
    row = {"T": t, "batch": b, "mask": "learned_gate", "top_k": top_k, "density": gate_density(t, block, top_k),
           "dense_sdpa_ms": dense_ms, "sparse_ms": attn_ms, "gate_eager_ms": eager_ms,
           "gate_overhead_eager": eager_ms / attn_ms, "dense_sdpa_kernel_ms": dense_k, "sparse_kernel_ms": attn_k,
           "gate_eager_kernel_ms": eager_k, "block_skipping": cuda, "gate_compiled": compile_gate}
    gate_ms, gate_k = eager_ms, eager_k
    if compile_gate:                     # as a compiled training step runs it (train.compile: true)
        compiled = torch.compile(gate_parts, dynamic=False)
        gate_ms, gate_k = timed(lambda: gate_fn(compiled))
    row.update({"gate_ms": gate_ms, "gate_kernel_ms": gate_k, "gate_overhead": gate_ms / attn_ms,
                "speedup": dense_ms / (gate_ms + attn_ms), "speedup_eager_gate": dense_ms / (eager_ms + attn_ms),
                "speedup_kernel": dense_k / (attn_k + gate_k) if cuda else None})
    rows.append(row)
    return rows
