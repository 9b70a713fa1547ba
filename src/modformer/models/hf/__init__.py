"""Hugging Face interop for GPT-2, Llama, Mistral, Qwen2 and GPT-NeoX/Pythia: ``from_hf``, ``to_hf``,
``load_pretrained``, ``load_tokenizer``, ``save_hf``.

One module per family (``gpt2``, ``llama`` for Llama / Mistral / Qwen2, ``neox``) gives the config
mapping both ways and the weight pairs; this module dispatches on HF's ``model_type`` (import) or on our
config (export: learned positions -> GPT-2, RoPE + RMSNorm -> Llama / Mistral / Qwen2, RoPE + LayerNorm ->
GPT-NeoX). Only configurations both sides compute identically are converted; anything else raises one
``ValueError`` line naming the option. ``transformers`` is imported only when these functions run.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from modformer.config import ModelConfig
from modformer.models.gpt import GPT
from modformer.models.hf import gpt2, llama, neox
from modformer.models.hf.common import check_coverage, check_tied, copy_pairs, new_hf_model, resolve
from modformer.saving import build_model, unwrap

__all__ = ["from_hf", "to_hf", "load_pretrained", "load_tokenizer", "save_hf", "config_from_hf", "FAMILIES"]

_MODULES = (gpt2, llama, neox)
FAMILIES: dict[str, ModuleType] = {t: m for m in _MODULES for t in m.MODEL_TYPES}


def _family(model_type: str | None, what: str = "cannot import HF model") -> ModuleType:
    if model_type not in FAMILIES:
        raise ValueError(f"{what}: model_type {model_type!r} is not supported (supported: {', '.join(FAMILIES)})")
    return FAMILIES[model_type]


def config_from_hf(hf_config: Any) -> ModelConfig:
    """The ModelConfig equal to an HF config of a supported family (ValueError names what is not)."""
    return _family(getattr(hf_config, "model_type", None)).config_from_hf(hf_config)


def from_hf(hf_model: nn.Module) -> GPT:
    """A modformer GPT computing the same logits as an HF causal LM (same dtype, device and mode)."""
    config = getattr(hf_model, "config", None)
    if config is None or not hasattr(hf_model, "get_input_embeddings"):
        raise TypeError(f"expected a transformers causal LM, got {type(hf_model).__name__}")
    family = _family(getattr(config, "model_type", None))
    cfg = family.config_from_hf(config)
    check_tied(hf_model, cfg.tie_embeddings)
    model = build_model(cfg)
    pairs = family.pairs(model, hf_model)
    check_coverage(pairs, model, hf_model, config.model_type)
    copy_pairs(pairs, to_ours=True)
    ref = hf_model.get_input_embeddings().weight
    return model.to(device=ref.device, dtype=ref.dtype).train(hf_model.training)


def export_family(cfg: ModelConfig) -> str:
    """The HF model_type a modformer config exports to; ValueError when none fits."""
    if cfg.position == "learned":
        return "gpt2"
    if cfg.position == "rope" and cfg.norm == "rmsnorm":
        return llama.family_of(cfg)
    if cfg.position == "rope" and cfg.norm == "layernorm":
        return "gpt_neox"
    raise ValueError(f"cannot export to HF: model.position={cfg.position!r} with model.norm={cfg.norm!r} fits no "
                     "supported family (gpt2: learned + layernorm; llama / mistral / qwen2: rope + rmsnorm; "
                     "gpt_neox: rope + layernorm)")


def to_hf(model: nn.Module, family: str | None = None) -> nn.Module:
    """An HF causal LM with the same weights, dtype, device and mode.

    ``family`` (an HF model_type) forces the target; by default ``export_family`` picks it. Raises
    ValueError naming the config field if the model has no exact HF counterpart.
    """
    model = unwrap(model)
    if not isinstance(model, GPT):
        raise ValueError(f"cannot export to HF: {type(model).__name__} is not a modformer GPT")
    module = _family(family or export_family(model.cfg), "cannot export to HF")
    if family is not None and module is llama and llama.family_of(model.cfg) != family:
        raise ValueError(f"cannot export to HF {family}: the config fits {llama.family_of(model.cfg)}")
    config_cls, model_cls, kwargs = module.hf_config(model.cfg)
    hf = new_hf_model(config_cls, model_cls, kwargs)
    check_tied(hf, model.cfg.tie_embeddings)
    pairs = module.pairs(model, hf)
    check_coverage(pairs, model, hf, hf.config.model_type)
    copy_pairs(pairs, to_ours=False)
    ref = model.tok_emb.weight
    return hf.to(device=ref.device, dtype=ref.dtype).train(model.training)


def pretrained_config(name_or_path: str | Path) -> tuple[str, dict[str, Any], Any]:
    """(path or repo id, ``from_pretrained`` kwargs, HF config) of a folder or hub name; failures are one line."""
    from transformers import AutoConfig

    path, extra = resolve(name_or_path)
    try:
        return path, extra, AutoConfig.from_pretrained(path, **extra)
    except OSError as e:                                     # not on the hub, gated, no config.json: HF's first line
        raise FileNotFoundError(f"{name_or_path}: {str(e).strip().splitlines()[0]}") from None


def load_pretrained(name_or_path: str | Path = "gpt2", **kwargs: Any) -> GPT:
    """``AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)`` converted by ``from_hf``.

    A folder written by ``save_pretrained`` or a hub name (network or the HF cache; offline, an uncached name
    fails at once with one line). The family is checked from config.json before any weight is read. Loads
    in float32 unless ``dtype`` is given; never runs repository code (``trust_remote_code`` stays off).
    """
    from transformers import AutoModelForCausalLM

    path, extra, config = pretrained_config(name_or_path)
    config_from_hf(config)                                   # unsupported family / option: fail before loading
    kwargs.setdefault("dtype", torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(path, config=config, **extra, **kwargs)
    return from_hf(hf.eval())


def load_tokenizer(name_or_path: str | Path) -> Any | None:
    """``AutoTokenizer.from_pretrained`` for a model folder or hub name; None when it holds no tokenizer."""
    from transformers import AutoTokenizer

    path, extra = resolve(name_or_path)
    if Path(path).is_dir() and not any((Path(path) / f).is_file() for f in (
            "tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")):
        return None
    try:
        return AutoTokenizer.from_pretrained(path, **extra)
    except (OSError, ValueError):
        return None


def save_hf(model: nn.Module, path: str | Path, tokenizer: Any | None = None, overwrite: bool = True,
            family: str | None = None) -> Path:
    """Write ``to_hf(model, family)`` (and ``tokenizer``, if given) as an HF folder any HF user can ``from_pretrained``.

    The folder is written beside ``path`` and renamed into place, so a reader never sees half of it; an
    existing folder is replaced only with ``overwrite`` (otherwise ValueError).
    """
    path = Path(path)
    if path.exists() and not overwrite and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(f"{path} exists and is not empty (pass --overwrite to replace it)")
    hf = to_hf(model, family)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        hf.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
