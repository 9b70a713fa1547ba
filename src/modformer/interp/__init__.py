"""Interpretability for any modformer decoder: weights, circuits, composition, head detectors, grokking, viz.

    from modformer import interp
    w = interp.extract_weights(model)                 # per-head W_Q/W_K/W_V/W_O, LayerNorm folded
    interp.copying_scores(w)                          # (L, H) OV eigenvalue copying score
    interp.all_composition_scores(w, baseline=True)   # {"q"|"k"|"v": (L, H, L, H)}
    interp.head_scores(model)                         # prev-token / duplicate / induction / copying / ...
    interp.analyze(model, "out/", data)               # HTML + plots + head table (the `circuits` command)
    interp.circuit_view(model)                        # how a model kind is read (hourglass: token-level layers)
    interp.activation_patching(model, corrupted, clean, metric, site="z")   # causal: (L, H) patched metric
    interp.term_importance(model, idx)                # direct / one-head / two-head path ablation (attn-only)

Conventions (row vectors, TransformerLens-style) are documented in ``weights.py``.
"""

from modformer.interp.circuits import (
    FactoredMatrix,
    composition_eigenvalues,
    copying_scores,
    eigen_score,
    ov_circuit,
    ov_eigenvalues,
    pos_qk_circuit,
    positional_qk_strength,
    qk_circuit,
    qk_eigenvalues,
)
from modformer.interp.composition import (
    all_composition_scores,
    comp_score,
    composition_baseline,
    composition_scores,
    top_compositions,
)
from modformer.interp.deltas import adapter_head_deltas, head_deltas
from modformer.interp.fourier import (
    excluded_loss,
    fourier_basis,
    fourier_report,
    frequency_norms,
    key_frequencies,
    restricted_loss,
)
from modformer.interp.gradflow import (
    AttentionStatsMonitor,
    GradFlowMonitor,
    attention_distance,
    attention_entropy,
    attention_stats,
    flag_grad_flow,
    grad_flow,
    grad_norms,
)
from modformer.interp.heads import band_mass, frequent_tokens, head_scores, head_table, repeated_random_tokens
from modformer.interp.patching import activation_patching, attribution_patching, path_patching
from modformer.interp.report import analyze
from modformer.interp.skip_trigrams import SkipTrigram, skip_trigrams
from modformer.interp.terms import dump_circuits, path_terms, term_importance
from modformer.interp.views import TokenLayersView, circuit_view
from modformer.interp.weights import ModelWeights, attention_forward, extract_weights, normalize

__all__ = [
    "AttentionStatsMonitor", "FactoredMatrix", "GradFlowMonitor", "ModelWeights", "SkipTrigram", "TokenLayersView",
    "circuit_view",
    "activation_patching", "adapter_head_deltas", "attribution_patching", "composition_eigenvalues",
    "dump_circuits", "head_deltas", "path_patching", "path_terms", "term_importance",
    "all_composition_scores", "analyze", "attention_distance", "band_mass", "attention_entropy", "attention_forward",
    "attention_stats", "comp_score", "composition_baseline", "composition_scores", "copying_scores",
    "eigen_score", "excluded_loss", "extract_weights", "flag_grad_flow", "fourier_basis", "fourier_report",
    "frequency_norms", "frequent_tokens", "grad_flow", "grad_norms", "head_scores", "head_table", "key_frequencies",
    "normalize",
    "ov_circuit", "ov_eigenvalues", "pos_qk_circuit", "positional_qk_strength", "qk_circuit", "qk_eigenvalues",
    "repeated_random_tokens", "restricted_loss", "skip_trigrams", "top_compositions",
]
