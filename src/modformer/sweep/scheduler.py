"""Run a sweep: trials as independent ``modformer train`` processes, successive halving, resume.

Every trial is ``python -m modformer.cli train BASE key=value ... name=<id> out_dir=<sweep>/trials``
(its run folder is self-describing as usual). ``workers`` trials run at once on CPU, each with
``cpu_count // workers`` threads; on a machine with GPUs each trial gets one GPU (``CUDA_VISIBLE_DEVICES``),
``per_gpu`` trials sharing each one (small models leave an H100 idle between kernel launches). With
``halving``, all trials train to the first rung's steps, the best 1/eta continue (``--resume`` from their
end-of-rung checkpoint) to the next rung, and so on.

State lives in ``<out_dir>/state.json`` (rewritten atomically after every finished trial); a rerun
with ``resume=True`` regenerates the same trials, skips every (trial, rung) already finished and
continues interrupted trials from their newest checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml

from modformer.config import ConfigError, apply_overrides
from modformer.sweep.results import metric_value, result_rows, trial_record, write_results, write_table
from modformer.sweep.space import format_value
from modformer.sweep.spec import SweepSpec
from modformer.utils import atomic_write_text


@dataclass
class Trial:
    id: str
    params: dict[str, Any]          # space key -> value (group names for groups)
    overrides: dict[str, Any]       # dotted config key -> value (fixed sweep overrides not included)
    steps: int = 0                  # the trial's own train.steps (its budget without halving)


@dataclass
class Job:
    trial: Trial
    steps: int
    run_dir: Path
    resume: bool                     # continue from the newest checkpoint (else start fresh)


class Handle(Protocol):
    def poll(self) -> int | None: ...
    def terminate(self) -> None: ...


class Runner(Protocol):
    def start(self, job: Job, env: dict[str, str], extra: list[str]) -> Handle: ...


class SubprocessRunner:
    """Launches ``python -m modformer.cli train`` for a job; output goes to ``<sweep>/logs/<id>.log``."""

    def __init__(self, spec: SweepSpec, python: str = sys.executable) -> None:
        self.spec, self.python = spec, python

    def command(self, job: Job, extra: list[str]) -> list[str]:
        sets = {**self.spec.overrides, **job.trial.overrides}
        cmd = [self.python, "-m", "modformer.cli", "train", str(self.spec.base_path()),
               *[f"{k}={format_value(v)}" for k, v in sets.items()],
               f"name={job.run_dir.name}", f"out_dir={job.run_dir.parent}", f"train.steps={job.steps}",
               "train.progress=false", "train.tensorboard=false", *extra]
        return cmd + (["--resume"] if job.resume else ["--overwrite"])

    def start(self, job: Job, env: dict[str, str], extra: list[str]) -> Handle:
        log = self.spec.folder / "logs" / f"{job.trial.id}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as f:
            f.write(f"\n=== {job.trial.id}: {job.steps} steps ({'resume' if job.resume else 'fresh'})\n")
            f.flush()
            src = str(Path(__file__).resolve().parents[2])
            full_env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join(
                [src, *filter(None, [os.environ.get("PYTHONPATH")])])}
            return subprocess.Popen(self.command(job, extra), stdout=f, stderr=subprocess.STDOUT, env=full_env)


def make_trials(spec: SweepSpec) -> tuple[list[Trial], list[str]]:
    """The sweep's trials (deterministic) and the reasons invalid combinations were skipped."""
    space = spec.parsed_space()
    base = spec.base_config()
    assignments = space.grid() if spec.method == "grid" else space.sample(spec.num_samples, spec.seed)
    trials, skipped = [], []
    for a in assignments:
        over = space.overrides(a)
        try:
            cfg = apply_overrides(base, [f"{k}={format_value(v)}" for k, v in over.items()])
            cfg.validate()          # a trial with a bad value is skipped up front, not failed when run
        except ConfigError as e:
            skipped.append(f"{a}: {e}")
            continue
        if spec.halving and cfg.train.steps != base.train.steps:
            raise ConfigError("sweep: train.steps cannot be searched together with halving (the rungs set it)")
        trials.append(Trial(f"t{len(trials):04d}", a, over, cfg.train.steps))
    if not trials:
        raise ConfigError(f"sweep {spec.name!r}: no valid trial; first problem: {skipped[0] if skipped else '?'}")
    return trials, skipped


def keep_count(n: int, eta: int) -> int:
    """Trials promoted from a rung of ``n``: the best n // eta (at least one)."""
    return max(1, n // eta)


def _fmt_time(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Sweep:
    """Plans and runs a sweep; ``run()`` returns the result rows (one per trial, its last rung)."""

    def __init__(self, spec: SweepSpec, runner: Runner | None = None, workers: int | None = None,
                 resume: bool = False, log: Any = print) -> None:
        self.spec, self.folder = spec, spec.folder
        self.runner = runner or SubprocessRunner(spec)
        self.trials, self.skipped = make_trials(spec)
        self.rungs = spec.rungs()
        self.log, self.resume = log, resume
        self.slots = self._slots(workers or spec.workers)
        self.state_path = self.folder / "state.json"
        self.records: dict[str, dict[str, dict[str, Any]]] = {}   # trial id -> str(steps) -> record
        if self.state_path.is_file():
            if not resume:
                raise ConfigError(f"{self.folder} already holds a sweep; pass --resume to continue it "
                                  "or choose another out_dir")
            self._load_state()
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.folder / "sweep.yaml", yaml.safe_dump(self._spec_dict(), sort_keys=False))

    # ---- set-up ------------------------------------------------------------------------
    def _spec_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        d = asdict(self.spec)
        d.pop("path", None)
        d["base"] = str(self.spec.base_path())
        return json.loads(json.dumps(d))

    def _slots(self, workers: int) -> list[tuple[dict[str, str], list[str]]]:
        """(env, extra overrides) per concurrent trial."""
        devices = self.spec.devices
        gpus: list[int] = []
        if devices == "auto":
            try:
                import torch

                gpus = list(range(torch.cuda.device_count()))
            except Exception:   # noqa: BLE001 - no usable CUDA: CPU
                gpus = []
        elif isinstance(devices, list):
            gpus = [int(d) for d in devices]
        elif devices != "cpu":
            raise ConfigError(f"sweep: devices must be auto, cpu or a list of GPU ids, got {devices!r}")
        per_gpu = self.spec.per_gpu
        if len(gpus) > 1:
            visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
            ids = [visible[g] if devices == "auto" and g < len(visible) else str(g) for g in gpus]
            return [({"CUDA_VISIBLE_DEVICES": i}, []) for _ in range(per_gpu) for i in ids]
        if len(gpus) == 1:
            return [({}, []) for _ in range(per_gpu)]
        threads = max(1, (os.cpu_count() or 1) // workers)
        env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        return [(env, [f"train.threads={threads}", "train.device=cpu"]) for _ in range(workers)]

    def _load_state(self) -> None:
        state = json.loads(self.state_path.read_text())
        saved = {t["id"]: t["params"] for t in state.get("trials", [])}
        mine = {t.id: json.loads(json.dumps(t.params)) for t in self.trials}
        if saved != mine:
            raise ConfigError(f"cannot resume {self.folder}: the sweep's trials differ from the saved ones "
                              "(space, seed or method changed); use another out_dir")
        self.records = state.get("records", {})

    def _save_state(self) -> None:
        state = {"name": self.spec.name, "rungs": self.rungs,
                 "trials": [{"id": t.id, "params": t.params, "overrides": t.overrides} for t in self.trials],
                 "records": self.records}
        atomic_write_text(self.state_path, json.dumps(state, indent=1, default=str))

    # ---- bookkeeping -------------------------------------------------------------------
    def run_dir(self, trial: Trial) -> Path:
        return self.folder / "trials" / trial.id

    def last_record(self, trial: Trial) -> dict[str, Any] | None:
        recs = self.records.get(trial.id, {})
        return recs[max(recs, key=int)] if recs else None

    def finished(self, trial: Trial, steps: int) -> bool:
        """Trained to ``steps``, or stopped early (target reached) at a lower rung, or failed."""
        recs = self.records.get(trial.id, {})
        if str(steps) in recs:
            return True
        return any(r.get("status") == "failed" or str(r.get("stop_reason", "steps")).startswith("early stop")
                   for r in recs.values())

    def _adopt_finished_run(self, trial: Trial, steps: int) -> bool:
        """A run that finished before an interruption but whose record was never saved."""
        path = self.run_dir(trial) / "summary.json"
        if not self.resume or not path.is_file():
            return False
        summary = json.loads(path.read_text())
        if summary.get("steps", 0) >= steps or str(summary.get("stop_reason", "")).startswith("early stop"):
            self.records.setdefault(trial.id, {})[str(steps)] = trial_record(self.run_dir(trial), self.spec, steps)
            return True
        return False

    def _rank_key(self, trial: Trial, steps: int) -> tuple:
        recs = self.records.get(trial.id, {})
        rec = recs.get(str(steps)) or self.last_record(trial) or {}
        keys: list[tuple[str, str]] = [(self.spec.metric, self.spec.mode)]
        if self.spec.rank_by:
            keys.append((self.spec.rank_by[0], self.spec.rank_by[1]))
        out: list[Any] = [rec.get("status") == "failed"]
        for metric, mode in keys:
            v = metric_value(rec, metric)
            out += [v is None, 0.0 if v is None else (v if mode == "min" else -v)]
        return tuple(out)

    def best(self) -> tuple[Trial, dict[str, Any]] | None:
        done = [(t, self.last_record(t)) for t in self.trials if self.last_record(t)]
        done = [(t, r) for t, r in done if metric_value(r, self.spec.metric) is not None]
        if not done:
            return None
        sign = 1 if self.spec.mode == "min" else -1
        return min(done, key=lambda tr: sign * metric_value(tr[1], self.spec.metric))

    # ---- the loop ----------------------------------------------------------------------
    def plan(self) -> list[int]:
        """Trials per rung (for ETA and tests)."""
        n, out = len(self.trials), []
        for _ in self.rungs:
            out.append(n)
            n = keep_count(n, self.spec.halving.eta) if self.spec.halving else n
        return out

    def run(self) -> list[dict[str, Any]]:
        """Run (or resume) the sweep; SIGTERM is handled like Ctrl-C (running trials stopped, state kept)."""
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return self._run()

        def on_term(signum: int, frame: Any) -> None:
            raise KeyboardInterrupt(f"signal {signum}")

        previous = signal.signal(signal.SIGTERM, on_term)
        try:
            return self._run()
        finally:
            signal.signal(signal.SIGTERM, previous)

    def _run(self) -> list[dict[str, Any]]:
        if self.skipped:
            self.log(f"[{self.spec.name}] skipped {len(self.skipped)} invalid combination(s), e.g. {self.skipped[0]}")
        plan = self.plan()
        budget = f"rungs {self.rungs} (trials per rung {plan})" if self.spec.halving else \
            f"steps {sorted({t.steps for t in self.trials})}"
        self.log(f"[{self.spec.name}] {len(self.trials)} trials, {budget}, {len(self.slots)} at a time "
                 f"-> {self.folder}")
        self.t0, self.steps_done = time.perf_counter(), 0
        self.total_steps = sum(n * (r - (self.rungs[k - 1] if k else 0)) for k, (n, r) in enumerate(zip(plan,
                                                                                                      self.rungs)))
        if not self.spec.halving:
            self.total_steps = sum(t.steps for t in self.trials)
        self.steps_credit, self.jobs_done, self.jobs_total = 0, 0, sum(plan)
        active = list(self.trials)
        try:
            for k, rung in enumerate(self.rungs):
                prev = self.rungs[k - 1] if k else 0
                todo = []
                for t in active:
                    steps = rung if self.spec.halving else t.steps
                    if self.finished(t, steps) or self._adopt_finished_run(t, steps):
                        self.steps_credit += steps - prev
                        self.jobs_done += 1
                        continue
                    restart = bool(self.spec.halving and self.spec.halving.restart)
                    todo.append(Job(t, steps, self.run_dir(t), resume=self._has_checkpoint(t) and not restart))
                self._run_jobs(todo, prev)
                if k < len(self.rungs) - 1:
                    active = sorted(active, key=lambda t: self._rank_key(t, rung))
                    active = [t for t in active[:keep_count(len(active), self.spec.halving.eta)]
                              if self.last_record(t) and self.last_record(t).get("status") != "failed"]
        finally:
            self._save_state()
            rows = write_results(self)
        best = self.best()
        if best:
            self.log(f"[{self.spec.name}] best {self.spec.metric}={metric_value(best[1], self.spec.metric):.6g} "
                     f"({best[0].id}: {best[0].params}); results in {self.folder}")
        return rows

    def _has_checkpoint(self, trial: Trial) -> bool:
        return (self.run_dir(trial) / "checkpoints" / "latest").exists()

    def _run_jobs(self, jobs: list[Job], prev: int) -> None:
        pending = list(jobs)
        running: dict[int, tuple[Job, Handle, float]] = {}
        try:
            while pending or running:
                for slot in range(len(self.slots)):
                    if slot not in running and pending:
                        job = pending.pop(0)
                        env, extra = self.slots[slot]
                        shown = ", ".join(f"{k}={format_value(v)}" for k, v in job.trial.params.items())
                        self.log(f"[{self.spec.name}] start {job.trial.id}@{job.steps} ({shown})"
                                 f"{' resuming' if job.resume else ''}")
                        running[slot] = (job, self.runner.start(job, env, extra), time.perf_counter())
                for slot, (job, handle, t_start) in list(running.items()):
                    rc = handle.poll()
                    if rc is None:
                        continue
                    del running[slot]
                    if rc in (130, -2, -15):   # the trial was interrupted (Ctrl-C / SIGTERM), not failed
                        raise KeyboardInterrupt(f"trial {job.trial.id} was interrupted")
                    rec = trial_record(job.run_dir, self.spec, job.steps, rc, self._log_tail(job.trial))
                    rec["trial_seconds"] = time.perf_counter() - t_start
                    self.records.setdefault(job.trial.id, {})[str(job.steps)] = rec
                    self.steps_done += job.steps - prev
                    self.jobs_done += 1
                    self._save_state()
                    write_table(result_rows(self), self.folder)   # the table grows as trials finish
                    self._progress(len(running), job, rec)
                if running:
                    time.sleep(0.05)
        except BaseException:
            for _job, handle, _ in running.values():
                handle.terminate()
            for _job, handle, _ in running.values():
                with contextlib.suppress(Exception):
                    getattr(handle, "wait", lambda timeout: None)(timeout=30)
            raise

    def _log_tail(self, trial: Trial) -> str:
        log = self.folder / "logs" / f"{trial.id}.log"
        if not log.is_file():
            return ""
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("error:")]
        return (errors or lines or [""])[-1][-300:]

    def _progress(self, n_running: int, job: Job, rec: dict[str, Any]) -> None:
        failed = sum(1 for t in self.trials if (self.last_record(t) or {}).get("status") == "failed")
        best = self.best()
        best_s = f"best {self.spec.metric}={metric_value(best[1], self.spec.metric):.4g} ({best[0].id})" if best \
            else "best -"
        elapsed = time.perf_counter() - self.t0
        remaining = self.total_steps - self.steps_done - self.steps_credit
        eta = elapsed * remaining / self.steps_done if self.steps_done else math.inf
        v = metric_value(rec, self.spec.metric)
        self.log(f"[{self.spec.name}] {job.trial.id}@{job.steps} {rec.get('status')} "
                 f"{self.spec.metric}={'-' if v is None else f'{v:.4g}'} | "
                 f"{self.jobs_done}/{self.jobs_total} runs done, "
                 f"{n_running} running, {failed} failed | {best_s} | ETA {_fmt_time(max(eta, 0.0))}")
