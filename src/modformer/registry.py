"""Name -> implementation registries for every swappable component kind.

A config names a component by a lowercase string; ``get(kind, name)`` returns the
registered constructor. Adding a variant is one new file plus one ``@register`` line.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

_REGISTRIES: dict[str, dict[str, Callable[..., Any]]] = {}


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the allowed values."""


def register(kind: str, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register ``obj`` under ``kind``/``name`` (names are lowercase)."""
    if name != name.lower():
        raise ValueError(f"component names are lowercase, got {name!r}")

    def deco(obj: Callable[..., Any]) -> Callable[..., Any]:
        table = _REGISTRIES.setdefault(kind, {})
        if name in table and table[name] is not obj:
            raise ValueError(f"{kind} {name!r} is already registered")
        table[name] = obj
        return obj

    return deco


def _ensure_loaded() -> None:
    """Import the built-in components (their modules register themselves); ``import modformer`` alone is lazy."""
    import modformer.data  # noqa: F401
    import modformer.layers  # noqa: F401
    import modformer.models  # noqa: F401


def available(kind: str | None = None) -> dict[str, list[str]] | list[str]:
    """Registered names of one kind (sorted list) or of every kind (dict)."""
    _ensure_loaded()
    if kind is None:
        return {k: sorted(v) for k, v in sorted(_REGISTRIES.items())}
    if kind not in _REGISTRIES:
        raise ConfigError(f"unknown component kind {kind!r}; kinds: {', '.join(sorted(_REGISTRIES))}")
    return sorted(_REGISTRIES[kind])


def suggest(name: str, choices: list[str]) -> str:
    """' (did you mean X?)' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(name, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def get(kind: str, name: str, field: str | None = None) -> Callable[..., Any]:
    """The constructor registered as ``kind``/``name``; a one-line ConfigError otherwise."""
    _ensure_loaded()
    table = _REGISTRIES.get(kind, {})
    if name not in table:
        field = field or kind
        choices = sorted(table)
        raise ConfigError(
            f"{field}: unknown {kind} {name!r}{suggest(str(name), choices)}; "
            f"allowed: {', '.join(choices)}"
        )
    return table[name]
