"""modformer: efficient, modular and interpretable transformers.

    import modformer as mf
    model = mf.build_model(mf.ModelConfig(vocab_size=114, n_layer=2, d_model=128, n_head=4))
    logits = model(idx)                                    # (B, T, V)
    logits, cache = model.run_with_cache(idx)              # activations by hook name
    mf.save(model, "dir/"); model = mf.load("dir/")
"""

from modformer import (  # noqa: F401  (registers built-in components)
    data,  # noqa: F401
    layers,
    models,
    nn,  # noqa: F401  (modformer.nn.MultiheadAttention)
    registry,
)
from modformer.config import ConfigError, DataConfig, ModelConfig, RunConfig, TrainConfig, load_config
from modformer.saving import build_model, load, save

__version__ = "0.1.0"


def __getattr__(name: str):  # lazy: HF interop imports transformers only when used
    if name == "hf":
        from modformer.models import hf

        return hf
    raise AttributeError(f"module 'modformer' has no attribute {name!r}")


__all__ = ["ConfigError", "DataConfig", "ModelConfig", "RunConfig", "TrainConfig", "build_model",
           "load", "load_config", "registry", "save"]
