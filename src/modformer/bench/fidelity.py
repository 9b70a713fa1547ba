"""Fidelity and efficiency of a student (sparse / linear attention) against its dense teacher.

Metric functions (hand-checked in tests/test_sparse.py):
``next_token_kl`` KL(P_teacher || P_student) per token, ``top1_agreement``, ``accuracy``, ``ppl_retention``
(teacher ppl / student ppl, 1 = no loss), ``attn_prob_mse`` (squared error of attention probabilities on
the entries the student keeps), ``grad_cosine`` (cosine of the attention layers' weight gradients of the
LM loss, student vs teacher), ``peak_memory`` (``torch.cuda.max_memory_allocated``; None on CPU),
``attention_speed`` (attention forward alone, dense flash SDPA vs FlexAttention with a block-sparse mask,
timed with CUDA events), ``edge_cases`` (all-padding, one repeated token, T not a multiple of the block
size) and ``generations`` (greedy continuations side by side).

``modformer bench fidelity --teacher PATH --student RUN_DIR [RUN_DIR ...]`` evaluates distilled students
(``modformer distill`` run folders) and writes ``OUT/sparse_fidelity.json``;
``modformer bench sparse-fidelity`` runs the whole pipeline (teacher, distillation, this suite).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modformer.bench.common import DEFAULT_OUT, cases, kernel_time, print_table, time_fn, write_result
from modformer.cli import HelpFormatter
from modformer.layers.hooks import HookPoint


# ---- metric functions ----------------------------------------------------------------------
def next_token_kl(teacher_logits: Tensor, student_logits: Tensor, temperature: float = 1.0,
                  mask: Tensor | None = None) -> Tensor:
    """Mean over tokens (those with ``mask``) of KL(softmax(t / T) || softmax(s / T)), in nats."""
    t = F.log_softmax(teacher_logits.float() / temperature, -1)
    s = F.log_softmax(student_logits.float() / temperature, -1)
    kl = (t.exp() * (t - s)).sum(-1)
    if mask is None:
        return kl.mean()
    mask = mask.float()
    return (kl * mask).sum() / mask.sum().clamp_min(1)


def top1_agreement(teacher_logits: Tensor, student_logits: Tensor) -> float:
    """Fraction of positions where both models' most likely next token is the same."""
    return float((teacher_logits.argmax(-1) == student_logits.argmax(-1)).float().mean())


def accuracy(logits: Tensor, targets: Tensor) -> float:
    """Top-1 next-token accuracy over targets != -100."""
    mask = targets != -100
    return float(((logits.argmax(-1) == targets) & mask).sum() / mask.sum().clamp_min(1))


def ppl_retention(teacher_ppl: float, student_ppl: float) -> float:
    """teacher ppl / student ppl: 1.0 = the student is as good, 0.95 = 5% worse ppl."""
    return teacher_ppl / student_ppl


def attn_prob_mse(teacher_probs: Tensor, student_probs: Tensor, keep: Tensor | None = None) -> float:
    """Mean squared difference of attention probabilities over the kept entries (default: student > 0)."""
    keep = student_probs > 0 if keep is None else keep
    keep = keep.expand_as(student_probs)
    diff = (teacher_probs.float() - student_probs.float())[keep]
    return float((diff ** 2).mean()) if diff.numel() else 0.0


def attn_prob_mse_all(teacher_probs: Tensor, student_probs: Tensor) -> float:
    """Mean squared difference of attention probabilities over *every* causal pair (key <= query): a pair the
    student drops counts with the teacher's whole probability (issue 25's attention MSE)."""
    t = teacher_probs.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=teacher_probs.device).tril()
    diff = (teacher_probs.float() - student_probs.float()).expand(*teacher_probs.shape[:-2], t, t)
    return float((diff ** 2)[..., causal].mean())


def kept_mass(teacher_probs: Tensor, student_probs: Tensor) -> float:
    """Mean over query rows of the teacher's attention mass on the pairs the student keeps (1 = nothing lost)."""
    return float((teacher_probs.float() * (student_probs > 0)).sum(-1).mean())


def peak_memory(fn: Callable[[], Any], device: torch.device) -> int | None:
    """Peak CUDA bytes allocated while ``fn()`` runs (None on CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def saved_for_backward(model: nn.Module, forward: Callable[[], Any]) -> dict[str, int]:
    """Bytes of the tensors autograd saves for the backward pass while ``forward()`` runs, by where they were saved:
    ``attention_core`` (in the forward of a module named ``attn`` / ``*.attn`` itself: the attention kernel's
    inputs and outputs, rotations, masks, a gate), ``attention_projections`` (in its submodules: q/k/v/out
    projections, q/k norms), ``other_modules`` (any other module of ``model``), ``outside`` (outside its modules:
    the loss), plus ``trainable_params`` (the bytes their gradients will take). Each storage counts once, for the
    first module that saves it; the parameters themselves are not counted.

    Device-independent: it bounds the share of a training step's memory that a sparse attention kernel can change."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    where: list[str] = []
    seen: dict[int, tuple[str, int]] = {}

    def is_attn(name: str) -> bool:
        return name == "attn" or name.endswith(".attn")

    def group() -> str:
        if not where:
            return "outside"
        if is_attn(where[-1]):
            return "attention_core"
        return "attention_projections" if any(map(is_attn, where)) else "other_modules"

    def pack(t: Tensor) -> Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in seen:
            seen[ptr] = (group(), t.untyped_storage().nbytes())
        return t

    def leave(*_: Any) -> None:             # a forward hook must return None (a value replaces the output)
        where.pop()

    hooks = []
    for name, module in model.named_modules():
        if name and not isinstance(module, HookPoint):    # a hooked HookPoint turns on eager attention patterns
            hooks.append(module.register_forward_pre_hook(lambda *_, n=name: where.append(n)))
            hooks.append(module.register_forward_hook(leave))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            forward()
    finally:
        for h in hooks:
            h.remove()
    out = dict.fromkeys(("attention_core", "attention_projections", "other_modules", "outside"), 0)
    for g, nbytes in seen.values():
        out[g] += nbytes
    out["trainable_params"] = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return out


def _attn_grads(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    names = [n for n, _ in model.named_parameters() if ".attn." in n and n.endswith(("qkv.weight", "out.weight"))]
    params = dict(model.named_parameters())
    flags = {n: params[n].requires_grad for n in names}
    for n in names:
        params[n].requires_grad_(True)
    try:
        loss = F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten(), ignore_index=-100)
        grads = torch.autograd.grad(loss, [params[n] for n in names])
    finally:
        for n, f in flags.items():
            params[n].requires_grad_(f)
    return dict(zip(names, grads))


def grad_cosine(teacher: nn.Module, student: nn.Module, x: Tensor, y: Tensor) -> float:
    """Cosine similarity of the LM loss's gradients w.r.t. the attention projections (qkv, out), all layers."""
    gt, gs = _attn_grads(teacher, x, y), _attn_grads(student, x, y)
    common = [n for n in gt if n in gs]
    a = torch.cat([gt[n].flatten().float() for n in common])
    b = torch.cat([gs[n].flatten().float() for n in common])
    return float(F.cosine_similarity(a, b, dim=0))


def attention_patterns(model: nn.Module, x: Tensor) -> dict[str, Tensor]:
    """``{layer: probs (B, H, T, T)}`` through ``hook_pattern`` (eager; absent for performer)."""
    _, cache = model.run_with_cache(x, names_filter=lambda n: n.endswith("hook_pattern"))
    return cache


# ---- model-level comparisons ---------------------------------------------------------------
@torch.no_grad()
def compare_models(teacher: nn.Module, student: nn.Module,
                   batches: Iterable[tuple[Tensor, Tensor]]) -> dict[str, float]:
    """KL, top-1 agreement, ppl and accuracy of both models (and retention) over ``batches``."""
    was = student.training
    student.eval()
    device = next(student.parameters()).device
    kl = agree = nll_t = nll_s = corr_t = corr_s = 0.0
    n = 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        lt, ls = teacher(x).float(), student(x).float()
        mask = y != -100
        m = int(mask.sum())
        kl += float(next_token_kl(lt, ls, mask=mask)) * m
        agree += float(((lt.argmax(-1) == ls.argmax(-1)) & mask).sum())
        nll_t += float(F.cross_entropy(lt.flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum"))
        nll_s += float(F.cross_entropy(ls.flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum"))
        corr_t += accuracy(lt, y) * m
        corr_s += accuracy(ls, y) * m
        n += m
    student.train(was)
    n = max(n, 1)
    ppl_t, ppl_s = math.exp(min(nll_t / n, 700)), math.exp(min(nll_s / n, 700))
    return {"kl": kl / n, "top1_agree": agree / n, "ppl": ppl_s, "teacher_ppl": ppl_t,
            "ppl_retention": ppl_retention(ppl_t, ppl_s), "acc": corr_s / n, "teacher_acc": corr_t / n,
            "acc_retention": (corr_s / corr_t) if corr_t else 1.0}


def pattern_fidelity(teacher: nn.Module, student: nn.Module, x: Tensor) -> dict[str, float | None]:
    """Attention-probability MSE on the kept entries (``attn_mse``) and on all causal pairs (``attn_mse_all``),
    the teacher's mass on the kept pairs (``kept_mass``) and the kept fraction of causal pairs (``density``).
    Long rows are measured on fewer sequences (8 x 1024^2 pairs at most: every layer's maps are held at once)."""
    x = x[: max(1, min(x.shape[0], 8 * 1024 ** 2 // x.shape[1] ** 2))]
    was = student.training
    student.eval()
    with torch.no_grad():
        pt, ps = attention_patterns(teacher, x), attention_patterns(student, x)
    student.train(was)
    if not ps:
        return {"attn_mse": None, "attn_mse_all": None, "kept_mass": None, "density": None}
    mse, mse_all, mass, kept, causal = [], [], [], 0, 0
    for name, p in ps.items():
        mse.append(attn_prob_mse(pt[name], p))
        mse_all.append(attn_prob_mse_all(pt[name], p))
        mass.append(kept_mass(pt[name], p))
        T = p.shape[-1]
        kept += int((p > 0).sum())
        causal += p.shape[0] * p.shape[1] * T * (T + 1) // 2
    n = len(mse)
    return {"attn_mse": sum(mse) / n, "attn_mse_all": sum(mse_all) / n, "kept_mass": sum(mass) / n,
            "density": kept / max(causal, 1)}


def edge_cases(teacher: nn.Module, student: nn.Module, vocab: int, seq_len: int, block: int = 64,
               pad_id: int = 0) -> list[dict[str, Any]]:
    """KL and finiteness on degenerate inputs: all padding, one repeated token, T not a multiple of block."""
    device = next(student.parameters()).device
    g = torch.Generator().manual_seed(0)
    t_odd = min(seq_len, max(block + 7, (seq_len // block) * block - block + 7))
    cases = {"all_padding": torch.full((2, seq_len), pad_id),
             "repeated_token": torch.full((2, seq_len), min(5, vocab - 1)),
             f"T={t_odd}_not_multiple_of_{block}": torch.randint(0, vocab, (2, t_odd), generator=g)}
    rows = []
    student.eval()
    with torch.no_grad():
        for name, x in cases.items():
            x = x.to(device)
            lt, ls = teacher(x).float(), student(x).float()
            rows.append({"case": name, "T": x.shape[1], "finite": bool(torch.isfinite(ls).all()),
                         "kl": float(next_token_kl(lt, ls)), "top1_agree": top1_agreement(lt, ls)})
    return rows


def generations(teacher: nn.Module, student: nn.Module, data: Any, prompts: list[str],
                max_new_tokens: int = 30) -> list[dict[str, str]]:
    """Greedy continuations of each prompt by teacher and student."""
    device = next(student.parameters()).device
    out = []
    student.eval()
    for prompt in prompts:
        ids = torch.tensor([data.encode(prompt)], device=device)
        row = {"prompt": prompt}
        for who, model in (("teacher", teacher), ("student", student)):
            gen = model.generate(ids, max_new_tokens, temperature=0.0)
            row[who] = data.decode(gen[0, ids.shape[1]:].tolist())
        out.append(row)
    return out


# ---- attention timing ----------------------------------------------------------------------
def sparse_block_masks(t: int, density: float, block: int, device: str,
                       student_windows: tuple[int, ...] = ()) -> dict[str, object]:
    """BlockMasks keeping about ``density`` of the causal blocks: sink + window, and random top-k blocks; plus,
    for each ``w`` in ``student_windows``, the fixed layout of a distilled student (4 sinks + a ``w``-token
    window), whose density falls with T (so its KL at T=1024 and its speed at 16k are one module's)."""
    from modformer.layers.attention.gate import block_mask_from_blocks
    from modformer.layers.attention.sparse import pattern_block_mask

    nb = -(-t // block)
    causal_blocks = nb * (nb + 1) / 2
    per_row = max(1, round(density * causal_blocks / nb))
    masks = {"sink_window": pattern_block_mask("sink_window", (block, max(1, per_row - 1) * block), t, t, 0,
                                               device, block)}
    g = torch.Generator(device=device).manual_seed(0)
    scores = torch.rand(1, 1, nb, nb, generator=g, device=device)
    qb = torch.arange(nb, device=device)
    past = qb[None, :] < qb[:, None]
    keep = torch.zeros(1, 1, nb, nb, dtype=torch.bool, device=device)
    if per_row > 1:
        keep.scatter_(-1, scores.masked_fill(~past, -1.0).topk(min(per_row - 1, nb), -1).indices, True)
    keep = (keep & past) | (qb[None, :] == qb[:, None])
    masks["learned_gate_topk"] = block_mask_from_blocks(keep, qb, t, t, block)
    for w in student_windows:
        masks[f"sink4_window{w}"] = pattern_block_mask("sink_window", (4, w), t, t, 0, device, block)
    return masks


def attention_speed(seqs: list[int], device: torch.device, heads: int = 16, head_dim: int = 64,
                    density: float = 0.1, block: int = 128, iters: int = 20,
                    tokens: int = 65536, student_windows: tuple[int, ...] = ()) -> list[dict[str, Any]]:
    """Attention forward time (bf16, B*T = ``tokens``): dense flash SDPA (causal) vs flex with block-sparse
    masks. ``speedup`` uses GPU kernel time (torch.profiler), which isolates the attention kernels from the
    Python/launch overhead that dominates sub-millisecond calls; ``speedup_wall`` uses wall time."""
    from modformer.layers.attention.kernels import AttnSpec, attend

    rows = []
    for t in cases(seqs, "sparse-attention", lambda t: f"next: T {t}"):
        b = max(1, tokens // t)
        qkv = [torch.randn(b, heads, t, head_dim, device=device, dtype=torch.bfloat16) for _ in range(3)]
        with torch.no_grad():
            def dense_fn(qkv=qkv) -> Tensor:
                return F.scaled_dot_product_attention(*qkv, is_causal=True)

            dense, dense_k = time_fn(dense_fn, device, 3, iters), kernel_time(dense_fn, 3, iters)
            for name, bm in sparse_block_masks(t, density, block, str(device), student_windows).items():
                try:
                    spec = AttnSpec(block_mask=bm)

                    def flex_fn(spec=spec, qkv=qkv) -> Tensor:
                        return attend(*qkv, spec, "flex")[0]

                    sec, sec_k = time_fn(flex_fn, device, 3, iters), kernel_time(flex_fn, 3, iters)
                    blocks = bm.to_dense()[0, 0].float()
                    kept = float(blocks.sum()) / (blocks.shape[-1] * (blocks.shape[-1] + 1) / 2)
                    rows.append({"T": t, "batch": b, "mask": name, "block_density": kept,
                                 "dense_sdpa_ms": dense_k * 1e3, "flex_ms": sec_k * 1e3, "speedup": dense_k / sec_k,
                                 "dense_sdpa_wall_ms": dense * 1e3, "flex_wall_ms": sec * 1e3,
                                 "speedup_wall": dense / sec})
                except Exception as e:  # noqa: BLE001 - one failing shape must not end the sweep
                    rows.append({"T": t, "mask": name, "error": f"{type(e).__name__}: {e}"[:300]})
                print(f"  attention T={t} {name}: {rows[-1]}", flush=True)
        del qkv
    return rows


def suite(teacher: nn.Module, student: nn.Module, data: Any, batch_size: int = 8, eval_batches: int = 8,
          block: int = 64) -> dict[str, Any]:
    """Every per-model metric of one student: compare_models, pattern fidelity, grad cosine, edge cases."""
    device = next(student.parameters()).device
    student.eval()                  # e.g. no learned-gate aux loss while measuring
    row: dict[str, Any] = dict(compare_models(teacher, student, data.iter_eval("val", batch_size, eval_batches)))
    x, y = next(iter(data.iter_eval("val", batch_size, 1)))      # the eval batch shape: no new flex compile
    x, y = x.to(device), y.to(device)
    row.update(pattern_fidelity(teacher, student, x))
    row["grad_cos"] = grad_cosine(teacher, student, x, y)
    row["edge_cases"] = edge_cases(teacher, student, data.vocab_size, x.shape[1], block)
    return row


def main(argv: list[str] | None = None) -> int:
    from modformer.compress.distill import load_teacher
    from modformer.data import build_dataset
    from modformer.runs import run_config, run_model

    p = argparse.ArgumentParser(prog="modformer bench fidelity", description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter,
                                epilog=("examples:\n"
                                        "  modformer bench fidelity --teacher runs/teacher_hf --student runs/sparse_w"))
    p.add_argument("--teacher", required=True, help="run dir, saved model, or HF folder / hub name (any family)")
    p.add_argument("--student", nargs="+", required=True, help="modformer distill run folders")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per evaluation batch")
    p.add_argument("--eval-batches", type=int, default=8, help="evaluation batches")
    p.add_argument("--seq", type=int, nargs="*", default=[], help="attention timing lengths (CUDA only)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="device: cpu, cuda, cuda:N")
    p.add_argument("--out", default=DEFAULT_OUT, help="result folder (benchmarks/results: the committed answer)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    teacher, _ = load_teacher(args.teacher, device)
    teacher.eval()
    rows = []
    for run in cases(args.student, "fidelity", lambda r: f"next: {r}"):
        student = run_model(run, device).eval()
        data = build_dataset(run_config(run).data)
        row = {"student": run, "attention": student.cfg.attention, **suite(teacher, student, data, args.batch_size,
                                                                          args.eval_batches)}
        rows.append(row)
    timing = attention_speed(args.seq, device) if args.seq and device.type == "cuda" else []
    print_table(rows, ["attention", "kl", "top1_agree", "ppl", "teacher_ppl", "ppl_retention", "attn_mse",
                       "grad_cos", "density"])
    headline = headline_of(rows, timing, [])
    print(f"wrote {write_result('sparse_fidelity', headline, rows + timing, device, args.out)}")
    return 0


def headline_of(rows: list[dict[str, Any]], timing: list[dict[str, Any]], memory: list[dict[str, Any]],
                speed: list[dict[str, Any]] | None = None, seq_len: int | None = None) -> dict[str, Any]:
    """The DESIGN.md headline. Issue 25's keys describe the headline student: the learned gate when one was
    measured (else the lowest-KL student): ``seq_len``, ``density``, ``kl``, ``attn_mse`` (all causal pairs),
    ``grad_cos``, ``peak_mem_reduction_vs_sdpa`` (its training step vs the dense SDPA teacher),
    ``kl_ratio_vs_best_fixed`` (its KL / the lowest KL of the fixed patterns), ``attn_fwd_bwd_speedup_4k`` /
    ``_16k`` (gate + block-sparse flex forward+backward vs dense SDPA, ``speed`` rows) and ``gate_overhead`` (the
    gate's time / the sparse attention's, at the longest timed T; the compiled gate where ``gate_compiled``, with the
    eager gate's ``gate_overhead_eager`` and 16k speed-up beside it). Earlier keys stay: the lowest-KL student's
    figures, the largest training peak-memory reduction vs eager and the 16k forward speed-ups."""
    from modformer.layers.attention.sparse import PATTERNS

    ok = [r for r in rows if r.get("kl") is not None]
    best = min(ok, key=lambda r: r["kl"]) if ok else {}
    gates = [r for r in ok if r.get("attention") == "learned_gate"]
    fixed = [r for r in ok if r.get("attention") in PATTERNS]
    head = min(gates, key=lambda r: r["kl"]) if gates else best
    best_fixed = min(fixed, key=lambda r: r["kl"]) if fixed else None
    at16k = [r["speedup"] for r in timing if r.get("T") == 16384 and "speedup" in r]
    student16k = [r["speedup"] for r in timing if r.get("T") == 16384 and "speedup" in r
                  and str(r.get("mask", "")).startswith("sink4_window")]      # a distilled student's own mask
    mem = [r["peak_mem_reduction"] for r in memory if r.get("peak_mem_reduction") is not None]
    head_mem = [r.get("train_reduction_vs_sdpa") for r in memory if r.get("method") == head.get("method")]
    mses = [r["attn_mse"] for r in ok if r.get("attn_mse") is not None]     # performer has no pattern
    gate_speed: dict[int, dict] = {}               # per T the fastest row (of several flex compile modes)
    for r in speed or []:
        if r.get("mask") == "learned_gate" and r.get("speedup", -1.0) > gate_speed.get(r["T"], {}).get("speedup", -1.0):
            gate_speed[r["T"]] = r
    longest = gate_speed[max(gate_speed)] if gate_speed else {}
    return {"seq_len": seq_len, "method": head.get("method", head.get("attention")), "density": head.get("density"),
            "kl": head.get("kl"), "attn_mse": head.get("attn_mse_all"), "attn_mse_kept": head.get("attn_mse"),
            "grad_cos": head.get("grad_cos"), "ppl_retention": head.get("ppl_retention"),
            "peak_mem_reduction_vs_sdpa": head_mem[0] if head_mem else None,
            "best_fixed_method": best_fixed.get("method") if best_fixed else None,
            "kl_best_fixed": best_fixed["kl"] if best_fixed else None,
            "kl_ratio_vs_best_fixed": head["kl"] / best_fixed["kl"] if gates and best_fixed else None,
            "attn_fwd_bwd_speedup_4k": gate_speed.get(4096, {}).get("speedup"),
            "attn_fwd_bwd_speedup_16k": gate_speed.get(16384, {}).get("speedup"),
            "gate_overhead": longest.get("gate_overhead"), "gate_compiled": longest.get("gate_compiled"),
            "gate_overhead_eager": longest.get("gate_overhead_eager"),
            "attn_fwd_bwd_speedup_16k_eager_gate": gate_speed.get(16384, {}).get("speedup_eager_gate"),
            "lowest_kl": best.get("kl"), "lowest_kl_method": best.get("method", best.get("attention")),
            "attn_mse_kept_min": min(mses) if mses else None,
            "peak_mem_reduction": max(mem) if mem else None, "attn_speedup_16k": max(at16k) if at16k else None,
            "attn_speedup_16k_student": max(student16k) if student16k else None}
