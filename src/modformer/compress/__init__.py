"""Compression: unstructured / structured pruning and LoRA adapters (``modformer prune | lora``)."""

from modformer.compress.finetune import evaluate, finetune
from modformer.compress.importance import head_importance, layer_importance, masked, neuron_importance
from modformer.compress.structured import count_params, prune_structured, remove_heads, remove_layers, remove_neurons
from modformer.compress.unstructured import (
    GradualPruning,
    iterative_magnitude_pruning,
    magnitude_prune,
    make_permanent,
    polynomial_sparsity,
    sparsity_of,
)

__all__ = ["evaluate", "finetune", "head_importance", "layer_importance", "masked", "neuron_importance",
           "count_params", "prune_structured", "remove_heads", "remove_layers", "remove_neurons",
           "GradualPruning", "iterative_magnitude_pruning", "magnitude_prune", "make_permanent",
           "polynomial_sparsity", "sparsity_of"]
