"""Trainer state without pickle: tensors go to a safetensors file, everything else to JSON.

``encode(state)`` turns a nested structure of dicts, lists, tuples, numbers, strings, None, tensors and
small numpy arrays into a JSON-able tree plus ``{name: tensor}``; ``decode`` inverts it exactly (tuples
stay tuples, int dict keys stay ints, dtypes and bits are kept). Reading a state back only parses JSON
and safetensors, so a shared run folder can never run code on ``--resume``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from modformer.utils import CheckpointError

TENSOR, TUPLE, ARRAY, ITEMS = "__tensor__", "__tuple__", "__ndarray__", "__items__"
RESERVED = {TENSOR, TUPLE, ARRAY, ITEMS}
_ARRAY_KINDS = "biuf"        # numpy arrays restored only with plain numeric dtypes


def encode(state: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """(JSON-able tree, tensors by name) for ``state``; raises TypeError for anything else."""
    tensors: dict[str, torch.Tensor] = {}

    def enc(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            name = str(len(tensors))
            tensors[name] = x.detach().to("cpu", copy=True).contiguous()   # own storage: no shared views
            return {TENSOR: name}
        if isinstance(x, np.ndarray):
            return {ARRAY: x.tolist(), "dtype": x.dtype.str}
        if isinstance(x, np.generic):
            return x.item()
        if isinstance(x, tuple):
            return {TUPLE: [enc(v) for v in x]}
        if isinstance(x, list):
            return [enc(v) for v in x]
        if isinstance(x, dict):
            if all(isinstance(k, str) for k in x) and not RESERVED & set(x):
                return {k: enc(v) for k, v in x.items()}
            return {ITEMS: [[enc(k), enc(v)] for k, v in x.items()]}
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"trainer state: cannot store a {type(x).__name__} without pickle")

    return enc(state), tensors


def decode(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`encode`; a malformed tree raises CheckpointError."""

    def dec(x: Any) -> Any:
        if isinstance(x, list):
            return [dec(v) for v in x]
        if not isinstance(x, dict):
            return x
        if TENSOR in x:
            if x[TENSOR] not in tensors:
                raise CheckpointError(f"tensor {x[TENSOR]!r} is missing from the state's safetensors file")
            return tensors[x[TENSOR]]
        if TUPLE in x:
            return tuple(dec(v) for v in _list(x[TUPLE]))
        if ARRAY in x:
            dtype = np.dtype(str(x.get("dtype")))
            if dtype.kind not in _ARRAY_KINDS:
                raise CheckpointError(f"numpy array of dtype {dtype} in a trainer state is not allowed")
            return np.array(x[ARRAY], dtype=dtype)
        if ITEMS in x:
            return {_key(dec(k)): dec(v) for k, v in (_pair(p) for p in _list(x[ITEMS]))}
        return {k: dec(v) for k, v in x.items()}

    try:
        return dec(tree)
    except (TypeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"malformed trainer state ({type(e).__name__}: {e})") from None


def _list(x: Any) -> list:
    if not isinstance(x, list):
        raise TypeError(f"expected a list, got {type(x).__name__}")
    return x


def _pair(x: Any) -> tuple[Any, Any]:
    if not (isinstance(x, list) and len(x) == 2):
        raise TypeError("expected a [key, value] pair")
    return x[0], x[1]


def _key(k: Any) -> Any:
    if isinstance(k, list | dict):
        raise TypeError("unhashable dict key")
    return k
