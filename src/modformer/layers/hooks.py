"""Hook points: named identity modules that expose intermediate activations.

As in TransformerLens, every meaningful intermediate passes through a ``HookPoint``; a hook
registered on it can read or replace the activation. With no hooks registered the call is a
plain identity, so the fast path costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

HookFn = Callable[[Tensor, "HookPoint"], Tensor | None]


class HookPoint(nn.Module):
    """Identity module; ``name`` is its dotted path in the model (set by ``name_hook_points``)."""

    def __init__(self) -> None:
        super().__init__()
        self.name = ""

    @property
    def active(self) -> bool:
        """True when some hook is registered, i.e. someone wants this activation."""
        return bool(self._forward_hooks)

    def add_hook(self, fn: HookFn) -> torch.utils.hooks.RemovableHandle:
        """Register ``fn(activation, hook) -> new activation | None``."""
        return self.register_forward_hook(lambda mod, args, out: fn(out, mod))

    def forward(self, x: Tensor) -> Tensor:
        return x


def name_hook_points(model: nn.Module) -> None:
    """Give every HookPoint its module path as ``.name``."""
    for name, mod in model.named_modules():
        if isinstance(mod, HookPoint):
            mod.name = name



def names_predicate(names_filter: Callable[[str], bool] | list[str] | tuple[str, ...] | set[str] | str | None
                    ) -> Callable[[str], bool]:
    """A hook-name filter as a predicate: None = every hook, a name, a collection of names, or a predicate."""
    if names_filter is None:
        return lambda n: True
    if isinstance(names_filter, str):
        return lambda n: n == names_filter
    if isinstance(names_filter, (list, tuple, set)):
        wanted = set(names_filter)
        return lambda n: n in wanted
    return names_filter


class HookedMixin:
    """Adds ``hook_points``, ``hooks(...)`` and ``run_with_cache`` to an nn.Module model."""

    def hook_points(self) -> dict[str, HookPoint]:
        return {n: m for n, m in self.named_modules() if isinstance(m, HookPoint)}  # type: ignore[attr-defined]

    @contextmanager
    def hooks(self, fwd_hooks: list[tuple[str | Callable[[str], bool], HookFn]]) -> Iterator[None]:
        """Temporarily register hooks: ``[(name or predicate, fn), ...]``."""
        handles = []
        points = self.hook_points()
        try:
            for key, fn in fwd_hooks:
                names = [n for n in points if (key(n) if callable(key) else n == key)]
                if not names:
                    raise ValueError(f"no hook point matches {key!r}; see model.hook_points()")
                handles += [points[n].add_hook(fn) for n in names]
            yield
        finally:
            for h in handles:
                h.remove()

    def run_with_hooks(self, idx: Tensor, fwd_hooks: list, **kwargs) -> Tensor:
        """Forward pass with temporary hooks (e.g. ablations/patching)."""
        with self.hooks(fwd_hooks):
            return self(idx, **kwargs)  # type: ignore[operator]

    def run_with_cache(self, idx: Tensor, names_filter: Callable[[str], bool] | list[str] | str | None = None,
                       detach: bool = True, **kwargs) -> tuple[Tensor, dict[str, Tensor]]:
        """Forward pass returning ``(logits, {hook_name: activation})``.

        Caching ``*.hook_pattern`` switches those attention calls to the eager kernel, which
        materialises probabilities; everything else keeps the fast path.
        """
        keep = names_predicate(names_filter)
        cache: dict[str, Tensor] = {}

        def save(x: Tensor, hook: HookPoint) -> None:
            cache[hook.name] = x.detach() if detach else x

        with self.hooks([(keep, save)]):
            logits = self(idx, **kwargs)  # type: ignore[operator]
        return logits, cache
