"""The one write path every writer uses (atomic replace or atomic append) and the storage error it raises.

Every file modformer writes goes through :func:`atomic_write` / :func:`atomic_write_text` (whole files:
safetensors, JSON, YAML, text, PNG) or :func:`append_text` (metrics.jsonl rows). A failed write, whatever
library raised it (``OSError``, safetensors' ``SafetensorError``, torch's ``RuntimeError``), leaves no
partial file behind and becomes one :class:`WriteError` whose message is one line,
``no space left on device while writing PATH`` when the disk is full. New files follow the umask.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

from safetensors import SafetensorError

# what a library may raise when a write fails: OSError (Python I/O), SafetensorError (safetensors' Rust
# writer), RuntimeError (torch's C++ stream writer, which reports a full disk as "unexpected pos ...")
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)
_FULL_MARKERS = ("no space left on device", "os error 28", "storagefull", "disk quota exceeded")
_NEARLY_FULL_BYTES = 64 * 1024


class CheckpointError(RuntimeError):
    """A file could not be written or read (disk full, I/O error, corrupt or unsafe content).

    The message is one line naming the file and why; the CLI prints it as ``error: ...`` (exit 2)."""


class WriteError(CheckpointError):
    """Writing ``path`` failed for ``reason`` (e.g. ``no space left on device``); nothing partial is left."""

    def __init__(self, reason: str, path: str | Path) -> None:
        super().__init__(f"{reason} while writing {path}")
        self.reason, self.path = reason, Path(path)


def write_failure(error: BaseException, path: str | Path) -> WriteError:
    """The WriteError for ``error`` raised while writing ``path`` (disk full recognised from any library)."""
    if isinstance(error, WriteError):
        return error
    return WriteError(_reason(error, Path(path)), path)


def _reason(error: BaseException, path: Path) -> str:
    chain, e = [], error
    while e is not None and len(chain) < 8:
        chain.append(e)
        e = e.__cause__ or e.__context__
    for e in chain:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return "no space left on device"
        if any(m in str(e).lower() for m in _FULL_MARKERS):
            return "no space left on device"
    try:                       # torch's writer says only "unexpected pos": look at the disk itself
        folder = next(p for p in (path, *path.parents) if p.exists())
        if shutil.disk_usage(folder).free < _NEARLY_FULL_BYTES:
            return "no space left on device"
    except (OSError, StopIteration):
        pass
    if isinstance(error, OSError) and error.strerror:
        return error.strerror[:1].lower() + error.strerror[1:]
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return f"write failed ({text[:200]})"


def _produce(write: Callable[[str], None], tmp: str) -> None:
    """Run the library's writer on the temporary path (a seam the fault-injection tests patch)."""
    write(tmp)


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError:
        pass


def fsync_dir(folder: str | Path) -> None:
    """Make a folder's entries (renames, new files) durable: fsync the directory itself."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:      # some file systems cannot fsync a directory; nothing more can be done there
        if e.errno not in (errno.EINVAL, errno.EBADF, errno.EROFS):
            raise
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[str], None], sync_dir: bool = False) -> None:
    """Call ``write(tmp_path)``, fsync, then atomically rename onto ``path``.

    Readers never see a half-written file: if ``write`` fails (disk full, I/O error, crash), the previous
    file at ``path`` is left untouched, the temporary file is removed, and a :class:`WriteError` says why.
    The file gets mode 0666 minus the umask, like any new file (``mkstemp``'s or a library's own 0600
    would survive the rename). ``sync_dir``: also fsync the folder, so the rename itself survives a power cut.
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        mode = os.fstat(fd).st_mode & 0o777           # 0666 minus the umask, read without changing the umask
        os.close(fd)
        _produce(write, str(tmp))
        if os.stat(tmp).st_mode & 0o777 != mode:       # a library that wrote its own file (safetensors: 0600)
            os.chmod(tmp, mode)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        if sync_dir:
            fsync_dir(path.parent)
    except WRITE_ERRORS as e:
        _remove(tmp)
        raise write_failure(e, path) from e
    except BaseException:
        _remove(tmp)
        raise


def atomic_write_text(path: str | Path, text: str, sync_dir: bool = False) -> None:
    """Atomically replace ``path`` with ``text`` (UTF-8)."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), sync_dir=sync_dir)


def _append_bytes(fd: int, data: bytes) -> None:
    """Write all of ``data`` at the end of the open file ``fd`` (a seam the fault-injection tests patch)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def append_text(path: str | Path, text: str) -> None:
    """Append ``text`` to ``path`` all or nothing: a failed append is cut back to the previous end.

    Used for metrics.jsonl rows (rewriting the whole file per row would be quadratic). Raises
    :class:`WriteError` (``no space left on device while writing PATH`` on a full disk).
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    except OSError as e:
        raise write_failure(e, path) from e
    try:
        end = os.fstat(fd).st_size
        try:
            _append_bytes(fd, text.encode("utf-8"))
        except OSError as e:
            try:
                os.ftruncate(fd, end)
            except OSError:
                pass
            raise write_failure(e, path) from e
    finally:
        os.close(fd)
