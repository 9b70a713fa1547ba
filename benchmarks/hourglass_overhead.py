"""Hourglass vs GPT host overhead (issue 6), CPU: aten ops dispatched per training step and graph breaks.

Counts every aten op dispatched (``TorchDispatchMode``) in one forward + backward of the cross-entropy loss
for ``configs/hourglass_shakespeare.yaml`` and its equal-parameter GPT (``configs/hourglass_shakespeare_gpt.yaml``)
at the configs' model sizes on a small batch, lists the ops whose counts differ, and runs
``torch._dynamo.explain`` on the training step (loss + backward) for the graph count and graph breaks.
These are CPU dispatch counts, a proxy for GPU kernel launches and host overhead, not GPU timings.

    python benchmarks/hourglass_overhead.py                      # 1 x 2048, dropout as configured
    python benchmarks/hourglass_overhead.py --batch 2 --seq-len 512 --no-explain --out /tmp/o.json
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from modformer.config import load_config
from modformer.saving import build_model

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"gpt": "hourglass_shakespeare_gpt", "hourglass": "hourglass_shakespeare"}
# ops that only make a view (no kernel on a GPU); the rest are "kernel ops"
VIEW_OPS = {"view", "_unsafe_view", "t", "transpose", "permute", "expand", "slice", "select", "unsqueeze", "squeeze",
            "detach", "alias", "unbind", "split", "split_with_sizes", "as_strided", "_reshape_alias", "reshape",
            "chunk", "narrow", "view_as", "unfold"}


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.counts[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def build(name: str, vocab: int) -> torch.nn.Module:
    cfg = load_config(ROOT / "configs" / f"{CONFIGS[name]}.yaml").model
    cfg.vocab_size = vocab
    torch.manual_seed(0)
    return build_model(cfg).train()


def step(model: torch.nn.Module, idx: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    loss = model.loss(idx, tgt)
    loss.backward()
    return loss


def count_ops(model: torch.nn.Module, idx: torch.Tensor, tgt: torch.Tensor) -> collections.Counter:
    step(model, idx, tgt)                                  # warm-up (lazy caches)
    model.zero_grad(set_to_none=True)
    with OpCounter() as c:
        step(model, idx, tgt)
    model.zero_grad(set_to_none=True)
    return c.counts


def time_step(model: torch.nn.Module, idx: torch.Tensor, tgt: torch.Tensor, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step(model, idx, tgt)
        times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    return sorted(times)[len(times) // 2]


def explain(model: torch.nn.Module, idx: torch.Tensor, tgt: torch.Tensor) -> dict:
    import torch._dynamo

    torch._dynamo.reset()
    out = torch._dynamo.explain(lambda i, t: model.loss(i, t))(idx, tgt)
    reasons = [str(b.reason).splitlines()[0] for b in out.break_reasons]
    return {"graphs": out.graph_count, "graph_breaks": out.graph_break_count, "break_reasons": reasons}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=65)
    ap.add_argument("--reps", type=int, default=3, help="timed steps (median; CPU, one thread)")
    ap.add_argument("--no-explain", action="store_true")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=g)
    tgt = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=g)
    result: dict = {"batch": args.batch, "seq_len": args.seq_len, "threads": 1, "models": {}}
    counts = {}
    for name in CONFIGS:
        model = build(name, args.vocab)
        counts[name] = count_ops(model, idx, tgt)
        row = {"aten_ops": sum(counts[name].values()),
               "kernel_ops": sum(v for k, v in counts[name].items() if k not in VIEW_OPS),
               "cpu_step_s": time_step(model, idx, tgt, args.reps)}
        if not args.no_explain:
            row.update(explain(model, idx, tgt))
        result["models"][name] = row
        print(name, {k: v for k, v in row.items() if k != "break_reasons"}, flush=True)
        for r in row.get("break_reasons", []):
            print("   break:", r)
    diff = {op: (counts["gpt"][op], counts["hourglass"][op]) for op in set(counts["gpt"]) | set(counts["hourglass"])
            if counts["gpt"][op] != counts["hourglass"][op]}
    result["op_diff_gpt_hourglass"] = dict(sorted(diff.items(), key=lambda kv: kv[1][0] - kv[1][1]))
    result["hourglass_ops"] = dict(counts["hourglass"].most_common())
    print(f"{'op (* = view)':40s} {'gpt':>6s} {'hourglass':>9s}")
    for op, (a, b) in result["op_diff_gpt_hourglass"].items():
        print(f"{op + (' *' if op in VIEW_OPS else ''):40s} {a:6d} {b:9d}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
