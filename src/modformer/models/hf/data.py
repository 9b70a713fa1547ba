"""Corpus ``hf_text``: text tokenized by an imported model's own HF tokenizer, so that ``eval``, ``generate``,
``circuits``, ``prune`` and ``lora`` (and fine-tuning configs) read an HF folder like a run folder.

``hf_run_config(path)`` is the run config an HF folder or hub name stands for: its model config, data
``hf_text`` with that tokenizer on WikiText-2 (raw text, tokenized per line), windows of
min(256, max_seq_len) tokens.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from modformer.data import files
from modformer.data.base import StreamDataset
from modformer.registry import ConfigError, register

SOURCES = {"wikitext2": ("wikitext-2", {"train": "train.txt", "val": "valid.txt", "test": "test.txt"}),
           "shakespeare": ("tinyshakespeare", {"train": "input.txt"})}


class _Lazy(Mapping):
    """split -> ``value(split)`` computed on first use: a command that only encodes prompts (generate) never
    reads the corpus, and evaluation tokenizes one split of three."""

    def __init__(self, splits: tuple[str, ...], value: Callable[[str], Any]) -> None:
        self._splits, self._value, self._done = splits, value, {}

    def __getitem__(self, split: str) -> Any:
        if split not in self._done:
            self._done[split] = self._value(split)
        return self._done[split]

    def __iter__(self) -> Iterator[str]:
        return iter(self._splits)

    def __len__(self) -> int:
        return len(self._splits)


@register("corpus", "hf_text")
class HFText(StreamDataset):
    """A text corpus tokenized with ``AutoTokenizer.from_pretrained(tokenizer)`` (an HF folder or hub name).

    ``source``: ``wikitext2`` | ``shakespeare`` (one split, train) from the data folder, or a mapping
    split -> text file; read on first use. ``word_ppl`` comes from whitespace word counts (comparable across
    tokenizers).
    """

    def __init__(self, seq_len: int = 256, root: Path | None = None, *, tokenizer: str | None = None,
                 source: str | dict[str, str] = "wikitext2", cache_dir: str | None = None) -> None:
        from modformer.models.hf import load_tokenizer

        if not tokenizer:
            raise ConfigError("data.options.tokenizer is required for corpus 'hf_text' (an HF folder or hub name)")
        self.tokenizer = load_tokenizer(tokenizer)
        if self.tokenizer is None:
            raise ConfigError(f"data.options.tokenizer: {tokenizer} holds no tokenizer")
        if isinstance(source, dict):
            splits = tuple(source)
        elif source in SOURCES:
            splits = tuple(SOURCES[source][1])
        else:
            raise ConfigError(f"data.options.source: unknown {source!r}; allowed: {', '.join(SOURCES)} or "
                              "a mapping split -> text file")
        self._source, self._root, self._paths, self._cache_dir = source, root, None, cache_dir
        super().__init__(_Lazy(splits, self._stream), len(self.tokenizer), seq_len,
                         words=_Lazy(splits, lambda split: len(self._text(split).split())))

    def _text(self, split: str) -> str:
        return self.paths()[split].read_text(encoding="utf-8")

    def _stream(self, split: str) -> np.ndarray:
        """The split tokenized, cached as .npy keyed by the text file and the tokenizer's full definition."""
        vocab = json.dumps(self.tokenizer.get_vocab(), sort_keys=True)
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        key = files.file_digest(self.paths()[split], type(self.tokenizer).__name__, vocab,
                                backend.to_str() if backend is not None else "")
        path = files.cache_dir(self._cache_dir) / f"hf_text-{key}.npy"
        if not path.is_file():
            files.save_stream(path, self._encode_text(self._text(split)), len(self.tokenizer))
        return files.load_stream(path)

    def paths(self) -> dict[str, Path]:
        """split -> text file (found on first call; a missing file is one clear error)."""
        if self._paths is None:
            if isinstance(self._source, dict):
                paths = {split: Path(p) for split, p in self._source.items()}
            else:
                folder, names = SOURCES[self._source]
                paths = dict(zip(names, files.corpus_files(self._root, folder, list(names.values())), strict=True))
            missing = [str(p) for p in paths.values() if not p.is_file()]
            if missing:
                raise ConfigError(f"data.options.source: no such file {missing[0]}")
            self._paths = paths
        return self._paths

    def _encode_text(self, text: str) -> list[int]:
        lines = text.splitlines(keepends=True)
        ids = self.tokenizer(lines, add_special_tokens=False)["input_ids"] if lines else []
        return [i for line in ids for i in line]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)


def is_hf_folder(path: str | Path) -> bool:
    """A folder whose config.json names an HF ``model_type`` (modformer's own saved configs do not)."""
    try:
        raw = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return False
    return isinstance(raw, dict) and "model_type" in raw


def is_hub_name(name: str | Path) -> bool:
    """``org/name`` or ``name`` that is not an existing path: a hub model id."""
    s = str(name)
    return (not Path(s).exists() and bool(s) and not s.startswith((".", "/", "~")) and s.count("/") <= 1
            and not s.endswith((".yaml", ".yml", ".json")))


def hf_run_config(path: str | Path) -> Any:
    """The RunConfig an HF folder or hub name stands for (model config, ``hf_text`` data with its tokenizer)."""
    from modformer.config import DataConfig, RunConfig, TrainConfig
    from modformer.models.hf import config_from_hf, pretrained_config

    model = config_from_hf(pretrained_config(path)[2])
    p = Path(path)
    return RunConfig(name=p.name, out_dir=str(p.parent), model=model,
                     data=DataConfig(name="hf_text", seq_len=min(256, model.max_seq_len),
                                     options={"tokenizer": str(path)}),
                     train=TrainConfig(batch_size=8, eval_batch_size=8, tensorboard=False))   # large models


def is_hf_address(path: str | Path) -> bool:
    """An HF model folder or a hub name (what the commands accept besides run folders)."""
    return is_hf_folder(path) or is_hub_name(path)
