"""nanoGPT as a benchmark peer, run from the user's own checkout (``--peer-nanogpt PATH``); none of its code is in
this repository.

* :func:`load_model_module` imports the checkout's ``model.py`` from its file path (for ``bench throughput``: its
  ``GPT`` and ``GPTConfig`` at the ``bench.py`` setting, in the same process as ours).
* :class:`PeerTrainProcess` runs the checkout's ``train.py CONFIG`` as a child process in a temporary copy of the
  checkout, timed from its launch, and reads its ``step N: train loss X, val loss Y`` lines (for
  ``bench time-to-loss``). :func:`write_char_data` writes the ``data/shakespeare_char`` files its training script
  reads (``train.bin`` / ``val.bin`` as uint16 ids, ``meta.pkl`` with the vocabulary) from our local Tiny
  Shakespeare, since the checkout's own preparation script downloads the text. The pickle is written for the
  peer; modformer never loads one.
"""

from __future__ import annotations

import importlib.util
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import ModuleType

import numpy as np

EVAL_LINE = re.compile(r"^step (\d+): train loss ([0-9.eE+-]+|nan|inf), val loss ([0-9.eE+-]+|nan|inf)")


def checkout(path: str | Path, need: str) -> Path:
    """The checkout folder, checked to hold ``need`` (a one-line SystemExit otherwise)."""
    root = Path(path).expanduser()
    if not (root / need).is_file():
        raise SystemExit(f"--peer-nanogpt {path}: no {need} there (pass the folder of a nanoGPT checkout)")
    return root


def load_model_module(path: str | Path) -> ModuleType:
    """The checkout's ``model.py`` as a module (``GPT``, ``GPTConfig``), imported from its file path."""
    file = checkout(path, "model.py") / "model.py"
    spec = importlib.util.spec_from_file_location("nanogpt_peer_model", file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module            # torch.compile looks the module up by name when it traces it
    spec.loader.exec_module(module)
    return module


def build_peer_model(module: ModuleType, vocab_size: int, n_layer: int, n_head: int, d_model: int, seq: int,
                     bias: bool = False):  # noqa: ANN201 (the peer's own class)
    """nanoGPT's ``GPT`` at ``bench.py``'s setting (dropout 0, no biases unless ``bias``)."""
    conf = module.GPTConfig(block_size=seq, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head, n_embd=d_model,
                            dropout=0.0, bias=bias)
    return module.GPT(conf)


def write_char_data(folder: Path, text: str, val_fraction: float = 0.1) -> dict[str, int]:
    """Character-level ``train.bin`` / ``val.bin`` (uint16 ids; the last ``val_fraction`` of the text is validation)
    and ``meta.pkl`` (``vocab_size``, ``stoi``, ``itos``) in ``folder``; returns the sizes written."""
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = np.fromiter((stoi[c] for c in text), dtype=np.uint16, count=len(text))
    cut = int(len(ids) * (1 - val_fraction))
    folder.mkdir(parents=True, exist_ok=True)
    ids[:cut].tofile(folder / "train.bin")
    ids[cut:].tofile(folder / "val.bin")
    with open(folder / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}, f)
    return {"vocab_size": len(chars), "train_tokens": cut, "val_tokens": len(ids) - cut}


def parse_eval_line(line: str) -> tuple[int, float, float] | None:
    """``(step, train_loss, val_loss)`` of a ``step N: train loss X, val loss Y`` line, else None."""
    m = EVAL_LINE.match(line.strip())
    return (int(m.group(1)), float(m.group(2)), float(m.group(3))) if m else None


def copy_checkout(src: Path, dest: Path) -> Path:
    """A working copy of the checkout (no ``.git``, no prepared data, no earlier outputs): the peer's runs write
    into it, never into the user's checkout."""
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns(".git", "*.bin", "*.pkl", "out*", "__pycache__"))
    return dest


class PeerTrainProcess:
    """``python -u train.py ARGS`` in ``workdir``, timed from launch; stops it at the first val loss <= ``target``.

    ``t_target`` / ``step_target``: seconds from launch to that line, and its step; ``evals``: every
    ``(seconds, step, train, val)`` it printed."""

    def __init__(self, workdir: Path, args: list[str], target: float, env: dict[str, str],
                 max_seconds: float | None = None, log: Path | None = None) -> None:
        self.workdir, self.args, self.target, self.env, self.max_seconds = workdir, args, target, env, max_seconds
        self.argv = [sys.executable, "-u", "train.py", *args]
        self.log = log
        self.evals: list[tuple[float, int, float, float]] = []
        self.lines: list[str] = []
        self.t_target: float | None = None
        self.step_target: int | None = None
        self.returncode: int | None = None
        self.seconds: float | None = None

    def run(self) -> PeerTrainProcess:
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.argv, cwd=self.workdir, env=self.env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, bufsize=1)
        reader = threading.Thread(target=self._read, daemon=True)
        reader.start()
        try:
            self.returncode = self.proc.wait(timeout=self.max_seconds)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.returncode = self.proc.wait()
        reader.join()
        self.seconds = time.perf_counter() - self.t0
        if self.log is not None:
            self.log.parent.mkdir(parents=True, exist_ok=True)
            self.log.write_text("\n".join(self.lines) + "\n")
        return self

    def _read(self) -> None:
        for line in self.proc.stdout:
            t = time.perf_counter() - self.t0
            self.lines.append(f"[{t:8.2f}s] {line.rstrip()}")
            parsed = parse_eval_line(line)
            if parsed is None:
                continue
            self.evals.append((t, *parsed))
            if self.t_target is None and parsed[2] <= self.target:
                self.t_target, self.step_target = t, parsed[0]
                self.proc.kill()                     # reached: the rest of its run is not timed

    def row(self) -> dict:
        best = min(self.evals, key=lambda e: e[3]) if self.evals else None
        return {"name": "nanogpt", "config": " ".join(self.args), "seconds_to_target": self.t_target,
                "steps_to_target": self.step_target, "best_val_loss": best[3] if best else None,
                "best_val_loss_step": best[1] if best else None, "process_seconds": self.seconds,
                "returncode": self.returncode if self.t_target is None else 0,
                "evals": [{"seconds": round(t, 2), "step": s, "train_loss": tr, "val_loss": v}
                          for t, s, tr, v in self.evals]}


def run_peer_time_to_loss(path: str | Path, text: str, target: float, args: list[str], env: dict[str, str],
                          max_seconds: float | None, log: Path | None) -> dict:
    """nanoGPT's ``train.py ARGS`` (default its Tiny Shakespeare recipe) in a fresh copy of ``path`` with the
    character data written from ``text``; the row of :class:`PeerTrainProcess`."""
    src = checkout(path, "train.py")
    with tempfile.TemporaryDirectory(prefix="nanogpt-peer-") as tmp:
        work = copy_checkout(src, Path(tmp) / "nanoGPT")
        sizes = write_char_data(work / "data" / "shakespeare_char", text)
        row = PeerTrainProcess(work, args, target, env, max_seconds, log).run().row()
    return {**row, "data": sizes}
