"""LoRA adapters through HF PEFT on any modformer model (Hu et al. 2021).

PEFT wraps ``nn.Linear`` children by name, so ``target_modules`` are our module names:
``qkv`` and ``out`` (attention), ``up`` / ``down`` / ``gate`` (FFN), ``lm_head``, ``tok_emb`` (PEFT's
Embedding LoRA), or one layer's module by a dotted suffix (``blocks.0.attn.qkv``). The base stays
frozen; adapters are saved on their own (``adapter_model.safetensors`` + ``adapter_config.json``,
plus ``modformer.json`` naming the base), several can be loaded into one model and switched, and
``merge`` folds the active one into the weights (``unmerge`` restores them exactly up to rounding).

    pm = add_lora(model, r=4, targets=("qkv", "out", "up", "down"))
    finetune(pm, data, train_cfg, steps=300)          # or finetune_run(...): a run folder, checkpoint = merged
    save_adapter(pm, "adapters/sub")
    pm = load_adapters(mf.load(base), {"sub": "adapters/sub", "mul": "adapters/mul"}); pm.set_adapter("mul")
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from modformer.utils import atomic_write_text

DEFAULT_TARGETS = ("qkv", "out", "up", "down")
META_NAME = "modformer.json"


def lora_config(r: int = 4, alpha: float | None = None, dropout: float = 0.0,
                targets: Sequence[str] = DEFAULT_TARGETS) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha if alpha is not None else 2 * r, lora_dropout=dropout,
                      target_modules=list(targets), bias="none")


def _check_targets(model: nn.Module, targets: Sequence[str]) -> None:
    """Each target must name a Linear or Embedding by its last name(s), as PEFT matches them: ``qkv`` (every
    layer), ``blocks.0.attn.qkv`` (one layer), ``tok_emb``."""
    full = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in full)]
    if missing:
        names = sorted({n.rsplit(".", 1)[-1] for n in full})
        raise ValueError(f"LoRA targets {missing} match no Linear module; available: {', '.join(names)}")


def add_lora(model: nn.Module, r: int = 4, alpha: float | None = None, dropout: float = 0.0,
             targets: Sequence[str] = DEFAULT_TARGETS, adapter_name: str = "default") -> Any:
    """Wrap ``model`` in a PeftModel with one trainable LoRA adapter; everything else is frozen."""
    from peft import get_peft_model

    _check_targets(model, targets)
    return get_peft_model(model, lora_config(r, alpha, dropout, targets), adapter_name=adapter_name)


def trainable_fraction(model: nn.Module) -> tuple[int, int, float]:
    """(trainable, total, fraction) over unique parameters; for a PeftModel the total includes the adapters."""
    params = {id(p): p for p in model.parameters()}.values()
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    return trainable, total, trainable / max(total, 1)


def save_adapter(peft_model: Any, path: str | Path, adapter_name: str | None = None,
                 meta: dict[str, Any] | None = None) -> Path:
    """Write one adapter (the active one by default) to ``path``: safetensors + PEFT config + modformer.json.

    Files of the same name are replaced; other entries of ``path`` (the ``finetune/`` run folder) stay."""
    import os
    import tempfile

    name = adapter_name or peft_model.active_adapter
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        peft_model.save_pretrained(tmp, selected_adapters=[name])
        src = Path(tmp) if name == "default" else Path(tmp) / name
        for f in src.iterdir():
            if f.is_file():
                os.replace(f, path / f.name)
    atomic_write_text(path / META_NAME, json.dumps({"adapter": name, **(meta or {})}, indent=2))
    return path


def load_adapters(base: nn.Module, adapters: dict[str, str | Path], trainable: bool = False) -> Any:
    """A PeftModel over ``base`` holding every adapter ``{name: folder}``; the first one is active."""
    from peft import PeftModel

    if not adapters:
        raise ValueError("no adapters given")
    items = list(adapters.items())
    name, path = items[0]
    pm = PeftModel.from_pretrained(base, str(path), adapter_name=name, is_trainable=trainable)
    for name, path in items[1:]:
        pm.load_adapter(str(path), adapter_name=name, is_trainable=trainable)
    pm.set_adapter(items[0][0])
    return pm


def merged_model(peft_model: Any) -> nn.Module:
    """The base model with the active adapter folded into its weights (an ordinary modformer model)."""
    return peft_model.merge_and_unload()


def merged_copy(peft_model: Any) -> nn.Module:
    """A merged copy (``merged_model`` of a deep copy): ``peft_model`` keeps its adapter (fine-tune checkpoints)."""
    import copy

    return merged_model(copy.deepcopy(peft_model))
