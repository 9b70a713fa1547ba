"""argparse ``type=`` helpers shared by every subcommand: numbers in a range, devices, plain names.

``p.add_argument("--top-k", type=int_in(">= 1"))`` refuses ``--top-k 0`` while parsing, so argparse prints its
usage and one ``error: argument --top-k: must be an integer >= 1, got '0'`` line and exits with status 2,
before any model or file is touched. Ranges use ``validation.Range`` notation, as config fields do.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from modformer.registry import ConfigError
from modformer.validation import Range, check_device_available, check_plain_name

__all__ = ["int_in", "float_in", "device", "plain_name"]


def _number_in(rng: str, cast: Callable[[str], float], kind: str) -> Callable[[str], float]:
    """An argparse type: ``cast(text)`` must lie in ``rng``; the error names ``kind`` and the range."""
    allowed = Range(rng)

    def parse(text: str) -> float:
        try:
            value = cast(text)
        except ValueError:
            value = None
        if value is None or not allowed.contains(value):
            raise argparse.ArgumentTypeError(f"must be {kind} {allowed.describe()}, got {text!r}")
        return value

    parse.__name__ = f"{kind.split()[-1]} {allowed.describe()}"
    return parse


def int_in(rng: str) -> Callable[[str], int]:
    """An integer option in ``rng`` (e.g. ``">= 0"``)."""
    return _number_in(rng, int, "an integer")


def float_in(rng: str) -> Callable[[str], float]:
    """A finite number option in ``rng`` (e.g. ``"(0, 1]"``); nan and inf are refused."""
    return _number_in(rng, float, "a finite number")


def device(text: str) -> str:
    """A device that exists here: auto | cpu | cuda | cuda:N | mps (``--device cuda`` without a GPU is refused)."""
    try:
        return check_device_available(text, "device")
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def plain_name(text: str) -> str:
    """A name that becomes one folder (no '/', not empty, '.' or '..')."""
    try:
        check_plain_name(text, "name")
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text
