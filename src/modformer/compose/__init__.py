"""Composition of experts (issue 10): c-BTM clusters, PHATGOOSE gates, CALM cross-attention.

``modformer compose cbtm | gates | calm CONFIG.yaml [key=value ...]`` (``compose/commands.py``).
"""

from modformer.compose.routing import mixture_weights, standardize, topk_softmax

__all__ = ["mixture_weights", "standardize", "topk_softmax"]
