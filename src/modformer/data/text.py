"""Text corpora: WikiText-2 (word level), Tiny Shakespeare (char level) and byte-level BPE on any text.

Each corpus encodes its splits once into .npy token streams under the cache folder (option
``cache_dir``; default $MODFORMER_CACHE or ~/.cache/modformer), keyed by a hash of the source files
and the tokenizer settings, and memory-maps them afterwards. The data folder itself is never written.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from modformer.data import files
from modformer.data.base import StreamDataset
from modformer.registry import ConfigError, register
from modformer.utils import atomic_write, atomic_write_text

EOS = "<eos>"


def _read(path: Path) -> str:
    # Universal newlines, like iterating over a text file.
    with open(path, encoding="utf-8") as f:
        return f.read()


def _words(text: str) -> list[str]:
    """Whitespace-split words with one ``<eos>`` per newline (so a file gives one per line, empty or not)."""
    lines = text.split("\n")
    out: list[str] = []
    for i, line in enumerate(lines):
        out += line.split()
        if i < len(lines) - 1:
            out.append(EOS)
    return out


def _load_streams(folder: Path, splits: list[str]) -> dict[str, np.ndarray]:
    return {s: files.load_stream(folder / f"{s}.npy") for s in splits}


@register("corpus", "wikitext2")
class WikiText2(StreamDataset):
    """WikiText-2 at word level (Merity et al., 2016), the PyTorch word_language_model protocol.

    Every line, empty ones included, is split on whitespace and ends with ``<eos>``; the vocabulary
    (first-appearance order) comes from train: 33,278 words, 2,088,628 train tokens. Splits: train, val
    (valid.txt), test. Tokens are words, so ``ppl`` is word-level perplexity (``word_ppl`` equals it).
    ``repeat_fraction``, ``repeat_span``: share of training windows that repeat one span, and how the span is
    chosen (see ``StreamDataset``).
    """

    def __init__(self, seq_len: int = 256, root: Path | None = None, *, cache_dir: str | None = None,
                 download: bool = False, verify: bool = True, repeat_fraction: float = 0.0,
                 repeat_span: str = "half") -> None:
        paths = files.corpus_files(root, "wikitext-2", ["train.txt", "valid.txt", "test.txt"], download, verify)
        splits = ["train", "val", "test"]
        folder = files.cache_dir(cache_dir) / f"wikitext2-{files.file_digest(*paths, 'word-v1')}"
        vocab_path = folder / "vocab.json"
        if vocab_path.is_file():
            self.itos: list[str] = json.loads(vocab_path.read_text())
            self._stoi = {w: i for i, w in enumerate(self.itos)}
        else:
            texts = [_read(p) for p in paths]
            self.itos = list(dict.fromkeys(_words(texts[0])))   # first-appearance order
            self._stoi = {w: i for i, w in enumerate(self.itos)}
            for split, text in zip(splits, texts):
                files.save_stream(folder / f"{split}.npy", self.encode(text), len(self.itos))
            atomic_write_text(vocab_path, json.dumps(self.itos))   # written last: marks the entry complete
        streams = _load_streams(folder, splits)
        super().__init__(streams, len(self.itos), seq_len, words={s: len(v) - 1 for s, v in streams.items()},
                         repeat_fraction=repeat_fraction, repeat_span=repeat_span)
        self.eos_id = self._stoi[EOS]          # one per line: the document separator of ``data.pack``

    def encode(self, text: str) -> list[int]:
        """Words -> ids, one ``<eos>`` per newline; unknown words -> ``<unk>``."""
        stoi, unk = self._stoi, self._stoi.get("<unk>")
        ids = [stoi.get(w, unk) for w in _words(text)]
        if unk is None and None in ids:
            raise ValueError("text has words outside the WikiText-2 vocabulary")
        return ids

    def decode(self, ids: list[int]) -> str:
        """Ids -> words joined by spaces, ``<eos>`` as a newline."""
        lines, line = [], []
        for i in ids:
            w = self.itos[int(i)]
            if w == EOS:
                lines.append(" ".join(line))
                line = []
            else:
                line.append(w)
        lines.append(" ".join(line))
        return "\n".join(lines)


@register("corpus", "shakespeare_char")
class ShakespeareChar(StreamDataset):
    """Tiny Shakespeare at character level (as nanoGPT's shakespeare_char): vocabulary = the 65 sorted
    distinct characters; train = first ``train_fraction`` (90%) of the characters, val = the rest.
    ``repeat_fraction``, ``repeat_span``: share of training windows that repeat one span, and how the span is
    chosen (see ``StreamDataset``)."""

    def __init__(self, seq_len: int = 256, root: Path | None = None, *, train_fraction: float = 0.9,
                 cache_dir: str | None = None, download: bool = False, verify: bool = True,
                 repeat_fraction: float = 0.0,
                 repeat_span: str = "half") -> None:
        if not 0.0 < train_fraction < 1.0:
            raise ConfigError(f"data.options.train_fraction must be in (0, 1), got {train_fraction}")
        (path,) = files.corpus_files(root, "tinyshakespeare", ["input.txt"], download, verify)
        text = _read(path)
        self.chars = sorted(set(text))
        self._stoi = {c: i for i, c in enumerate(self.chars)}
        key = files.file_digest(path, str(train_fraction))
        folder = files.cache_dir(cache_dir) / f"shakespeare_char-{key}"
        if not (folder / "val.npy").is_file():
            ids = np.array(self.encode(text))
            n = int(len(ids) * train_fraction)
            files.save_stream(folder / "train.npy", ids[:n], len(self.chars))
            files.save_stream(folder / "val.npy", ids[n:], len(self.chars))   # written last
        super().__init__(_load_streams(folder, ["train", "val"]), len(self.chars), seq_len,
                         repeat_fraction=repeat_fraction, repeat_span=repeat_span)

    def encode(self, text: str) -> list[int]:
        try:
            return [self._stoi[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the Tiny Shakespeare alphabet") from None

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[int(i)] for i in ids)


# Number of BPE tokenizers trained in this process (lets tests check that the cache is reused).
BPE_TRAININGS = 0


def _train_bpe(text: str, vocab_size: int, min_frequency: int, path: Path) -> None:
    """Train a byte-level BPE tokenizer (GPT-2 style pre-tokenisation, 256 byte alphabet) and save it."""
    global BPE_TRAININGS
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(text.splitlines(keepends=True), vocab_size=vocab_size,
                            min_frequency=min_frequency, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    atomic_write(path, lambda tmp: tok.save(tmp))
    BPE_TRAININGS += 1


@register("corpus", "bpe")
class BPECorpus(StreamDataset):
    """Byte-level BPE (HF ``tokenizers``) trained on the train split of ``source``.

    ``source``: "wikitext2" (train/val/test from its files), "shakespeare" or a path to a .txt file (first
    ``train_fraction`` of the characters = train, rest = val). Tokenizer and streams are cached by a hash
    of the source text and the settings. ``word_ppl`` = exp(loss_sum / n_words) with n_words the number
    of whitespace-separated words of the evaluated text (``str.split``; WikiText's ``<eos>`` is not
    counted, as no such token exists in raw text), so it is comparable across tokenizers.
    ``repeat_fraction``, ``repeat_span``: share of training windows that repeat one span, and how the span is
    chosen (see ``StreamDataset``).
    """

    def __init__(self, seq_len: int = 256, root: Path | None = None, *, source: str = "wikitext2",
                 vocab_size: int = 8192, min_frequency: int = 2, train_fraction: float = 0.9,
                 cache_dir: str | None = None, download: bool = False, verify: bool = True,
                 repeat_fraction: float = 0.0,
                 repeat_span: str = "half") -> None:
        if not isinstance(vocab_size, int) or vocab_size < 257:
            raise ConfigError(f"data.options.vocab_size must be an integer >= 257, got {vocab_size!r}")
        if not 0.0 < train_fraction < 1.0:
            raise ConfigError(f"data.options.train_fraction must be in (0, 1), got {train_fraction}")
        if source == "wikitext2":
            paths = files.corpus_files(root, "wikitext-2", ["train.txt", "valid.txt", "test.txt"], download, verify)
            splits = ["train", "val", "test"]
        else:
            if source == "shakespeare":
                paths = files.corpus_files(root, "tinyshakespeare", ["input.txt"], download, verify)
            else:
                paths = [Path(source).expanduser()]
                if not paths[0].is_file():
                    raise files.DataFileNotFoundError(
                        f"data.options.source: text file not found: {paths[0]} (or use 'wikitext2' | "
                        "'shakespeare')")
            splits = ["train", "val"]
        settings = f"bpe-v1|{vocab_size}|{min_frequency}|{train_fraction if len(paths) == 1 else ''}"
        folder = files.cache_dir(cache_dir) / f"bpe-{files.file_digest(*paths, settings)}"
        tok_path, meta_path = folder / "tokenizer.json", folder / "meta.json"
        if not meta_path.is_file():
            if len(paths) == 1:
                text = _read(paths[0])
                cut = int(len(text) * train_fraction)
                texts = [text[:cut], text[cut:]]
            else:
                texts = [_read(p) for p in paths]
            if not tok_path.is_file():
                _train_bpe(texts[0], vocab_size, min_frequency, tok_path)
            self._load_tokenizer(tok_path)
            for split, text in zip(splits, texts):
                files.save_stream(folder / f"{split}.npy", self.encode(text), self.tokenizer.get_vocab_size())
            words = {s: len(t.split()) for s, t in zip(splits, texts)}
            atomic_write_text(meta_path, json.dumps({"words": words, "source": str(source)}))   # marks done
        self._load_tokenizer(tok_path)
        words = json.loads(meta_path.read_text())["words"]
        super().__init__(_load_streams(folder, splits), self.tokenizer.get_vocab_size(), seq_len, words=words,
                         repeat_fraction=repeat_fraction, repeat_span=repeat_span)
        self.cache_folder = folder

    def _load_tokenizer(self, path: Path) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(path))

    def encode(self, text: str) -> list[int]:
        """Byte-level BPE ids; lines are encoded independently (in parallel), so streams match ``encode``."""
        lines = text.splitlines(keepends=True)
        return [i for enc in self.tokenizer.encode_batch(lines) for i in enc.ids]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)
