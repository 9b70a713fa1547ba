"""``modformer train`` as a child process, timed from its start: for benchmarks that count everything a user waits
for (interpreter start, imports, data loading, model build, torch.compile, evaluations)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import modformer

SRC = Path(modformer.__file__).resolve().parents[1]   # the folder holding the modformer package


def child_env(name: str, warm_cache: bool) -> dict[str, str]:
    """The environment of a child run: unbuffered output, this modformer importable, and (unless ``warm_cache``)
    its own empty torch.compile caches, so no kernel compiled by an earlier run is reused."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p)
    if not warm_cache:
        cache = Path(tempfile.mkdtemp(prefix=f"compile-{name}-"))
        env["TORCHINDUCTOR_CACHE_DIR"] = str(cache / "inductor")
        env["TRITON_CACHE_DIR"] = str(cache / "triton")
    return env


class TrainProcess:
    """One ``modformer train`` process: launched, its output time-stamped and kept in ``RUNS/<name>.log``.

    ``t_target``: seconds from launch to the trainer's ``early stop:`` line (the target was reached)."""

    def __init__(self, name: str, config: str, overrides: list[str], runs_dir: Path, env: dict[str, str],
                 max_seconds: float | None = None, cwd: Path | None = None) -> None:
        self.name, self.config, self.overrides = name, config, overrides
        self.run_dir = runs_dir / name
        self.argv = [sys.executable, "-u", "-m", "modformer.cli", "train", config, *overrides,
                     f"name={name}", f"out_dir={runs_dir}", "--overwrite"]
        self.env, self.max_seconds, self.cwd = env, max_seconds, cwd
        self.lines: list[tuple[float, str]] = []
        self.t_target: float | None = None
        self.returncode: int | None = None
        self.seconds: float | None = None

    def start(self) -> None:
        runs_log = self.run_dir.parent / f"{self.name}.log"
        runs_log.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(runs_log, "w")
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.argv, cwd=self.cwd, env=self.env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, bufsize=1)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            t = time.perf_counter() - self.t0
            self.lines.append((t, line.rstrip()))
            self._log.write(f"[{t:8.2f}s] {line}")
            self._log.flush()
            if self.t_target is None and "early stop:" in line:
                self.t_target = t

    def wait(self) -> None:
        try:
            self.returncode = self.proc.wait(timeout=self.max_seconds)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.returncode = self.proc.wait()
        self._reader.join()
        self.seconds = time.perf_counter() - self.t0
        self._log.close()

    def summary(self) -> dict:
        path = self.run_dir / "summary.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def metrics(self) -> list[dict]:
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return []
        return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]

    def settings(self) -> dict:
        """The run's resolved model/data/train settings (its config.yaml), so rows outlive config edits."""
        path = self.run_dir / "config.yaml"
        if not path.is_file():
            return {}
        import yaml

        return {k: v for k, v in yaml.safe_load(path.read_text()).items() if k in ("model", "data", "train")}

    def tokens_per_s(self) -> float | None:
        rows = [r["tokens_per_s"] for r in self.metrics() if r.get("split") == "train"]
        return statistics.median(rows[2:]) if len(rows) > 2 else None

    def warmup_s(self) -> float | None:
        """Compile / autotuning time inside the first log window (``warmup_seconds``)."""
        from modformer.train.logging import warmup_seconds

        settings = self.settings()
        batch, seq = settings.get("train", {}).get("batch_size"), settings.get("data", {}).get("seq_len")
        if not seq or not batch:
            return None
        return warmup_seconds(self.metrics(), seq * batch)        # it keeps the train rows itself

    def tail(self, n: int = 5) -> str:
        return "\n".join(line for _, line in self.lines[-n:])
