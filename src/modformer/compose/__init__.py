"""Composition of experts (issue 10): c-BTM clusters, PHATGOOSE gates, CALM cross-attention.

``modformer compose cbtm | gates | calm CONFIG.yaml [key=value ...]`` (``compose/commands.py``).
Names load on first use (PEP 562), so building the command line's parser imports no torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["mixture_weights", "standardize", "topk_softmax"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'modformer.compose' has no attribute {name!r}")
    from modformer.compose import routing

    return getattr(routing, name)
