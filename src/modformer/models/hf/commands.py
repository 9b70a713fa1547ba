"""``modformer export MODEL --hf OUT``: write any model address (run folder, checkpoint, saved model, HF
folder or hub name) as an HF folder that ``from_pretrained`` loads, with the tokenizer beside it when the
model has one (an HF source's own, or an ``hf_text`` run's)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def _tokenizer_of(source: str) -> Any | None:
    """The HF tokenizer a model address has: an HF folder's own, or the one an ``hf_text`` run trained on."""
    from modformer.models.hf import load_tokenizer
    from modformer.runs import run_config

    try:
        data = run_config(source).data            # an HF folder reads as data hf_text with its own tokenizer
    except FileNotFoundError:                     # a saved model outside any run: no tokenizer known
        return None
    if data.name == "hf_text" and data.options.get("tokenizer"):
        return load_tokenizer(data.options["tokenizer"])
    return None


def cmd_export(args: argparse.Namespace) -> int:
    from modformer.models.hf import save_hf, to_hf
    from modformer.runs import load_any

    model = load_any(args.model)
    to_hf(model, args.family)                     # an unsupported config fails here, before anything is written
    tokenizer = _tokenizer_of(args.model)
    out = save_hf(model, Path(args.hf), tokenizer=tokenizer, overwrite=args.overwrite, family=args.family)
    print(f"wrote {out} ({'with' if tokenizer is not None else 'no'} tokenizer)")
    return 0


def add_parser(sub: Any) -> None:
    e = sub.add_parser("export", help="write a model as an HF folder: modformer export MODEL --hf OUT")
    e.add_argument("model", help="run folder, checkpoint, saved model, HF folder or hub name")
    e.add_argument("--hf", required=True, help="output folder (from_pretrained-loadable)")
    e.add_argument("--family", default=None, choices=["gpt2", "llama", "mistral", "qwen2", "gpt_neox"],
                   help="HF model_type to write (default: the one the config fits)")
    e.add_argument("--overwrite", action="store_true", help="replace OUT if it exists and is not empty")
    e.set_defaults(fn=cmd_export)
