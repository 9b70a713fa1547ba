"""Cluster shards of a corpus (c-BTM experts train on one each): registry corpus ``cbtm_shard``.

A corpus's training split is cut into documents: its own ``documents(split)`` when it has them
(``taskmix``), else consecutive ``doc_len``-token chunks of the stream. An assignments file
(``assignments.json``: ``{"doc_len": N, "clusters": [c_0, c_1, ...]}``, one id per training document,
written by ``modformer compose cbtm``) says which cluster each document belongs to. Shard ``cluster``
trains on the concatenation of its documents; its other splits are the source corpus's, whole.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from modformer.data.base import Dataset, StreamDataset
from modformer.registry import ConfigError, register


def documents(data: Dataset, split: str, doc_len: int) -> list[np.ndarray]:
    """The documents of ``split``: the corpus's own, or ``doc_len``-token chunks (the tail chunk kept if >= half)."""
    own = getattr(data, "documents", None)
    if own is not None:
        return list(own(split))
    if not isinstance(data, StreamDataset):
        raise ConfigError("c-BTM needs a corpus (a token stream); got a task")
    s = data.stream(split)
    docs = [s[i:i + doc_len] for i in range(0, len(s), doc_len)]
    if len(docs) > 1 and len(docs[-1]) < doc_len // 2:
        docs = docs[:-1]
    return docs


def source_dataset(source: dict[str, Any], seq_len: int, root: Path | None) -> Dataset:
    """Build the corpus a shard draws from: ``source = {name, options}``."""
    from modformer.config import DataConfig
    from modformer.data import build_dataset

    if not isinstance(source, dict) or "name" not in source:
        raise ConfigError("data.options.source must be a mapping with a 'name' (and optional 'options')")
    return build_dataset(DataConfig(name=source["name"], seq_len=seq_len, root=str(root) if root else None,
                                    options=dict(source.get("options") or {})))


@register("corpus", "cbtm_shard")
class ClusterShard(StreamDataset):
    """The training documents of one cluster of ``source``; val/test are the source's."""

    def __init__(self, seq_len: int = 128, root: Path | None = None, *, source: dict[str, Any] | None = None,
                 assignments: str = "", cluster: int = 0) -> None:
        base = source_dataset(source or {}, seq_len, root)
        path = Path(assignments).expanduser()
        if not path.is_file():
            raise ConfigError(f"data.options.assignments: file not found: {path}")
        meta = json.loads(path.read_text())
        docs = documents(base, "train", int(meta["doc_len"]))
        labels = meta["clusters"]
        if len(labels) != len(docs):
            raise ConfigError(f"{path} assigns {len(labels)} documents but the corpus has {len(docs)}")
        mine = [d for d, c in zip(docs, labels) if c == cluster]
        if not mine:
            raise ConfigError(f"data.options.cluster={cluster}: no document is assigned to it")
        streams = {s: base.stream(s) for s in base.splits}
        streams["train"] = np.concatenate(mine).astype(np.int64)
        words = getattr(base, "words", None)
        words = {k: v for k, v in words.items() if k != "train"} if words else None
        super().__init__(streams, base.vocab_size, seq_len, words=words)
        self.source, self.cluster = base, cluster

    def encode(self, text: str) -> list[int]:
        return self.source.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.source.decode(ids)
