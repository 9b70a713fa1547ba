"""Gradient filters that accelerate grokking (Lee et al. 2024, "Grokfast").

Grokfast treats each parameter's gradient sequence as a signal and amplifies its slow
component: ``g <- g + lamb * h`` where ``h`` is an EMA (``alpha``) or a moving average over
``window`` steps of past gradients. Applied after backward, before clipping and the step.
"""

from __future__ import annotations

from collections import deque

import torch
from torch import nn

from modformer.registry import ConfigError


class GradFilter:
    """Base: stateful in-place gradient transform with a state_dict for exact resume."""

    def __call__(self, model: nn.Module) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _named_grads(model: nn.Module):  # noqa: ANN202
    return [(n, p) for n, p in model.named_parameters() if p.grad is not None]


class GrokfastEMA(GradFilter):
    """h <- alpha * h + (1 - alpha) * g ;  g <- g + lamb * h."""

    def __init__(self, alpha: float = 0.98, lamb: float = 2.0) -> None:
        self.alpha, self.lamb = alpha, lamb
        self.ema: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> None:
        for name, p in _named_grads(model):
            h = self.ema.get(name)
            if h is None:
                self.ema[name] = h = p.grad.detach().clone()
            else:
                h.mul_(self.alpha).add_(p.grad, alpha=1 - self.alpha)
            p.grad.add_(h, alpha=self.lamb)

    def state_dict(self) -> dict:
        return {"ema": self.ema}

    def load_state_dict(self, state: dict) -> None:
        self.ema = state["ema"]


class GrokfastMA(GradFilter):
    """h = mean of the last ``window`` gradients; g <- g + lamb * h once the window is full."""

    def __init__(self, window: int = 100, lamb: float = 5.0) -> None:
        self.window, self.lamb = window, lamb
        self.history: dict[str, deque] = {}

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> None:
        for name, p in _named_grads(model):
            q = self.history.setdefault(name, deque(maxlen=self.window))
            q.append(p.grad.detach().clone())
            if len(q) == self.window:
                p.grad.add_(torch.stack(list(q)).mean(0), alpha=self.lamb)

    def state_dict(self) -> dict:
        return {"history": {k: list(v) for k, v in self.history.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.history = {k: deque(v, maxlen=self.window) for k, v in state["history"].items()}


def build_grad_filter(options: dict) -> GradFilter | None:
    """From ``train.optimizer_options.grokfast``: None, "ema" or "ma" plus its settings."""
    opts = dict(options.get("grokfast") or {}) if isinstance(options.get("grokfast"), dict) else \
        ({"kind": options["grokfast"]} if options.get("grokfast") else None)
    if not opts:
        return None
    kind = opts.pop("kind", "ema")
    classes = {"ema": GrokfastEMA, "ma": GrokfastMA}
    if kind not in classes:
        raise ConfigError(f"train.optimizer_options.grokfast.kind: unknown {kind!r}; allowed: ema, ma")
    try:
        return classes[kind](**opts)
    except TypeError as e:
        raise ConfigError(f"train.optimizer_options.grokfast: {e}") from e
