"""modformer: efficient, modular and interpretable transformers.

    import modformer as mf
    model = mf.build_model(mf.ModelConfig(vocab_size=114, n_layer=2, d_model=128, n_head=4))
    logits = model(idx)                                    # (B, T, V)
    logits, cache = model.run_with_cache(idx)              # activations by hook name
    mf.save(model, "dir/"); model = mf.load("dir/")

Every name is imported on first use (PEP 562), so ``import modformer`` and ``modformer --help`` load no
torch, matplotlib, TensorBoard, transformers or PEFT; the registry imports the built-in components the first
time a component is looked up.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_ATTRS = {   # public name -> module that defines it
    "ConfigError": "modformer.config", "DataConfig": "modformer.config", "ModelConfig": "modformer.config",
    "RunConfig": "modformer.config", "TrainConfig": "modformer.config", "load_config": "modformer.config",
    "build_model": "modformer.saving", "load": "modformer.saving", "save": "modformer.saving",
}


def __getattr__(name: str) -> Any:
    if name in _ATTRS:
        value = getattr(importlib.import_module(_ATTRS[name]), name)
    elif not name.startswith("__"):
        try:                                   # a subpackage: mf.registry, mf.hf, mf.interp, ...
            value = importlib.import_module(f"modformer.{'models.hf' if name == 'hf' else name}")
        except ModuleNotFoundError as e:
            if e.name != f"modformer.{name}":
                raise
            raise AttributeError(f"module 'modformer' has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module 'modformer' has no attribute {name!r}")
    globals()[name] = value
    return value


__all__ = ["ConfigError", "DataConfig", "ModelConfig", "RunConfig", "TrainConfig", "build_model",
           "load", "load_config", "registry", "save", "__version__"]
