"""Value rules shared by config fields and CLI options: ranges in math notation, choices, device names, plain names.

A config dataclass lists its rules in a ``RULES`` table next to its fields, e.g.
``{"n_layer": ">= 1", "dropout": "[0, 1)", "early_stop_mode": ("max", "min")}``; ``check_fields`` applies
them and raises a one-line ``ConfigError`` that names the key, the value and the allowed range. The same
``Range`` checks CLI options (``modformer.cli_args``), so a bound is written once, in the words the error
message shows.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from modformer.registry import ConfigError

__all__ = ["Range", "Device", "DEVICE", "check_value", "check_fields", "check_plain_name", "check_device_available"]

_BOUND = re.compile(r"^(>=|>|<=|<)\s*(\S+)$")
_INTERVAL = re.compile(r"^([\[(])\s*(\S+)\s*,\s*(\S+)\s*([\])])$")


@dataclass(frozen=True)
class Range:
    """Allowed numbers, written as the message shows them: ``"> 0"``, ``">= 1"``, ``"[0, 1)"``, ``"(0, 1]"``.

    Values must also be finite real numbers (never bool): nan and inf are outside every range."""

    text: str

    def bounds(self) -> tuple[float, float, bool, bool]:
        """(low, high, low included, high included)."""
        m = _BOUND.match(self.text)
        if m:
            op, v = m.group(1), float(m.group(2))
            if op.startswith(">"):
                return v, math.inf, op == ">=", False
            return -math.inf, v, False, op == "<="
        m = _INTERVAL.match(self.text)
        if not m:
            raise ValueError(f"bad range {self.text!r}")
        return float(m.group(2)), float(m.group(3)), m.group(1) == "[", m.group(4) == "]"

    def __post_init__(self) -> None:
        self.bounds()                     # a typo in a rule fails at import, not at a user's first bad value

    def contains(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        lo, hi, lo_in, hi_in = self.bounds()
        return (lo < value or (lo_in and value == lo)) and (value < hi or (hi_in and value == hi))

    def describe(self) -> str:
        lo, hi, _, _ = self.bounds()
        interval = math.isfinite(lo) and math.isfinite(hi)
        return f"in {self.text}" if interval else self.text


@dataclass(frozen=True)
class Device:
    """A device name: auto | cpu | cuda | cuda:N | mps (whether it is present is checked where it is used)."""

    pattern: str = r"auto|cpu|mps|cuda(:\d+)?"
    shown: str = "auto, cpu, cuda, cuda:N or mps"


DEVICE = Device()


def check_value(value: Any, rule: Any, key: str, note: str = "") -> None:
    """Raise ConfigError unless ``value`` satisfies ``rule``: a range text, a tuple of choices or a ``Device``.

    None always passes (optional fields say None's meaning in their comment); tuples/lists of numbers are
    checked element by element (e.g. ``train.betas``)."""
    if value is None:
        return
    extra = f" ({note})" if note else ""
    if isinstance(rule, str):
        rng = Range(rule)
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if not rng.contains(v):
                real = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                raise ConfigError(f"{key} must be {'' if real else 'a finite number '}{rng.describe()}, "
                                  f"got {value!r}{extra}")
    elif isinstance(rule, tuple):
        if value not in rule:
            raise ConfigError(f"{key}: unknown {value!r}; allowed: {', '.join(map(str, rule))}{extra}")
    elif isinstance(rule, Device):
        if not isinstance(value, str) or not re.fullmatch(rule.pattern, value):
            raise ConfigError(f"{key} must be {rule.shown}, got {value!r}{extra}")
    else:
        raise TypeError(f"unknown rule {rule!r} for {key}")


def check_fields(obj: Any, section: str) -> None:
    """Apply ``type(obj).RULES`` ({field: rule} or {field: [rule, note]}) to ``obj``; keys print as section.field."""
    for name, rule in type(obj).RULES.items():
        rule, note = rule if isinstance(rule, list) else (rule, "")
        check_value(getattr(obj, name), rule, f"{section}.{name}" if section else name, note)


def check_plain_name(name: Any, key: str) -> None:
    """A name that becomes one folder: not empty, no path separator, not ``.`` / ``..``, no control character."""
    if (not isinstance(name, str) or not name.strip() or name in (".", "..") or any(c in name for c in "/\\")
            or any(ord(c) < 32 or ord(c) == 127 for c in name)):
        raise ConfigError(f"{key} must be a plain folder name (no '/', not empty, '.' or '..', no control "
                          f"characters), got {name!r}")


def check_device_available(name: str, key: str) -> str:
    """``name`` if it is a valid device name that exists on this machine (``auto`` always does), else ConfigError."""
    import torch

    check_value(name, DEVICE, key)
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"{key}={name} but CUDA is not available on this machine; use cpu")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"{key}={name} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    if name == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError(f"{key}=mps but MPS is not available on this machine; use cpu")
    return name
