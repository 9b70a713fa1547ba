"""Feed-forward layers (registry kind ``ffn``).

``relu``, ``gelu``, ``gelu_tanh`` (GPT-2's approximation), ``relu2`` (squared ReLU, So et al. 2021 "Primer";
the modded-nanogpt speedrun's MLP): two-layer MLP ``down(act(up(x)))``.
``swiglu``, ``geglu``: gated ``down(act(gate(x)) * up(x))`` (Shazeer 2020) with the hidden
size LLaMA uses: 2/3 of 4*d_model rounded up to ``ffn_multiple_of``.
Hook points: ``hook_pre`` (pre-activation) and ``hook_post`` (hidden activation).
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from modformer.config import ModelConfig
from modformer.layers.hooks import HookPoint
from modformer.registry import register


def glu_hidden(cfg: ModelConfig) -> int:
    """LLaMA's rule: int(2/3 * 4d) rounded up to a multiple of ``ffn_multiple_of``."""
    if cfg.d_ff is not None:
        return cfg.d_ff
    m = cfg.ffn_multiple_of
    return m * ((int(2 * 4 * cfg.d_model / 3) + m - 1) // m)


class MLP(nn.Module):
    """``down(act(up(x)))`` with hidden width ``d_ff`` (default 4*d_model)."""

    def __init__(self, cfg: ModelConfig, act: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        hidden = cfg.d_ff or 4 * cfg.d_model
        self.up = nn.Linear(cfg.d_model, hidden, bias=cfg.bias)
        self.down = nn.Linear(hidden, cfg.d_model, bias=cfg.bias)
        self.act = act
        self.hook_pre = HookPoint()    # (B, T, F)
        self.hook_post = HookPoint()   # (B, T, F)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(self.hook_post(self.act(self.hook_pre(self.up(x)))))


class GLU(nn.Module):
    """Gated linear unit FFN: ``down(act(gate(x)) * up(x))``."""

    def __init__(self, cfg: ModelConfig, act: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        hidden = glu_hidden(cfg)
        self.gate = nn.Linear(cfg.d_model, hidden, bias=cfg.bias)
        self.up = nn.Linear(cfg.d_model, hidden, bias=cfg.bias)
        self.down = nn.Linear(hidden, cfg.d_model, bias=cfg.bias)
        self.act = act
        self.hook_pre = HookPoint()
        self.hook_post = HookPoint()

    def forward(self, x: Tensor) -> Tensor:
        return self.down(self.hook_post(self.act(self.hook_pre(self.gate(x))) * self.up(x)))


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


def relu_squared(x: Tensor) -> Tensor:
    """``relu(x) ** 2`` (Primer's activation)."""
    return F.relu(x).square()


register("ffn", "relu")(lambda cfg: MLP(cfg, F.relu))
register("ffn", "gelu")(lambda cfg: MLP(cfg, F.gelu))
register("ffn", "gelu_tanh")(lambda cfg: MLP(cfg, _gelu_tanh))
register("ffn", "relu2")(lambda cfg: MLP(cfg, relu_squared))
register("ffn", "swiglu")(lambda cfg: GLU(cfg, F.silu))
register("ffn", "geglu")(lambda cfg: GLU(cfg, F.gelu))
