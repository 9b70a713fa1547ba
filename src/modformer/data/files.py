"""Where corpora live and where derived files go: data root, cache dir, token-stream .npy files, downloads.

The shipped corpora are read-only; everything derived (vocabularies, BPE tokenizers, token streams)
goes to a cache folder keyed by a hash of its inputs, written atomically so concurrent processes
(e.g. DDP ranks) can build the same entry without corrupting it.
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


class DataFileNotFoundError(FileNotFoundError, ConfigError):
    """A corpus file is missing; the one-line message says how to point the project at it."""


class DataDownloadError(ConfigError):
    """``data.options.download=true`` could not fetch a file (offline, blocked, moved); one line says what to do."""


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


def corpus_files(root: Path | None, folder: str, names: list[str], download: bool = False) -> list[Path]:
    """Paths of ``root/folder/<name>``; downloads missing ones when ``download``, else a clear error."""
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
    return paths


def download_corpus(folder: str, root: Path) -> list[Path]:
    """Download the files of corpus ``folder`` ("wikitext-2" | "tinyshakespeare") into ``root/folder``.

    Only called when a user passes ``download=True``; existing files are kept.
    """
    if folder not in URLS:
        raise ConfigError(f"no download source for {folder!r}; known: {', '.join(URLS)}")
    out = []
    for name, url in URLS[folder].items():
        path = Path(root) / folder / name
        if not path.is_file():
            try:
                with urllib.request.urlopen(url, timeout=60) as resp:
                    payload = resp.read()
            except (urllib.error.URLError, http.client.HTTPException, OSError) as e:   # offline, DNS, HTTP 404, ...
                reason = " ".join(str(getattr(e, "reason", None) or e).split())
                raise DataDownloadError(
                    f"could not download {url} ({reason}); copy {folder}/{name} into {root} yourself, or set "
                    "data.root / $MODFORMER_DATA to a folder that has it") from None
            atomic_write(path, lambda tmp, b=payload: Path(tmp).write_bytes(b))
        out.append(path)
    return out


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
