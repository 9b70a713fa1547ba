"""Where corpora live and where derived files go: data root, cache dir, token-stream .npy files, downloads.

The shipped corpora are read-only; everything derived (vocabularies, BPE tokenizers, token streams)
goes to a cache folder keyed by a hash of its inputs, written atomically so concurrent processes
(e.g. DDP ranks) can build the same entry without corrupting it.

The canonical corpus files have published SHA-256 digests (``SHA256``, as listed in shared/data/README.md):
a download is verified before it is written (with a progress bar), and a local file of that name is verified
when first read in a process (a damaged or different file is one ``error:`` line; ``data.options.verify=false``
uses it as it is).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from modformer.registry import ConfigError
from modformer.utils import atomic_write

# Canonical public sources: WikiText-2 (tokenized v1) as mirrored by pytorch/examples, Tiny Shakespeare
# from karpathy/char-rnn.
_WT2 = "https://raw.githubusercontent.com/pytorch/examples/main/word_language_model/data/wikitext-2/"
URLS: dict[str, dict[str, str]] = {
    "wikitext-2": {f: _WT2 + f for f in ("train.txt", "valid.txt", "test.txt")},
    "tinyshakespeare": {
        "input.txt": "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
    },
}


SHA256: dict[str, dict[str, str]] = {      # shared/data/README.md
    "wikitext-2": {"train.txt": "728c77e87e176af4730f9a80fc6008bcaff421a7202c1c048877c0eec3685f89",
                   "valid.txt": "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
                   "test.txt": "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0"},
    "tinyshakespeare": {"input.txt": "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"},
}
_VERIFIED: set[tuple[str, int, int]] = set()     # (path, size, mtime_ns) already checked in this process


class DataFileNotFoundError(FileNotFoundError, ConfigError):
    """A corpus file is missing; the one-line message says how to point the project at it."""


class DataDownloadError(ConfigError):
    """``data.options.download=true`` could not fetch a file (offline, blocked, moved); one line says what to do."""


class DataChecksumError(ConfigError):
    """A corpus file's SHA-256 is not the published one (damaged, truncated or a different file)."""


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_file(path: Path, folder: str) -> None:
    """DataChecksumError unless ``path`` has the published SHA-256 of ``folder/<its name>`` (files without a
    published digest pass); each (path, size, mtime) is hashed once per process."""
    want = SHA256.get(folder, {}).get(path.name)
    if want is None:
        return
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key in _VERIFIED:
        return
    got = sha256_of(path)
    if got != want:
        raise DataChecksumError(
            f"{path}: sha256 {got[:16]}... is not the published {want[:16]}... of {folder}/{path.name} (a damaged "
            "or different file); copy the original again or delete it and pass data.options.download=true "
            "(to use the file as it is: data.options.verify=false)")
    _VERIFIED.add(key)


def cache_dir(override: str | Path | None = None) -> Path:
    """Folder for derived files: ``override``, else $MODFORMER_CACHE, else ~/.cache/modformer."""
    if override is not None:
        return Path(override).expanduser()
    if os.environ.get("MODFORMER_CACHE"):
        return Path(os.environ["MODFORMER_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "modformer"


def default_root() -> Path | None:
    """$MODFORMER_DATA, else the first ``shared/data`` found walking up from the CWD and from this
    package (so ``../shared/data`` next to the repo is found), else the download folder if it exists."""
    if os.environ.get("MODFORMER_DATA"):
        return Path(os.environ["MODFORMER_DATA"]).expanduser()
    for start in (Path.cwd().resolve(), Path(__file__).resolve().parent):
        for d in (start, *start.parents):
            if (d / "shared" / "data").is_dir():
                return d / "shared" / "data"
    downloaded = cache_dir() / "data"
    return downloaded if downloaded.is_dir() else None


def corpus_files(root: Path | None, folder: str, names: list[str], download: bool = False,
                 verify: bool = True) -> list[Path]:
    """Paths of ``root/folder/<name>``; downloads missing ones when ``download``, else a clear error; with
    ``verify`` each file with a published digest must match it (``verify_file``)."""
    if root is None:
        root = default_root()
    if root is None:
        if not download:
            raise DataFileNotFoundError(
                f"no data folder found for {folder!r} (looked for shared/data above the current directory "
                "and the package); set data.root or $MODFORMER_DATA, or pass data.options.download=true")
        root = cache_dir() / "data"
    paths = [Path(root) / folder / n for n in names]
    missing = [p for p in paths if not p.is_file()]
    if missing and download:
        download_corpus(folder, Path(root))
        missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DataFileNotFoundError(
            f"data file not found: {missing[0]}; set data.root (or $MODFORMER_DATA) to the folder holding "
            f"{folder}/, or pass data.options.download=true to fetch it")
    if verify:
        for p in paths:
            verify_file(p, folder)
    return paths


def download_corpus(folder: str, root: Path) -> list[Path]:
    """Download the files of corpus ``folder`` ("wikitext-2" | "tinyshakespeare") into ``root/folder``.

    Only called when a user passes ``download=True``; existing files are kept. Each file is fetched with a
    progress bar (plain lines off a terminal), checked against its published SHA-256 and only then written.
    """
    if folder not in URLS:
        raise ConfigError(f"no download source for {folder!r}; known: {', '.join(URLS)}")
    out = []
    for name, url in URLS[folder].items():
        path = Path(root) / folder / name
        if not path.is_file():
            payload = _fetch(url, f"{folder}/{name}", root)
            want, got = SHA256.get(folder, {}).get(name), hashlib.sha256(payload).hexdigest()
            if want is not None and got != want:
                raise DataChecksumError(
                    f"downloaded {url} but its sha256 {got[:16]}... is not the published {want[:16]}... (a changed "
                    f"or corrupted source); nothing written: copy {folder}/{name} into {root} yourself")
            atomic_write(path, lambda tmp, b=payload: Path(tmp).write_bytes(b))
        out.append(path)
    return out


def _fetch(url: str, what: str, root: Path) -> bytes:
    """The bytes at ``url``, read in 256 KiB chunks with a progress display; failures are one DataDownloadError."""
    from modformer.train.logging import ProgressDisplay

    try:
        with urllib.request.urlopen(url, timeout=60) as resp:
            size = int(getattr(resp, "headers", {}).get("Content-Length") or 0)
            progress = ProgressDisplay(max(size // 1024, 1), 0, True, label=f"download {what}", unit="KiB",
                                       plain_every_s=5.0)
            chunks, n = [], 0
            try:
                for chunk in iter(lambda: resp.read(1 << 18), b""):
                    chunks.append(chunk)
                    n += len(chunk)
                    progress.update(min(n // 1024, progress.total), f"{n / 1e6:.1f} MB")
            finally:
                progress.close()
            return b"".join(chunks)
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:   # offline, DNS, HTTP 404, ...
        reason = " ".join(str(getattr(e, "reason", None) or e).split())
        raise DataDownloadError(
            f"could not download {url} ({reason}); copy {what} into {root} yourself, or set "
            "data.root / $MODFORMER_DATA to a folder that has it") from None


def file_digest(*parts: str | bytes | Path, length: int = 16) -> str:
    """Short sha256 over file contents (Path) and literal strings/bytes: a cache key."""
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, Path):
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        else:
            h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()[:length]


def save_stream(path: Path, ids: np.ndarray | list[int], vocab_size: int) -> None:
    """Store a 1-D token stream as .npy: uint16 when the vocabulary fits, else uint32."""
    arr = np.asarray(ids, dtype=np.uint16 if vocab_size < 65536 else np.uint32)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, arr)

    atomic_write(path, write)


def load_stream(path: Path) -> np.ndarray:
    """Memory-map a stored token stream (read-only)."""
    return np.load(path, mmap_mode="r")
