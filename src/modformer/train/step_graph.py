"""``train.cuda_graph``: the whole training step as one CUDA graph.

A small model's eager step is launch-bound: the speedrun config (10.7M parameters) dispatches well over a thousand
kernels a step (forward, backward, gradient clipping, Muon and AdamW), each costing the host more than the GPU.
``StepGraph`` runs the step body (every micro-batch's forward and backward, clipping, the optimizer step) eagerly
for ``warmup`` steps, which are real training steps, then captures it once with ``torch.cuda.graph`` and from then
on copies each batch into the captured input buffers and replays: one launch a step. This is PyTorch's documented
whole-network capture (CUDA semantics, "CUDA Graphs"), with what changes between steps kept in device tensors the
graph reads: the batch, the learning rate of every parameter group (written in place; the optimizers take tensor
learning rates) and the loss scale (1 / the batch's target count). Dropout draws fresh numbers on every replay (the
capture registers the CUDA generator).

What the captured step needs, checked by ``check_graphable``: an optimizer whose step reads its learning rate on
the device (``adamw``, or ``muon`` with ``muon_grouped``), no gradient filter, pruning, float16 loss scaling or FP8,
no torch.compile mode that makes its own CUDA graphs, and batches of one shape. Without a CUDA device, or with
several processes (torchrun), the trainer says so in one line and runs the step eagerly (``eager_fallback``), so a
shipped GPU config still runs on a laptop or under torchrun.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from modformer.config import TrainConfig
from modformer.registry import ConfigError

Batch = tuple[Tensor, Tensor]
StepBody = Callable[[Sequence[Batch], Tensor], tuple[Tensor, ...]]

COMPILE_MODES_WITHOUT_CUDA_GRAPHS = ("default", "max-autotune-no-cudagraphs")   # also compile_scope=blocks' rule


def eager_fallback(device: torch.device, world_size: int) -> str | None:
    """Why a ``train.cuda_graph`` run takes the eager step on this machine, or None: a shipped GPU config still runs
    on a CPU or under torchrun (the trainer prints the reason in one line)."""
    if device.type != "cuda":
        return f"no CUDA device ({device})"
    if world_size > 1:
        return f"{world_size} processes (the graph captures one; under torchrun try train.compile_mode=reduce-overhead)"
    return None


def check_graphable(t: TrainConfig) -> None:
    """ConfigError naming the first setting that keeps ``train.cuda_graph`` from capturing the step."""
    if not t.cuda_graph:
        return
    grouped = t.optimizer_options.get("muon_grouped", False) is True
    reasons = [
        (t.optimizer not in ("adamw", "muon") or (t.optimizer == "muon" and not grouped),
         f"needs an optimizer that reads its learning rate on the device: adamw, or muon with "
         f"optimizer_options.muon_grouped: true (got {t.optimizer}"
         f"{' without muon_grouped' if t.optimizer == 'muon' else ''})"),
        (t.compile and t.compile_mode not in COMPILE_MODES_WITHOUT_CUDA_GRAPHS,
         f"captures the step itself; use compile_mode {' or '.join(COMPILE_MODES_WITHOUT_CUDA_GRAPHS)}, "
         f"not {t.compile_mode!r}"),
        (t.dtype == "float16", "does not capture float16 loss scaling; use dtype bfloat16"),
        (t.precision.startswith("fp8"), f"is not supported with precision {t.precision} yet"),
        (bool(t.prune), "is not supported with train.prune (the masks change between steps)"),
        (bool(t.optimizer_options.get("grokfast")), "is not supported with a grokfast gradient filter"),
    ]
    for failed, why in reasons:
        if failed:
            raise ConfigError(f"train.cuda_graph {why}")


class StepGraph:
    """``body(micro_batches, loss_scale) -> output tensors`` run eagerly for ``warmup`` steps, then captured as a
    CUDA graph and replayed (module doc). ``body`` must not sync with the host, must leave the gradients for the
    next call to overwrite (the caller zeroes nothing) and must return tensors."""

    def __init__(self, body: StepBody, optimizer: torch.optim.Optimizer, device: torch.device,
                 warmup: int = 2) -> None:
        self.body, self.optimizer, self.device, self.warmup = body, optimizer, device, warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.calls = 0
        self.scale = torch.zeros((), device=device)
        self.inputs: list[Batch] = []
        self.outputs: tuple[Tensor, ...] = ()
        for group in optimizer.param_groups:     # read on the device: the graph keeps these tensors' addresses
            group["lr"] = torch.tensor(float(group["lr"]), device=device)

    def __call__(self, micro: Sequence[Batch], lr: float, loss_scale: float) -> tuple[Tensor, ...]:
        for group in self.optimizer.param_groups:
            group["lr"].fill_(lr)
        self.scale.fill_(loss_scale)
        if self.graph is None and self.calls < self.warmup:
            out = self._eager(micro)
        else:
            if self.graph is None:
                self._capture(micro)
            else:
                self._load(micro)
            assert self.graph is not None
            self.graph.replay()
            out = self.outputs
        self.calls += 1
        return out

    def _eager(self, micro: Sequence[Batch]) -> tuple[Tensor, ...]:
        """One real step on a side stream, as PyTorch's capture recipe warms up (lazy state, cuBLAS handles)."""
        side, main = torch.cuda.Stream(self.device), torch.cuda.current_stream(self.device)
        side.wait_stream(main)
        with torch.cuda.stream(side), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*capturable=True.*")   # the uncaptured warm-up steps
            out = self.body(micro, self.scale)
            self.optimizer.zero_grad(set_to_none=True)
        main.wait_stream(side)
        for o in out:
            o.record_stream(main)
        return out

    def _capture(self, micro: Sequence[Batch]) -> None:
        """Capture the step with this batch copied into the graph's own input buffers; the gradients are set to
        None first, so the captured backward writes them (and every replay overwrites them)."""
        self.inputs = [(x.to(self.device, copy=True), y.to(self.device, copy=True)) for x, y in micro]
        self.optimizer.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = tuple(self.body(self.inputs, self.scale))

    def _load(self, micro: Sequence[Batch]) -> None:
        if len(micro) != len(self.inputs):
            raise ValueError(f"train.cuda_graph: the step was captured with {len(self.inputs)} micro-batches, "
                             f"got {len(micro)}")
        for (sx, sy), (x, y) in zip(self.inputs, micro):
            if x.shape != sx.shape or y.shape != sy.shape:
                raise ValueError(f"train.cuda_graph needs batches of one shape: captured {tuple(sx.shape)}, "
                                 f"got {tuple(x.shape)}")
            sx.copy_(x, non_blocking=True)
            sy.copy_(y, non_blocking=True)
