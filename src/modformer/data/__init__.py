"""Data: algorithmic tasks (registry kind "task") and text corpora (kind "corpus") behind one Dataset API.

``build_dataset(cfg.data)`` looks ``cfg.name`` up among tasks first, then corpora, checks the option
names against the constructor's keyword arguments, and builds it. Importing this package registers
every built-in task and corpus. ``data.pack: true`` (corpora with an EOS separator) makes each batch's
``batch_kwargs`` carry ``document_ids``, so the model's attention never crosses documents.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from modformer import registry
from modformer.data import compose_tasks, shard, tasks, text  # noqa: F401  (registers the built-ins)
from modformer.data.base import IGNORE_INDEX, Dataset, ExampleDataset, StreamDataset
from modformer.data.files import DataFileNotFoundError, default_root, download_corpus
from modformer.registry import ConfigError

if TYPE_CHECKING:
    from modformer.config import DataConfig

__all__ = ["Dataset", "build_dataset", "ExampleDataset", "StreamDataset", "IGNORE_INDEX",
           "DataFileNotFoundError", "default_root", "download_corpus", "dataset_options"]


def _lookup(name: str) -> Callable[..., Dataset]:
    for kind in ("task", "corpus"):
        try:
            return registry.get(kind, name)
        except ConfigError:
            pass
    tasks_, corpora = registry.available("task"), registry.available("corpus")
    raise ConfigError(f"data.name: unknown dataset {name!r}{registry.suggest(str(name), tasks_ + corpora)}; "
                      f"tasks: {', '.join(tasks_)}; corpora: {', '.join(corpora)}")


def dataset_options(name: str) -> dict[str, object]:
    """Option names of dataset ``name`` with their defaults (the keyword-only constructor arguments)."""
    params = inspect.signature(_lookup(name)).parameters
    return {k: p.default for k, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _typed_options(ctor: Callable[..., Dataset], options: dict[str, object]) -> dict[str, object]:
    """``options`` converted to the constructor's annotated types (as config fields are): a wrong type is one
    ConfigError naming data.options.KEY, not a TypeError inside the dataset."""
    import typing

    from modformer.config import coerce

    hints = typing.get_type_hints(ctor.__init__ if inspect.isclass(ctor) else ctor)
    return {k: coerce(v, hints[k], f"data.options.{k}") if k in hints else v for k, v in options.items()}


def build_dataset(cfg: DataConfig) -> Dataset:
    """The task or corpus named by ``cfg.name``, built with ``(cfg.seq_len, cfg.root, **cfg.options)``."""
    ctor = _lookup(cfg.name)
    allowed = dataset_options(cfg.name)
    for key in cfg.options:
        if key not in allowed:
            raise ConfigError(f"unknown option data.options.{key}{registry.suggest(str(key), list(allowed))} "
                              f"for {cfg.name!r}; allowed: {', '.join(allowed)}")
    root = Path(cfg.root).expanduser() if cfg.root else None
    ds = ctor(cfg.seq_len, root, **_typed_options(ctor, cfg.options))
    if getattr(cfg, "pack", False):
        if ds.eos_id is None:
            raise ConfigError(f"data.pack needs a corpus whose stream separates documents with an EOS token; "
                              f"{cfg.name!r} has none (wikitext2 has <eos>)")
        ds.pack = True
    if getattr(cfg, "pad_documents", False):
        if ds.kind != "corpus" or ds.eos_id is None:
            raise ConfigError(f"data.pad_documents needs a corpus whose stream separates documents with an EOS "
                              f"token; {cfg.name!r} has none (wikitext2 has <eos>)")
        if getattr(cfg, "pack", False):
            raise ConfigError("data.pack and data.pad_documents exclude each other: pack several documents into "
                              "a window, or give each document its own padded row")
        ds.pad_documents = True
    return ds
