"""Data for composition of experts (issue 10): task-tagged transforms, a task-mixture corpus, key-value arithmetic.

``multitask`` (task): ``TASK x_1..x_L | y_1..y_L`` with y = f_TASK(x) over a shared digit alphabet; the
task token comes first, so a model (or a router) can tell the tasks apart. Loss on y only. The vocabulary
always holds every task token, so datasets of different task subsets share token ids.

``taskmix`` (corpus): documents of ``doc_examples`` consecutive ``multitask`` examples of ONE task each,
concatenated into token streams (the algorithmic-mixture corpus of the c-BTM benchmark);
``documents(split)`` returns them one by one.

``kv_anchor`` / ``kv_aug`` / ``kv_arith`` (tasks): the CALM key-value arithmetic experiment (Bansal et al.
2024). ``n_keys`` keys (strings of ``key_len`` letters) have random values in [0, p). Numbers are single
tokens. The three share one vocabulary and one template of ``2 * key_len + 2`` tokens:

- ``kv_anchor``: ``_ _ x + _ _ y =`` -> (x + y) mod p (``modular: false``: x + y, tokens up to 2p - 2),
  numbers right-aligned in key-sized slots (no keys).
- ``kv_aug``: streams of ``key value`` records and filler operators at random offsets; loss on each value
  (the augmenting model memorises every key's value, and knows no arithmetic).
- ``kv_arith``: ``a1 a2 a3 + b1 b2 b3 =`` -> value(a) + value(b) (mod p when ``modular``). Split by key:
  ``train`` uses the first ``train_keys`` fraction of keys only, ``val`` only the others (both keys held out).
- ``kv_mix``: the ``kv_anchor`` and ``kv_aug`` examples together, for one shared base model that the anchor
  and the augmenting model are then fine-tuned from (as CALM's PaLM2 models share their pre-training).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from modformer.data.base import IGNORE_INDEX, ExampleDataset, StreamDataset
from modformer.data.tasks import _need, _uniform_rows
from modformer.registry import register


def _cumsum(x: Tensor, n: int) -> Tensor:
    return x.cumsum(1) % n


TRANSFORMS: dict[str, Callable[[Tensor, int], Tensor]] = {   # (N, L) digits -> (N, L) digits
    "copy": lambda x, n: x,
    "reverse": lambda x, n: x.flip(1),
    "sort": lambda x, n: x.sort(1).values,
    "increment": lambda x, n: (x + 1) % n,
    "cumsum": _cumsum,
}
TASK_NAMES = tuple(TRANSFORMS)


def multitask_symbols(n_symbols: int) -> list[str]:
    """Digits, the separator '|', then one token per task ('<copy>', ...)."""
    return [str(i) for i in range(n_symbols)] + ["|"] + [f"<{t}>" for t in TASK_NAMES]


def window_offset(task: str, n_symbols: int, window: int) -> int:
    """First digit of ``task``'s input window: windows spread evenly over the alphabet in TASK_NAMES order."""
    return round(TASK_NAMES.index(task) * (n_symbols - window) / (len(TASK_NAMES) - 1))


def multitask_examples(task: str, n: int, length: int, n_symbols: int, g: torch.Generator,
                       window: int | None = None) -> Tensor:
    """(n, 2L+2) sequences ``TASK x | f(x)`` of one task, distinct x; with ``window`` the inputs use only
    ``window`` consecutive digits (each task its own, overlapping, range: domains that differ in content)."""
    _need(task in TRANSFORMS, f"tasks: unknown {task!r}; allowed: {', '.join(TASK_NAMES)}")
    if window is None:
        x = _uniform_rows(n, length, n_symbols, g)                                # (n, L)
    else:
        _need(1 <= window <= n_symbols, f"window must be in [1, n_symbols={n_symbols}], got {window}")
        x = _uniform_rows(n, length, window, g) + window_offset(task, n_symbols, window)
    tag = torch.full((n, 1), n_symbols + 1 + TASK_NAMES.index(task))
    sep = torch.full((n, 1), n_symbols)
    return torch.cat([tag, x, sep, TRANSFORMS[task](x, n_symbols)], 1)


def task_of(x: Tensor, n_symbols: int) -> Tensor:
    """Index into TASK_NAMES of each ``multitask`` input row x (B, T) (from its first token)."""
    return x[:, 0] - (n_symbols + 1)


def set_splits(ds: ExampleDataset, parts: dict[str, tuple[Tensor, Tensor]], symbols: list[str]) -> None:
    """Give an ExampleDataset fixed splits: {split: (seqs (N, T+1), answer mask (N, T+1))}."""
    ds._x, ds._y = {}, {}
    for split, (seqs, answer) in parts.items():
        ds._x[split] = seqs[:, :-1].contiguous()
        ds._y[split] = seqs[:, 1:].masked_fill(~answer[:, 1:], IGNORE_INDEX).contiguous()
    ds._set_symbols(symbols)


@register("task", "multitask")
class MultiTask(ExampleDataset):
    """Task-tagged sequence transforms (copy, reverse, sort, increment, cumsum) of ``length`` digits;
    ``n_examples`` per task (``window``: per-task input digit ranges); loss on the transformed half. Each
    task's examples and train/val split depend on (seed, task) only, so a task's val examples are never
    in another subset's train split."""

    def __init__(self, seq_len: int = 0, root: Path | None = None, *, tasks: list[str] | None = None,
                 length: int = 6, n_symbols: int = 10, n_examples: int = 2000, train_fraction: float = 0.9,
                 window: int | None = None, seed: int = 0) -> None:
        tasks = list(tasks or TASK_NAMES)
        _need(length >= 1 and n_symbols >= 2, f"length ({length}) >= 1 and n_symbols ({n_symbols}) >= 2")
        _need(0.0 < train_fraction < 1.0, f"train_fraction must be in (0, 1), got {train_fraction}")
        parts: dict[str, list[Tensor]] = {"train": [], "val": []}
        for t in tasks:
            _need(t in TRANSFORMS, f"tasks: unknown {t!r}; allowed: {', '.join(TASK_NAMES)}")
            g = torch.Generator().manual_seed(seed * 1000 + TASK_NAMES.index(t))
            seqs = multitask_examples(t, n_examples, length, n_symbols, g, window)
            seqs = seqs[torch.randperm(len(seqs), generator=g)]
            n_train = max(1, int(len(seqs) * train_fraction))
            parts["train"].append(seqs[:n_train])
            parts["val"].append(seqs[n_train:])
        self.tasks, self.n_symbols, self.length = tasks, n_symbols, length
        split_parts = {}
        for split, chunks in parts.items():
            seqs = torch.cat(chunks)
            answer = torch.zeros_like(seqs, dtype=torch.bool)
            answer[:, length + 2:] = True
            split_parts[split] = (seqs, answer)
        set_splits(self, split_parts, multitask_symbols(n_symbols))


@register("corpus", "taskmix")
class TaskMix(StreamDataset):
    """Token streams of single-task documents (``doc_examples`` ``multitask`` examples each)."""

    def __init__(self, seq_len: int = 128, root: Path | None = None, *, tasks: list[str] | None = None,
                 length: int = 6, n_symbols: int = 10, doc_examples: int = 32, train_docs: int = 400,
                 val_docs: int = 40, seed: int = 0) -> None:
        tasks = list(tasks or TASK_NAMES)
        g = torch.Generator().manual_seed(seed)
        self.doc_len = doc_examples * (2 * length + 2)
        self._docs: dict[str, list[np.ndarray]] = {}
        self.doc_tasks: dict[str, list[str]] = {}
        for split, n in (("train", train_docs), ("val", val_docs)):
            which = torch.randint(len(tasks), (n,), generator=g).tolist()
            self.doc_tasks[split] = [tasks[i] for i in which]
            self._docs[split] = [multitask_examples(tasks[i], doc_examples, length, n_symbols, g).flatten().numpy()
                                 for i in which]
        self.symbols = multitask_symbols(n_symbols)
        streams = {s: np.concatenate(d).astype(np.int64) for s, d in self._docs.items()}
        super().__init__(streams, len(self.symbols), seq_len)

    def documents(self, split: str) -> list[np.ndarray]:
        self._check_split(split)
        return self._docs[split]

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.symbols[int(i)] for i in ids)


# ---------------------------------------------------------------------------------------------------
# CALM key-value arithmetic

class _KeyValue(ExampleDataset):
    """Shared vocabulary and key table of the kv_* tasks: numbers 0..p-1, letters, '_', '+', '='."""

    def _keys(self, p: int, n_keys: int, key_len: int, n_letters: int, seed: int, modular: bool) -> None:
        _need(n_letters ** key_len >= n_keys, f"n_keys ({n_keys}) exceeds n_letters ** key_len "
              f"({n_letters ** key_len})")
        _need(p >= 2, f"p must be >= 2, got {p}")
        g = torch.Generator().manual_seed(seed + 12345)      # the key table depends on `seed` only
        nums = p if modular else 2 * p - 1                                    # number tokens: values and sums
        self.keys = _uniform_rows(n_keys, key_len, n_letters, g) + nums       # (K, key_len) letter tokens
        self.values = torch.randint(p, (n_keys,), generator=g)                # (K,)
        self.p, self.modular, self.key_len, self.width = p, modular, key_len, 2 * key_len + 2
        self.pad, self.plus, self.eq = nums + n_letters, nums + n_letters + 1, nums + n_letters + 2
        self.kv_symbols = ([str(i) for i in range(nums)] + [chr(ord("a") + i) if i < 26 else f"l{i}"
                                                              for i in range(n_letters)] + ["_", "+", "="])

    def add(self, a: Tensor, b: Tensor) -> Tensor:
        return (a + b) % self.p if self.modular else a + b

    def _expression(self, left: Tensor, right: Tensor, answer: Tensor) -> tuple[Tensor, Tensor]:
        """(N, key_len) slots -> ``left + right = answer`` (N, width + 1), loss on the answer."""
        n = left.shape[0]
        seqs = torch.cat([left, torch.full((n, 1), self.plus), right, torch.full((n, 1), self.eq),
                          answer[:, None]], 1)
        mask = torch.zeros_like(seqs, dtype=torch.bool)
        mask[:, -1] = True
        return seqs, mask


@register("task", "kv_anchor")
class KVAnchor(_KeyValue):
    """``_ _ x + _ _ y =`` -> (x + y) mod p over all p^2 number pairs (the anchor's arithmetic)."""

    def __init__(self, seq_len: int = 0, root: Path | None = None, *, p: int = 97, n_keys: int = 300,
                 key_len: int = 3, n_letters: int = 8, train_fraction: float = 0.8, modular: bool = True,
                 seed: int = 0) -> None:
        self._keys(p, n_keys, key_len, n_letters, seed, modular)
        a, b = torch.cartesian_prod(torch.arange(p), torch.arange(p)).unbind(1)
        pad = torch.full((p * p, key_len - 1), self.pad)
        seqs, mask = self._expression(torch.cat([pad, a[:, None]], 1), torch.cat([pad, b[:, None]], 1), self.add(a, b))
        self._setup(seqs, mask, self.kv_symbols, train_fraction, torch.Generator().manual_seed(seed))


@register("task", "kv_aug")
class KVAugment(_KeyValue):
    """Streams of ``width + 1`` tokens: ``key value`` records and single filler tokens ('_', '+', '=')
    at random offsets; loss on every value (the augmenting model's key -> value memory)."""

    def __init__(self, seq_len: int = 0, root: Path | None = None, *, p: int = 97, n_keys: int = 300,
                 key_len: int = 3, n_letters: int = 8, n_examples: int = 20000, train_fraction: float = 0.95,
                 modular: bool = True, seed: int = 0) -> None:
        self._keys(p, n_keys, key_len, n_letters, seed, modular)
        g = torch.Generator().manual_seed(seed)
        length = self.width + 1
        fillers = [self.pad, self.plus, self.eq]
        coin = torch.rand(n_examples, length, generator=g).tolist()        # drawn in bulk: fast for 1e5 rows
        pick = torch.randint(n_keys, (n_examples, length), generator=g).tolist()
        fill = torch.randint(3, (n_examples, length), generator=g).tolist()
        keys, values = self.keys.tolist(), self.values.tolist()
        rows, masks = [], []
        for i in range(n_examples):
            row: list[int] = []
            mask: list[bool] = []
            for j in range(length):
                if len(row) >= length:
                    break
                if len(row) + key_len + 1 <= length and coin[i][j] < 0.6:
                    row += keys[pick[i][j]] + [values[pick[i][j]]]
                    mask += [False] * key_len + [True]
                else:
                    row.append(fillers[fill[i][j]])
                    mask.append(False)
            rows.append(row)
            masks.append(mask)
        self._setup(torch.tensor(rows), torch.tensor(masks), self.kv_symbols, train_fraction, g)


@register("task", "kv_arith")
class KVArith(_KeyValue):
    """``a1 a2 a3 + b1 b2 b3 =`` -> (value(a) + value(b)) mod p; train on pairs of the first
    ``train_keys`` fraction of keys, val on pairs of the held-out keys (``n_examples`` / ``n_val`` pairs)."""

    def __init__(self, seq_len: int = 0, root: Path | None = None, *, p: int = 97, n_keys: int = 300,
                 key_len: int = 3, n_letters: int = 8, train_keys: float = 0.5, n_examples: int = 20000,
                 n_val: int = 2000, modular: bool = True, seed: int = 0) -> None:
        self._keys(p, n_keys, key_len, n_letters, seed, modular)
        n_train = int(round(n_keys * train_keys))
        _need(0 < n_train < n_keys, f"train_keys={train_keys} must leave keys on both sides")
        g = torch.Generator().manual_seed(seed + 1)
        parts = {}
        for split, ids, n in (("train", torch.arange(n_train), n_examples),
                              ("val", torch.arange(n_train, n_keys), n_val)):
            n = min(n, len(ids) ** 2)
            pairs = ids[_uniform_rows(n, 2, len(ids), g)]                          # (n, 2) key indices
            answer = self.add(self.values[pairs[:, 0]], self.values[pairs[:, 1]])
            parts[split] = self._expression(self.keys[pairs[:, 0]], self.keys[pairs[:, 1]], answer)
        self.n_train_keys = n_train
        set_splits(self, parts, self.kv_symbols)


@register("task", "kv_mix")
class KVMix(_KeyValue):
    """``kv_anchor`` + ``kv_aug`` examples in one task (both splits), in the shared vocabulary and template."""

    def __init__(self, seq_len: int = 0, root: Path | None = None, *, p: int = 97, n_keys: int = 300,
                 key_len: int = 3, n_letters: int = 8, n_examples: int = 20000, modular: bool = True,
                 seed: int = 0) -> None:
        common = {"p": p, "n_keys": n_keys, "key_len": key_len, "n_letters": n_letters, "modular": modular,
                  "seed": seed}
        parts = [KVAnchor(**common), KVAugment(**common, n_examples=n_examples)]
        self._keys(p, n_keys, key_len, n_letters, seed, modular)
        self._x = {s: torch.cat([d._x[s] for d in parts]) for s in ("train", "val")}
        self._y = {s: torch.cat([d._y[s] for d in parts]) for s in ("train", "val")}
        self._set_symbols(self.kv_symbols)
