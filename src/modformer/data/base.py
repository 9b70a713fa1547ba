"""The Dataset contract plus its two shapes: in-memory example sets (tasks) and token streams (corpora).

Every batch is ``x (B, T)`` int64 token ids and ``y (B, T)`` int64 next-token targets with
``IGNORE_INDEX`` (-100, the default ``ignore_index`` of ``F.cross_entropy``) where no loss is taken.
Random batches use only the caller's ``torch.Generator`` so a saved generator state resumes exactly.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from modformer.registry import ConfigError

IGNORE_INDEX = -100


class Dataset(abc.ABC):
    """Source of (x, y) batches: x (B, T) int64 token ids, y (B, T) int64 targets with -100 where no loss."""

    vocab_size: int
    seq_len: int            # T of every batch
    kind: str               # "task" or "corpus"
    splits: tuple[str, ...] = ("train", "val")
    eos_id: int | None = None   # the stream's document separator, if it has one
    pack: bool = False          # ``data.pack``: windows hold several documents; attention stays inside each
    pad_documents: bool = False  # ``data.pad_documents``: one document per row, right-padded

    def batch_kwargs(self, x: Tensor, y: Tensor | None = None) -> dict[str, Tensor]:
        """Model inputs besides ``x``: with ``pack``, ``document_ids`` (a document begins at its EOS separator,
        which acts as its BOS, so every target is predicted from inside one document); with ``pad_documents``,
        ``attention_mask`` (1 on real tokens: in a padded row exactly the positions with a target); else none."""
        if self.pad_documents and y is not None:
            return {"attention_mask": (y != IGNORE_INDEX).long()}
        if not self.pack:
            return {}
        from modformer.layers.attention.masks import document_ids

        return {"document_ids": document_ids(x, self.eos_id)}

    def eval_rows(self, split: str, stride: int = 0) -> int:
        """How many rows ``iter_eval(split, ...)`` yields in all (progress totals)."""
        return self.split_size(split)

    @abc.abstractmethod
    def get_batch(self, split: str, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Random batch drawn ONLY with `generator` (so saving generator.get_state() makes resume exact).
        batch_size <= 0 means the whole split (tasks; full-batch training). For corpora: random windows."""

    @abc.abstractmethod
    def iter_eval(self, split: str, batch_size: int, max_batches: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """Deterministic evaluation batches; max_batches=0 means the full split."""

    @abc.abstractmethod
    def metrics(self, loss_sum: float, n_targets: int, n_correct: int) -> dict[str, float]:
        """Split-level metrics from summed token NLL, target count and correct argmax predictions."""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``."""

    @abc.abstractmethod
    def decode(self, ids: list[int]) -> str:
        """Text of token ids."""

    @abc.abstractmethod
    def split_size(self, split: str) -> int:
        """Number of examples (tasks) or tokens (corpora) in ``split``."""

    def _check_split(self, split: str) -> None:
        if split not in self.splits:
            raise ConfigError(f"unknown split {split!r}; allowed: {', '.join(self.splits)}")


def _base_metrics(loss_sum: float, n_targets: int, n_correct: int) -> dict[str, float]:
    n = max(n_targets, 1)
    return {"loss": loss_sum / n, "acc": n_correct / n}


def _safe_exp(v: float) -> float:
    return math.exp(v) if v < 700 else float("inf")


class ExampleDataset(Dataset):
    """A task: a fixed pool of sequences, split train/val by a seeded permutation, held as tensors.

    Subclasses build ``seqs (N, T+1)`` and a boolean ``answer (N, T+1)`` marking the tokens to predict,
    then call ``_setup``; x = seqs[:, :-1], y = seqs[:, 1:] with non-answer targets set to -100.
    """

    kind = "task"

    def _setup(self, seqs: Tensor, answer: Tensor, symbols: list[str], train_fraction: float,
               generator: torch.Generator) -> None:
        if not 0.0 < train_fraction <= 1.0:
            raise ConfigError(f"data.options.train_fraction must be in (0, 1], got {train_fraction}")
        n = seqs.shape[0]
        n_train = int(n * train_fraction)
        if n_train < 1:
            raise ConfigError(f"data.options.train_fraction={train_fraction} leaves no training examples")
        x = seqs[:, :-1].contiguous()                                          # (N, T)
        y = seqs[:, 1:].masked_fill(~answer[:, 1:], IGNORE_INDEX).contiguous()  # (N, T)
        perm = torch.randperm(n, generator=generator)
        self._x = {"train": x[perm[:n_train]], "val": x[perm[n_train:]]}
        self._y = {"train": y[perm[:n_train]], "val": y[perm[n_train:]]}
        self._set_symbols(symbols)

    def _set_symbols(self, symbols: list[str]) -> None:
        """Vocabulary and sequence length, once the split tensors ``_x`` / ``_y`` are in place."""
        self.symbols = symbols
        self._stoi = {s: i for i, s in enumerate(symbols)}
        self.vocab_size = len(symbols)
        self.seq_len = next(iter(self._x.values())).shape[1]

    def get_batch(self, split: str, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        self._check_split(split)
        x, y = self._x[split], self._y[split]
        if batch_size <= 0:
            return x, y
        n = x.shape[0]
        if batch_size <= n:   # distinct examples within a batch
            idx = torch.randperm(n, generator=generator)[:batch_size]
        else:
            idx = torch.randint(n, (batch_size,), generator=generator)
        return x[idx], y[idx]

    def iter_eval(self, split: str, batch_size: int, max_batches: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        self._check_split(split)
        x, y = self._x[split], self._y[split]
        step = batch_size if batch_size > 0 else max(x.shape[0], 1)
        for k, i in enumerate(range(0, x.shape[0], step)):
            if max_batches and k >= max_batches:
                return
            yield x[i:i + step], y[i:i + step]

    def metrics(self, loss_sum: float, n_targets: int, n_correct: int) -> dict[str, float]:
        return _base_metrics(loss_sum, n_targets, n_correct)

    def encode(self, text: str) -> list[int]:
        """Whitespace-separated symbols -> ids (e.g. "3 5 =")."""
        try:
            return [self._stoi[s] for s in text.split()]
        except KeyError as e:
            raise ValueError(f"unknown symbol {e.args[0]!r} for this task") from None

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.symbols[int(i)] for i in ids)

    def answer_length(self) -> int:
        """Tokens of one answer (those the loss is taken on): what ``generate`` adds after a task prompt."""
        y = next(v for v in (*self._y.values(), None) if v is None or len(v))
        return int((y[0] != IGNORE_INDEX).sum()) if y is not None else 1

    def split_size(self, split: str) -> int:
        self._check_split(split)
        return int(self._x[split].shape[0])


def random_repeat_offsets(offsets: np.ndarray, repeat: np.ndarray, generator: torch.Generator,
                          min_len: int = 8) -> np.ndarray:
    """Window offsets ``(B, W)`` where each ``repeat`` row reads a span [a, a+m) again at [b, b+m), b >= a+m:
    m, a and b uniform over what fits (m <= W/2); other rows unchanged."""
    out = np.array(offsets)
    w = out.shape[1]
    min_len = min(min_len, w // 2)
    for row in np.flatnonzero(repeat):
        u = torch.rand(3, generator=generator).tolist()
        m = min_len + int(u[0] * (w // 2 - min_len + 1))
        a = int(u[1] * (w - 2 * m + 1))
        b = a + m + int(u[2] * (w - a - 2 * m + 1))
        out[row, b:b + m] = out[row, a:a + m]
    return out


class StreamDataset(Dataset):
    """A corpus: one 1-D token stream per split (usually a memory-mapped .npy), read in windows.

    Training batches are random windows x = s[i:i+T], y = s[i+1:i+T+1]; with ``repeat_fraction`` p > 0,
    each training window is, with probability p, one span of the text written twice: in-context repetition that
    a small corpus has too little of for induction heads to beat memorisation (issue 9). ``repeat_span``
    ``half``: the window is s[i:i+m] s[i:i+m], m = ceil((T+1)/2), so the copy is always m tokens back (a
    position-only head can exploit that); ``random``: a span of random length 8 <= m <= (T+1)/2 at a random
    place of the natural window is written again at a random later place, so only content-based matching
    (induction) predicts the copy. Evaluation covers a split with
    consecutive non-overlapping windows; the last one is padded (x with 0, y with -100), so every token
    after the first is predicted exactly once.

    ``words`` (split -> whitespace word count of that split's text), when set, adds ``word_ppl`` =
    exp(loss_sum / n_words). A partial evaluation (max_batches) counts words in proportion to the
    targets it covered. ``metrics`` uses the split of the most recent ``iter_eval`` unless told.
    """

    kind = "corpus"

    def __init__(self, streams: dict[str, np.ndarray], vocab_size: int, seq_len: int,
                 words: dict[str, int] | None = None, repeat_fraction: float = 0.0,
                 repeat_span: str = "half") -> None:
        if seq_len <= 0:
            raise ConfigError(f"data.seq_len must be a positive integer, got {seq_len}")
        if not 0.0 <= repeat_fraction < 1.0:
            raise ConfigError(f"data.options.repeat_fraction must be in [0, 1), got {repeat_fraction}")
        if repeat_span not in ("half", "random"):
            raise ConfigError(f"data.options.repeat_span must be 'half' or 'random', got {repeat_span!r}")
        self.repeat_fraction = repeat_fraction
        self.repeat_span = repeat_span
        self._streams = streams
        self.splits = tuple(streams)
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.words = words
        self._last_eval_split: str | None = None

    def stream(self, split: str) -> np.ndarray:
        """The raw token stream of ``split`` (N,)."""
        self._check_split(split)
        return self._streams[split]

    def document_rows(self, split: str) -> np.ndarray:
        """``(R, 2)`` [start, length] of the rows of ``data.pad_documents``: each document (from its leading EOS
        separator, which acts as its BOS, to the next one) cut into pieces of at most ``seq_len`` inputs, so every
        target after the stream's first token belongs to exactly one row."""
        cache = self.__dict__.setdefault("_document_rows", {})
        if split not in cache:
            s, t = self.stream(split), self.seq_len
            bounds = np.unique(np.concatenate([[0], np.flatnonzero(s == self.eos_id), [len(s) - 1]]))
            lengths = np.diff(bounds)
            lengths = lengths[lengths > 0]
            pieces = -(-lengths // t)                                       # ceil: rows per document
            first = np.repeat(bounds[:-1][np.diff(bounds) > 0], pieces)
            k = np.arange(pieces.sum()) - np.repeat(np.cumsum(pieces) - pieces, pieces)  # piece index in its doc
            start = first + k * t
            end = np.repeat(bounds[1:][np.diff(bounds) > 0], pieces)
            cache[split] = np.stack([start, np.minimum(end - start, t)], 1).astype(np.int64)
        return cache[split]

    def _padded_rows(self, split: str, rows: np.ndarray) -> tuple[Tensor, Tensor]:
        """x right-padded with 0 and y with IGNORE_INDEX for document rows ``rows`` ``(B, 2)``."""
        s, t = self.stream(split), self.seq_len
        pos = rows[:, :1] + np.arange(t + 1)                                # (B, T+1)
        real = np.arange(t + 1) <= rows[:, 1:]                              # inputs 0..L-1, targets 1..L
        chunk = torch.from_numpy(s[np.minimum(pos, len(s) - 1)].astype(np.int64))
        x = chunk[:, :-1].masked_fill(~torch.from_numpy(real[:, 1:]), 0)
        y = chunk[:, 1:].masked_fill(~torch.from_numpy(real[:, 1:]), IGNORE_INDEX)
        return x.contiguous(), y.contiguous()

    def get_batch(self, split: str, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        s, t = self.stream(split), self.seq_len
        if batch_size <= 0:
            raise ConfigError("batch_size <= 0 (full batch) is for tasks; corpora need batch_size > 0")
        if self.pad_documents:
            rows = self.document_rows(split)
            return self._padded_rows(split, rows[torch.randint(len(rows), (batch_size,), generator=generator).numpy()])
        if len(s) <= t:
            raise ConfigError(f"data.seq_len={t} is too long for split {split!r} of {len(s)} tokens")
        ix = torch.randint(len(s) - t, (batch_size,), generator=generator).numpy()
        offsets = np.broadcast_to(np.arange(t + 1), (batch_size, t + 1))
        if split == "train" and self.repeat_fraction > 0:
            # a share of the windows holds one span of the text twice: [a b c ... a b c ...]
            repeat = (torch.rand(batch_size, generator=generator) < self.repeat_fraction).numpy()
            if self.repeat_span == "half":
                offsets = np.where(repeat[:, None], np.arange(t + 1) % ((t + 2) // 2), offsets)
            else:
                offsets = random_repeat_offsets(offsets, repeat, generator)
        chunk = torch.from_numpy(s[ix[:, None] + offsets].astype(np.int64))  # (B, T+1)
        return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()

    def iter_eval(self, split: str, batch_size: int, max_batches: int = 0,
                  stride: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """Windows covering ``split`` so that every target is scored exactly once.

        ``stride`` 0 (or >= seq_len): non-overlapping windows, the average token sees T/2 of context.
        ``0 < stride < seq_len``: sliding windows every ``stride`` tokens; each window after the first
        scores only its last ``stride`` targets, so every scored token (past the first window) sees at
        least T - stride tokens of context (the strided protocol of HF's perplexity guide).
        """
        s, t = self.stream(split), self.seq_len
        if stride < 0:
            raise ConfigError(f"evaluation stride must be >= 0, got {stride}")
        stride = t if stride == 0 or stride >= t else stride
        self._last_eval_split = split
        if self.pad_documents:
            if stride < t:
                raise ConfigError("evaluation stride is for windows of a stream; data.pad_documents scores each "
                                  "document in its own rows (set train.eval_stride=0)")
            rows = self.document_rows(split)
            step = batch_size if batch_size > 0 else max(len(rows), 1)
            for k, i in enumerate(range(0, len(rows), step)):
                if max_batches and k >= max_batches:
                    return
                yield self._padded_rows(split, rows[i:i + step])
            return
        n = len(s)
        # windows start every `stride` tokens until one reaches the last target
        starts = np.arange(0, max(n - 1 - t, 0) + stride, stride) if n > 1 else np.arange(0)
        step = batch_size if batch_size > 0 else max(len(starts), 1)
        for k, i in enumerate(range(0, len(starts), step)):
            if max_batches and k >= max_batches:
                return
            first = starts[i:i + step, None]
            pos = first + np.arange(t + 1)                                          # (b, T+1)
            chunk = torch.from_numpy(s[np.minimum(pos, n - 1)].astype(np.int64))
            inside = torch.from_numpy(pos < n)
            new = torch.from_numpy((pos > first + t - stride) | (first == 0))       # not scored by an earlier window
            x = chunk[:, :-1].masked_fill(~inside[:, :-1], 0)
            y = chunk[:, 1:].masked_fill(~(inside & new)[:, 1:], IGNORE_INDEX)
            yield x, y

    def metrics(self, loss_sum: float, n_targets: int, n_correct: int, split: str | None = None,
                ) -> dict[str, float]:
        out = _base_metrics(loss_sum, n_targets, n_correct)
        out["ppl"] = _safe_exp(out["loss"])
        split = split or self._last_eval_split or "val"
        if self.words is not None and split in self.words and n_targets > 0:
            n_words = self.words[split] * n_targets / max(len(self._streams[split]) - 1, 1)
            out["word_ppl"] = _safe_exp(loss_sum / max(n_words, 1e-9))
        return out

    def encode(self, text: str) -> list[int]:
        """Pre-tokenized streams: whitespace-separated integer ids (corpora override with their tokenizer)."""
        return [int(t) for t in text.split()]

    def decode(self, ids: list[int]) -> str:
        return " ".join(str(int(i)) for i in ids)

    def split_size(self, split: str) -> int:
        return len(self.stream(split))

    def eval_rows(self, split: str, stride: int = 0) -> int:
        if self.pad_documents:
            return len(self.document_rows(split))
        n, t = self.split_size(split), self.seq_len
        stride = stride if 0 < stride < t else t
        return 1 + max(0, math.ceil((n - 1 - t) / stride))
