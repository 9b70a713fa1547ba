"""Composition config files: a nested YAML mapping over a method's defaults, with dotted overrides.

Every key must exist in the defaults (a typo gets a "did you mean" error) except below keys ending in
``options`` and inside RunConfig mappings (``run``, ``anchor``, ``augmenting``, ``base``), which the
RunConfig dataclasses check when they are built.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from modformer.registry import ConfigError, suggest

OPEN_KEYS = ("run", "anchor", "augmenting", "base")   # RunConfig mappings (checked when the RunConfig is built)


def merge(defaults: dict[str, Any], given: dict[str, Any], where: str = "") -> dict[str, Any]:
    """``defaults`` updated by ``given``, recursively; unknown keys raise ConfigError."""
    out = copy.deepcopy(defaults)
    for key, value in given.items():
        path = f"{where}{key}"
        parents = where.rstrip(".").split(".") if where else []
        if key not in out and not (set(parents) & set(OPEN_KEYS) or where.rstrip(".").endswith("options")):
            raise ConfigError(f"unknown config key {path!r}{suggest(str(key), list(out))}")
        if isinstance(out.get(key), dict) and isinstance(value, dict):
            out[key] = merge(out[key], value, path + ".")
        else:
            out[key] = copy.deepcopy(value)
    return out


def overrides_to_dict(overrides: list[str]) -> dict[str, Any]:
    """``a.b=1`` strings (YAML values) -> nested dict."""
    from modformer.config import parse_yaml

    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. experts.steps=100)")
        key, text = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = parse_yaml(text, f"override {item}") if text != "" else ""
    return out


def load_spec(path: str | Path | None, defaults: dict[str, Any], overrides: list[str] | None = None,
              ) -> dict[str, Any]:
    """Defaults <- YAML file (optional) <- overrides."""
    from modformer.config import read_yaml_mapping

    spec = merge(defaults, read_yaml_mapping(path)) if path is not None else copy.deepcopy(defaults)
    return merge(spec, overrides_to_dict(overrides or []))


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name
