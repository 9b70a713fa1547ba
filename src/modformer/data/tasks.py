"""Algorithmic tasks: modular arithmetic (grokking), copy / reverse / sort, addition, induction, lookup.

Each task builds a fixed pool of token sequences once (all examples when the set is finite, else
``n_examples`` distinct random ones) from ``options['seed']`` and splits it train/val by a seeded
permutation, so two builds with the same options are identical and train/val never share an example.
Loss is taken only on the answer tokens (targets elsewhere are -100). Tasks fix their own sequence
length, so ``DataConfig.seq_len`` is ignored.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from modformer.data.base import ExampleDataset
from modformer.registry import ConfigError, register


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(f"data.options.{msg}")


def _is_prime(p: int) -> bool:
    return p >= 2 and all(p % d for d in range(2, math.isqrt(p) + 1))


def _unique_rows(n: int, draw: Callable[[int], Tensor], space: int) -> Tensor:
    """``n`` distinct rows of ``draw(m) -> (m, L)``, kept in sampling order (so the sample is unbiased)."""
    _need(space >= n, f"n_examples={n} exceeds the {space} distinct sequences of this task")
    rows = draw(n)
    for _ in range(1000):
        _, first = np.unique(rows.numpy(), axis=0, return_index=True)
        rows = rows[torch.from_numpy(np.sort(first))]
        if len(rows) >= n:
            return rows[:n]
        rows = torch.cat([rows, draw(n - len(rows) + n // 4 + 8)])
    raise ConfigError(f"data.options.n_examples={n}: could not draw that many distinct sequences")


def _uniform_rows(n: int, length: int, n_symbols: int, g: torch.Generator) -> Tensor:
    """``n`` distinct uniform rows (n, length) over ``n_symbols``; small spaces are enumerated instead."""
    space = n_symbols ** length
    if space > 2 * n:
        return _unique_rows(n, lambda m: torch.randint(n_symbols, (m, length), generator=g), space)
    _need(space >= n, f"n_examples={n} exceeds the {space} distinct sequences of this task")
    codes = torch.randperm(space, generator=g)[:n]                                     # (n,)
    powers = n_symbols ** torch.arange(length - 1, -1, -1, dtype=torch.int64)
    return codes[:, None] // powers % n_symbols


def _digits(v: Tensor, n: int) -> Tensor:
    """(N,) non-negative ints -> (N, n) decimal digits, most significant first."""
    powers = 10 ** torch.arange(n - 1, -1, -1, dtype=torch.int64)
    return v[:, None] // powers % 10


# ---------------------------------------------------------------------------------------------------
# Modular arithmetic: "a b =" -> c (Power et al. 2022; Nanda et al. 2023 use this token format).

def _mod_ops() -> dict[str, Callable[[Tensor, Tensor, int, Tensor], Tensor]]:
    """op name -> f(a, b, p, inv) with a, b (N,) in [0, p) and inv the table of inverses mod p."""
    def cube(a: Tensor, p: int) -> Tensor:
        return a * a % p * a % p
    return {
        "+": lambda a, b, p, inv: (a + b) % p,
        "-": lambda a, b, p, inv: (a - b) % p,
        "*": lambda a, b, p, inv: a * b % p,
        "/": lambda a, b, p, inv: a * inv[b] % p,
        "x/y_or_x-y": lambda a, b, p, inv: torch.where(b % 2 == 1, a * inv[b] % p, (a - b) % p),
        "x2+y2": lambda a, b, p, inv: (a * a + b * b) % p,
        "x2+xy+y2": lambda a, b, p, inv: (a * a + a * b + b * b) % p,
        "x2+xy+y2+x": lambda a, b, p, inv: (a * a + a * b + b * b + a) % p,
        "x3+xy": lambda a, b, p, inv: (cube(a, p) + a * b) % p,
        "x3+xy2+y": lambda a, b, p, inv: (cube(a, p) + a * (b * b % p) + b) % p,
    }


MODULAR_OPS = tuple(_mod_ops())


@register("task", "modular")
class ModularArithmetic(ExampleDataset):
    """``a b =`` -> ``c = a op b (mod p)``; tokens 0..p-1 are numbers, p is '='; loss on c only.

    Prompts (``modformer generate --prompt``) are written ``"3 + 5 ="``; the answer is one token.

    Ops: + - * / (b != 0, a * b^(p-2) by Fermat, p prime), x/y_or_x-y (x/y if y odd else x-y),
    x2+y2, x2+xy+y2, x2+xy+y2+x, x3+xy, x3+xy2+y (the grokking paper's binary operations).
    """

    def __init__(self, seq_len: int = 3, root: Path | None = None, *, p: int = 113, op: str = "+",
                 train_fraction: float = 0.3, seed: int = 0) -> None:
        ops = _mod_ops()
        _need(op in ops, f"op: unknown {op!r}; allowed: {', '.join(ops)}")
        _need(isinstance(p, int) and p >= 2, f"p must be an integer >= 2, got {p!r}")
        divides = op in ("/", "x/y_or_x-y")
        _need(not divides or _is_prime(p), f"p must be prime for op {op!r}, got {p}")
        a, b = torch.cartesian_prod(torch.arange(p), torch.arange(p)).unbind(1)   # (p*p,) each
        if op == "/":
            keep = b != 0
            a, b = a[keep], b[keep]
        inv = torch.tensor([pow(v, p - 2, p) if v else 0 for v in range(p)] if divides else [0])
        c = ops[op](a, b, p, inv)
        eq = torch.full_like(a, p)
        seqs = torch.stack([a, b, eq, c], 1)                                        # (N, 4)
        answer = torch.tensor([False, False, False, True]).expand_as(seqs)
        self.p, self.op = p, op
        g = torch.Generator().manual_seed(seed)
        self._setup(seqs, answer, [str(i) for i in range(p)] + ["="], train_fraction, g)

    def encode(self, text: str) -> list[int]:
        """A prompt as people write it, ``"3 + 5 ="`` (``"3+5="``), or as the model sees it, ``"3 5 ="``.

        The op between the numbers is not a token: it must be this task's op, and is dropped."""
        words = re.findall(r"\d+|=|[-+*/]|[^\s\d=]+", text) if self.op in "+-*/" else text.split()
        if len(words) >= 3 and not words[1].isdigit() and words[1] != "=":
            if words[1] != self.op:
                raise ValueError(f"this model computes a {self.op} b (mod {self.p}), not {words[1]!r}: "
                                 f"write e.g. '3 {self.op} 5 =' (the answer is the one token after '=')")
            words = words[:1] + words[2:]
        return super().encode(" ".join(words))

    def decode(self, ids: list[int]) -> str:
        """``a b = c`` ids as ``"a + b = c"`` (single-symbol ops); any other id list token by token."""
        text = super().decode(ids)
        if self.op in "+-*/" and len(ids) >= 3 and int(ids[2]) == self.p and max(int(ids[0]), int(ids[1])) < self.p:
            first, rest = text.split(" ", 1)
            text = f"{first} {self.op} {rest}"
        return text


# ---------------------------------------------------------------------------------------------------
# Sequence transforms: "x SEP f(x)" with loss on f(x).

class _TransformTask(ExampleDataset):
    """``x_1..x_L | y_1..y_L`` with y = f(x); digits 0..n_symbols-1, SEP = n_symbols; loss on y."""

    @staticmethod
    def transform(x: Tensor) -> Tensor:   # (N, L) -> (N, L)
        raise NotImplementedError

    def __init__(self, seq_len: int = 0, root: Path | None = None, *, length: int = 8, n_symbols: int = 10,
                 n_examples: int = 10000, train_fraction: float = 0.9, seed: int = 0) -> None:
        _need(length >= 1, f"length must be >= 1, got {length}")
        _need(n_symbols >= 2, f"n_symbols must be >= 2, got {n_symbols}")
        _need(n_examples >= 2, f"n_examples must be >= 2, got {n_examples}")
        g = torch.Generator().manual_seed(seed)
        x = _uniform_rows(n_examples, length, n_symbols, g)                         # (N, L)
        sep = torch.full((n_examples, 1), n_symbols)
        seqs = torch.cat([x, sep, self.transform(x)], 1)                            # (N, 2L+1)
        answer = torch.zeros_like(seqs, dtype=torch.bool)
        answer[:, length + 1:] = True
        self._setup(seqs, answer, [str(i) for i in range(n_symbols)] + ["|"], train_fraction, g)


@register("task", "copy")
class CopyTask(_TransformTask):
    """Copy: y = x."""

    @staticmethod
    def transform(x: Tensor) -> Tensor:
        return x.clone()


@register("task", "reverse")
class ReverseTask(_TransformTask):
    """Reverse: y = x read backwards."""

    @staticmethod
    def transform(x: Tensor) -> Tensor:
        return x.flip(1)


@register("task", "sort")
class SortTask(_TransformTask):
    """Sort: y = x in ascending order."""

    @staticmethod
    def transform(x: Tensor) -> Tensor:
        return x.sort(1).values


# ---------------------------------------------------------------------------------------------------

@register("task", "addition")
class AdditionTask(ExampleDataset):
    """``a + b =`` -> the n+1 digits of a+b (zero-padded operands of n digits); loss on the answer only.

    ``reverse_answer`` (default True) writes the sum least-significant digit first, so each digit depends
    only on digits already seen plus a carry; this trains much faster (Lee et al., 2023).
    Tokens: digits 0-9, '+' = 10, '=' = 11.
    """

    def __init__(self, seq_len: int = 0, root: Path | None = None, *, n_digits: int = 3,
                 n_examples: int = 10000, reverse_answer: bool = True, train_fraction: float = 0.9,
                 seed: int = 0) -> None:
        _need(1 <= n_digits <= 18, f"n_digits must be in 1..18, got {n_digits}")
        _need(n_examples >= 2, f"n_examples must be >= 2, got {n_examples}")
        hi = 10 ** n_digits
        g = torch.Generator().manual_seed(seed)
        n = min(n_examples, hi * hi)
        ab = _uniform_rows(n, 2, hi, g)                                                 # (N, 2)
        ans = _digits(ab[:, 0] + ab[:, 1], n_digits + 1)                                # (N, n+1)
        if reverse_answer:
            ans = ans.flip(1)
        plus, eq = torch.full((n, 1), 10), torch.full((n, 1), 11)
        seqs = torch.cat([_digits(ab[:, 0], n_digits), plus, _digits(ab[:, 1], n_digits), eq, ans], 1)
        answer = torch.zeros_like(seqs, dtype=torch.bool)
        answer[:, -(n_digits + 1):] = True
        self.n_digits, self.reverse_answer = n_digits, reverse_answer
        self._setup(seqs, answer, [str(i) for i in range(10)] + ["+", "="], train_fraction, g)


@register("task", "induction")
class InductionTask(ExampleDataset):
    """A random sequence of ``length`` tokens followed by its repeat; loss on the whole repeat.

    The standard probe for induction heads (Olsson et al., 2022): after the first repeated token every
    next token is predictable by finding the previous occurrence of the current token and copying its
    successor. ``distinct`` (default) draws the first half without repeated tokens, so that copy is
    unambiguous. Tokens 0..n_symbols-1 only.
    """

    def __init__(self, seq_len: int = 0, root: Path | None = None, *, length: int = 16, n_symbols: int = 64,
                 distinct: bool = True, n_examples: int = 10000, train_fraction: float = 0.9,
                 seed: int = 0) -> None:
        _need(length >= 2, f"length must be >= 2, got {length}")
        _need(not distinct or n_symbols >= length,
              f"n_symbols ({n_symbols}) must be >= length ({length}) when distinct=true")
        g = torch.Generator().manual_seed(seed)
        if distinct:
            def draw(m: int) -> Tensor:
                return torch.rand(m, n_symbols, generator=g).argsort(1)[:, :length]
            half = _unique_rows(n_examples, draw, math.perm(n_symbols, length))      # (N, L)
        else:
            half = _uniform_rows(n_examples, length, n_symbols, g)
        seqs = torch.cat([half, half], 1)                                           # (N, 2L)
        answer = torch.zeros_like(seqs, dtype=torch.bool)
        answer[:, length:] = True
        self._setup(seqs, answer, [str(i) for i in range(n_symbols)], train_fraction, g)


@register("task", "lookup")
class LookupTask(ExampleDataset):
    """``k1 v1 k2 v2 ... kn vn ? q`` -> the value paired with key q (associative recall); loss on it only.

    Keys are distinct within an example. Tokens: keys 0..n_keys-1 ("k0".."), values next ("v0"..),
    then '?'.
    """

    def __init__(self, seq_len: int = 0, root: Path | None = None, *, n_pairs: int = 8, n_keys: int = 32,
                 n_values: int = 32, n_examples: int = 10000, train_fraction: float = 0.9,
                 seed: int = 0) -> None:
        _need(n_pairs >= 1, f"n_pairs must be >= 1, got {n_pairs}")
        _need(n_keys >= n_pairs, f"n_keys ({n_keys}) must be >= n_pairs ({n_pairs})")
        _need(n_values >= 1, f"n_values must be >= 1, got {n_values}")
        g = torch.Generator().manual_seed(seed)
        query_tok = n_keys + n_values

        def draw(m: int) -> Tensor:
            keys = torch.rand(m, n_keys, generator=g).argsort(1)[:, :n_pairs]             # (m, n)
            vals = torch.randint(n_values, (m, n_pairs), generator=g) + n_keys         # (m, n)
            q = torch.randint(n_pairs, (m, 1), generator=g)                             # (m, 1)
            pairs = torch.stack([keys, vals], 2).flatten(1)                             # (m, 2n)
            tail = torch.cat([torch.full((m, 1), query_tok), keys.gather(1, q), vals.gather(1, q)], 1)
            return torch.cat([pairs, tail], 1)                                          # (m, 2n+3)

        space = math.perm(n_keys, n_pairs) * n_values ** n_pairs * n_pairs
        seqs = _unique_rows(n_examples, draw, space)
        answer = torch.zeros_like(seqs, dtype=torch.bool)
        answer[:, -1] = True
        symbols = [f"k{i}" for i in range(n_keys)] + [f"v{i}" for i in range(n_values)] + ["?"]
        self._setup(seqs, answer, symbols, train_fraction, g)
