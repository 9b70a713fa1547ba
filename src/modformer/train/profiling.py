"""``train.profile_steps: [first, last]``: trace those optimizer steps with torch.profiler.

Writes, per process, ``RUN/profile/rank{R}_trace.json`` (Chrome / Perfetto trace) and
``RUN/profile/rank{R}_table.txt`` (ops sorted by device time on GPU, CPU time otherwise): the way to see
where a step goes (kernels, communication, host gaps) in the real training loop, under torchrun too.
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


class StepProfiler:
    """Start before step ``first`` (1-based, as logged), stop after step ``last``; a no-op without a range."""

    def __init__(self, steps: tuple[int, int] | None, out_dir: Path, rank: int, device: torch.device) -> None:
        if steps is not None and not 1 <= steps[0] <= steps[1]:
            raise ConfigError(f"train.profile_steps must be [first, last] with 1 <= first <= last, got {list(steps)}")
        self.steps, self.out_dir, self.rank, self.device = steps, out_dir, rank, device
        self.prof: profile | None = None

    def before(self, step: int) -> None:
        """Call with the number of the step about to run."""
        if self.steps is None or self.prof is not None or step != self.steps[0]:
            return
        self.prof = profile(activities=activities(self.device), record_shapes=False)
        self.prof.__enter__()

    def after(self, step: int) -> None:
        """Call with the number of the step just finished."""
        if self.prof is not None and step >= self.steps[1]:
            self.close()

    def close(self) -> None:
        """Stop (also at an early end of training) and write the trace and the table."""
        if self.prof is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        prof, self.prof = self.prof, None
        prof.__exit__(None, None, None)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self.out_dir / f"rank{self.rank}_trace.json"))
        atomic_write_text(self.out_dir / f"rank{self.rank}_table.txt", op_table(prof, self.device))
