"""Pieces every model family shares: input checks, GPT-2 weight init and auxiliary-loss collection."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from modformer.config import ModelConfig


def check_token_input(idx: Tensor, offset: int, cfg: ModelConfig, max_len: int | None, check_values: bool) -> None:
    """ValueError for ids that are not a (B, T) integer tensor, that run past ``max_len`` from ``offset``, or
    (``check_values``: the caller decides, since reading the values syncs with the device) out of vocabulary.

    Models decide with ``wants_value_check``: always on CPU; off CPU once per inference call that starts a
    sequence (eval mode, no cache history), so a user's ``model(ids)`` gets this error on the GPU too, while
    training steps and cached decode steps gain no host sync (their ids come from the datasets, whose
    vocabulary the trainer checks, or are sampled from the model's own logits)."""
    if not isinstance(idx, Tensor) or idx.dim() != 2 or idx.dtype not in (torch.long, torch.int32):
        got = f"{idx.dtype} of shape {tuple(idx.shape)}" if isinstance(idx, Tensor) else type(idx).__name__
        raise ValueError(f"idx must be an integer tensor of shape (B, T); got {got}")
    T = idx.shape[1]
    if max_len is not None and offset + T > max_len:
        raise ValueError(f"sequence length {offset + T} exceeds model.max_seq_len={max_len} "
                         f"(size of the {cfg.position} position table)")
    if check_values and idx.numel() and (idx.min() < 0 or idx.max() >= cfg.vocab_size):
        raise ValueError(f"token ids must be in [0, {cfg.vocab_size}); "
                         f"got min {int(idx.min())}, max {int(idx.max())}")


def wants_value_check(idx: Tensor, training: bool, offset: int) -> bool:
    """Whether a forward reads ``idx``'s range (see ``check_token_input``); never while torch.compile traces."""
    if torch.compiler.is_compiling():
        return False
    return idx.device.type == "cpu" or (not training and offset == 0)


def token_embeddings(emb: nn.Embedding, idx: Tensor, scale: float, noise: float, training: bool) -> Tensor:
    """``emb(idx) * scale``, plus NEFTune noise in training (Jain et al. 2023): uniform in +-noise / sqrt(T * d),
    which makes the model robust to perturbed input embeddings (``model.embed_noise``, 0 = off)."""
    x = emb(idx) * scale
    if training and noise > 0:
        x = x + torch.empty_like(x).uniform_(-1.0, 1.0) * (noise / math.sqrt(x.shape[-2] * x.shape[-1]))
    return x


def init_linear_and_embeddings(model: nn.Module, cfg: ModelConfig, depth: int,
                               is_residual_out: Callable[[str], bool]) -> None:
    """``init: gpt2``: Linear weights N(0, init_std), residual output projections (``is_residual_out``
    on the module name) scaled by 1/sqrt(2 * depth), zero biases; ``init: torch``: PyTorch's default
    Linear init. Embeddings N(0, init_std) either way. ``model.zero_init_proj``: the residual output
    projections start at exactly zero instead (each block starts as the identity; modded-nanogpt)."""
    std = cfg.init_std
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            if cfg.zero_init_proj and is_residual_out(name):
                nn.init.zeros_(mod.weight)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)
                continue
            if cfg.init == "torch":
                mod.reset_parameters()
                continue
            nn.init.normal_(mod.weight, 0.0, std / math.sqrt(2 * depth) if is_residual_out(name) else std)
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)
        elif isinstance(mod, nn.Embedding):
            nn.init.normal_(mod.weight, 0.0, std)


class AuxLossMixin:
    """Sums submodules' ``aux_loss`` (e.g. MoE load balancing) into ``model.aux_loss`` and their
    ``aux_stats`` into ``model.aux_stats`` after each forward; the trainer adds ``aux_loss``."""

    def init_aux(self) -> None:
        """Call at the end of ``__init__``, once every submodule exists."""
        self._aux_modules = [m for m in self.modules() if m is not self and hasattr(m, "aux_loss")]
        self.aux_loss: Tensor | None = None
        self.aux_stats: dict[str, Tensor] = {}

    def _collect_aux(self, extra: Tensor | None = None, extra_name: str = "") -> None:
        """``extra`` (a model-level loss, e.g. the hourglass latent loss) is added and logged as ``extra_name``."""
        losses = [] if extra is None else [extra]
        stats: dict[str, Tensor] = {}
        for m in self._aux_modules:
            if m.aux_loss is not None:
                losses.append(m.aux_loss)
            for key, v in getattr(m, "aux_stats", {}).items():
                stats[key] = stats[key] + v if key in stats else v
        if extra is not None:
            stats[extra_name] = extra.detach()
        self.aux_loss = torch.stack(losses).sum() if losses else None
        self.aux_stats = stats
