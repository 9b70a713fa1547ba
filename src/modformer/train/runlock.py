"""One writer per run folder: an OS file lock held for the life of the process that writes it.

``RUN/.lock`` is locked with ``fcntl.flock`` (exclusive, non-blocking) and holds the writer's PID. The
kernel drops the lock when the holder exits or is killed (even by SIGKILL), so a lock file left by a
dead process is simply taken over: there are no stale locks to clean up by hand. A second
``modformer train`` into the same folder, ``--overwrite`` or ``--resume`` of a live run are refused
with one line naming the holder's PID. On systems without ``fcntl`` (Windows) locking is skipped.
"""

from __future__ import annotations

import os
from pathlib import Path

from modformer.registry import ConfigError

try:
    import fcntl
except ImportError:       # pragma: no cover - Windows
    fcntl = None

LOCK_NAME = ".lock"


class RunInUseError(ConfigError):
    """Another live process is writing this run folder."""


class RunLock:
    """Exclusive lock on ``run_dir/.lock``; ``acquire`` creates the folder, ``release`` is idempotent."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        if self._fd is not None or fcntl is None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunInUseError(f"{self.path.parent} is in use by another process (PID {holder}); wait for it "
                                "to finish or choose another name=") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.release()


def holder_pid(run_dir: Path) -> int | None:
    """PID of the live process holding ``run_dir``'s lock, or None when nobody holds it."""
    path = Path(run_dir) / LOCK_NAME
    if fcntl is None or not path.is_file():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            text = os.read(fd, 64).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
