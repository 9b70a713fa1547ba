"""``train.profile_steps: [first, last]``: trace those optimizer steps with torch.profiler.

Writes, per process, ``RUN/profile/rank{R}_trace.json`` (Chrome / Perfetto trace) and
``RUN/profile/rank{R}_table.txt`` (ops sorted by device time on GPU, CPU time otherwise): the way to see
where a step goes (kernels, communication, host gaps) in the real training loop, under torchrun too.

``train.profile_memory: true`` also records every allocation (``torch.profiler(profile_memory=True)``;
the trace gains ``[memory]`` events) and writes ``RUN/profile/rank{R}_memory.txt``: the peak memory of the
traced steps (device allocator on a GPU; on CPU the running sum of the profiler's allocation events) and
the ops sorted by the memory they allocate themselves. Without ``profile_steps`` it traces steps 1-3 (the
first includes the optimizer's state).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from modformer.registry import ConfigError
from modformer.utils import atomic_write_text


def activities(device: torch.device) -> list[ProfilerActivity]:
    """CPU, plus CUDA kernels on a GPU."""
    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])


def op_table(prof: profile, device: torch.device, rows: int = 40) -> str:
    """The profile's ops sorted by device time on a GPU, CPU time otherwise."""
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=90)


def memory_table(prof: profile, device: torch.device, rows: int = 30) -> str:
    """The ops sorted by the memory they allocate themselves (device memory on a GPU, host memory otherwise)."""
    sort = "self_cuda_memory_usage" if device.type == "cuda" else "self_cpu_memory_usage"
    return prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=90)


def cpu_peak_bytes(prof: profile) -> int:
    """Peak of the running sum of the profiler's CPU allocation events (bytes above the level at the start)."""
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and str(e.device_type()).endswith("CPU"))
    level = peak = 0
    for _, nbytes in events:
        level += nbytes
        peak = max(peak, level)
    return peak


class StepProfiler:
    """Start before step ``first`` (1-based, as logged), stop after step ``last``; a no-op without a range.

    ``memory``: record allocations too and write the memory summary (steps 1-3 when no range is given)."""

    def __init__(self, steps: tuple[int, int] | None, out_dir: Path, rank: int, device: torch.device,
                 memory: bool = False, total_steps: int | None = None) -> None:
        if steps is not None and not 1 <= steps[0] <= steps[1]:
            raise ConfigError(f"train.profile_steps must be [first, last] with 1 <= first <= last, got {list(steps)}")
        if memory and steps is None:
            steps = (1, max(1, min(3, total_steps or 3)))
        self.steps, self.out_dir, self.rank, self.device, self.memory = steps, out_dir, rank, device, memory
        self.prof: profile | None = None
        self.first_step = 0

    def before(self, step: int) -> None:
        """Call with the number of the step about to run."""
        if self.steps is None or self.prof is not None or step != self.steps[0]:
            return
        if self.memory and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.first_step = step
        self.prof = profile(activities=activities(self.device), record_shapes=self.memory,
                            profile_memory=self.memory)
        self.prof.__enter__()

    def after(self, step: int) -> None:
        """Call with the number of the step just finished."""
        if self.prof is not None and step >= self.steps[1]:
            self.close()

    def close(self, last_step: int | None = None) -> None:
        """Stop (also at an early end of training) and write the trace and the table(s)."""
        if self.prof is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        prof, self.prof = self.prof, None
        prof.__exit__(None, None, None)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self.out_dir / f"rank{self.rank}_trace.json"))
        atomic_write_text(self.out_dir / f"rank{self.rank}_table.txt", op_table(prof, self.device))
        if self.memory:
            last = self.steps[1] if last_step is None else min(last_step, self.steps[1])
            if self.device.type == "cuda":
                peak = (f"peak device memory allocated: {torch.cuda.max_memory_allocated(self.device) / 2**20:,.1f}"
                        f" MiB (reserved {torch.cuda.max_memory_reserved(self.device) / 2**20:,.1f} MiB)")
            else:
                peak = f"peak CPU memory allocated by the traced steps: {cpu_peak_bytes(prof) / 2**20:,.1f} MiB"
            head = f"train.profile_memory: steps {self.first_step}-{last}\n{peak}\n\nops by self memory:\n"
            atomic_write_text(self.out_dir / f"rank{self.rank}_memory.txt", head + memory_table(prof, self.device))
