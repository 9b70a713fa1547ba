"""Search spaces over dotted config keys: parse, validate, enumerate (grid) or sample (random).

A space maps a dotted RunConfig key (``model.n_layer``, ``train.lr``, ``data.options.p``) to one of

    [1, 2, 4]                          a choice (a grid axis)
    3                                  a fixed value
    {choice: [a, b]}                   the same as a list
    {uniform: [lo, hi]}                continuous; in a grid add ``num: K`` (K evenly spaced points)
    {loguniform: [lo, hi]}             continuous on a log scale; ``num: K`` for a grid
    {int: [lo, hi]}                    integers lo..hi inclusive; optional ``step: s`` or ``log: true``
    {group: {name: {key: value, ...}}} named bundles of overrides (e.g. a whole "2017" recipe); the
                                       table records the bundle's name under this (free) key

Every key is checked against the base config (unknown keys raise a ConfigError naming the key with a
suggestion) and every choice value is type-checked by applying it to the base config.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from modformer.config import ConfigError, RunConfig, apply_overrides

DISTRIBUTIONS = ("choice", "uniform", "loguniform", "int", "group")


def format_value(v: Any) -> str:
    """A value as CLI override text that YAML reads back unchanged (floats keep a dot: 1.0e-05)."""
    import json

    if isinstance(v, float):
        s = repr(v)
        if "e" in s and "." not in s.split("e")[0]:
            mant, exp = s.split("e")
            s = f"{mant}.0e{exp}"
        return s
    if isinstance(v, str):
        return v if v and v.strip() == v and not _yaml_changes(v) else json.dumps(v)
    return json.dumps(v)


def _yaml_changes(s: str) -> bool:
    import yaml

    try:
        return yaml.safe_load(s) != s
    except yaml.YAMLError:
        return True


@dataclass
class Param:
    """One dimension of a search space."""

    key: str
    kind: str                          # choice | uniform | loguniform | int | group
    values: list[Any] = field(default_factory=list)   # choice values / group names / int grid
    low: float = 0.0
    high: float = 0.0
    num: int | None = None             # grid points for continuous distributions
    log: bool = False
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def discrete(self) -> bool:
        return self.kind in ("choice", "group", "int") or self.num is not None

    def grid(self) -> list[Any]:
        if self.kind in ("choice", "group"):
            return list(self.values)
        if self.kind == "int":
            return list(self.values)
        if self.num is None:
            raise ConfigError(f"space key {self.key!r}: {self.kind} is continuous; a grid needs `num: K` points "
                              "or a choice list (or use method: random)")
        if self.kind == "uniform":
            return [float(v) for v in np.linspace(self.low, self.high, self.num)]
        return [float(v) for v in np.geomspace(self.low, self.high, self.num)]

    def sample(self, rng: np.random.Generator) -> Any:
        if self.kind in ("choice", "group", "int"):
            return self.values[int(rng.integers(len(self.values)))]
        if self.kind == "uniform":
            return float(rng.uniform(self.low, self.high))
        return float(math.exp(rng.uniform(math.log(self.low), math.log(self.high))))

    def overrides(self, value: Any) -> dict[str, Any]:
        """The config overrides this parameter's ``value`` stands for."""
        return dict(self.groups[value]) if self.kind == "group" else {self.key: value}


def _range(key: str, spec: dict, kind: str) -> tuple[float, float]:
    bounds = spec[kind]
    if not isinstance(bounds, (list, tuple)) or len(bounds) != 2:
        raise ConfigError(f"space key {key!r}: {kind} needs [low, high], got {bounds!r}")
    try:
        lo, hi = (float(b) for b in bounds)
    except (TypeError, ValueError):
        raise ConfigError(f"space key {key!r}: {kind} bounds must be numbers, got {bounds!r}") from None
    if not lo < hi:
        raise ConfigError(f"space key {key!r}: {kind} needs low < high, got {bounds!r}")
    if kind in ("loguniform",) and lo <= 0:
        raise ConfigError(f"space key {key!r}: loguniform needs low > 0, got {lo}")
    return lo, hi


def parse_param(key: str, spec: Any) -> Param:
    """One space entry -> Param (errors name the key)."""
    if isinstance(spec, (list, tuple)):
        spec = {"choice": list(spec)}
    elif not isinstance(spec, dict):
        spec = {"choice": [spec]}
    kinds = [k for k in spec if k in DISTRIBUTIONS]
    extra = [k for k in spec if k not in DISTRIBUTIONS + ("num", "log", "step")]
    if len(kinds) != 1 or extra:
        from modformer.registry import suggest

        bad = extra[0] if extra else None
        hint = suggest(bad, list(DISTRIBUTIONS)) if bad else ""
        raise ConfigError(f"space key {key!r}: expected exactly one of {', '.join(DISTRIBUTIONS)} "
                          f"(got {', '.join(map(str, spec)) or 'nothing'}){hint}")
    kind = kinds[0]
    if kind == "choice":
        values = spec["choice"]
        if not isinstance(values, (list, tuple)) or not values:
            raise ConfigError(f"space key {key!r}: choice needs a non-empty list, got {values!r}")
        return Param(key, "choice", list(values))
    if kind == "group":
        groups = spec["group"]
        if not isinstance(groups, dict) or not groups or not all(isinstance(g, dict) for g in groups.values()):
            raise ConfigError(f"space key {key!r}: group needs a mapping name -> {{dotted.key: value}}")
        return Param(key, "group", list(groups), groups={str(k): v for k, v in groups.items()})
    lo, hi = _range(key, spec, kind)
    num = spec.get("num")
    if num is not None and (not isinstance(num, int) or num < 1):
        raise ConfigError(f"space key {key!r}: num must be a positive integer, got {num!r}")
    if kind == "int":
        if not (float(lo).is_integer() and float(hi).is_integer()):
            raise ConfigError(f"space key {key!r}: int bounds must be integers, got {spec['int']!r}")
        lo_i, hi_i = int(lo), int(hi)
        if spec.get("log"):
            if lo_i <= 0:
                raise ConfigError(f"space key {key!r}: int with log: true needs low > 0")
            values = sorted({int(round(v)) for v in np.geomspace(lo_i, hi_i, num or 8)})
        else:
            step = spec.get("step", 1)
            if not isinstance(step, int) or step < 1:
                raise ConfigError(f"space key {key!r}: step must be a positive integer, got {step!r}")
            values = list(range(lo_i, hi_i + 1, step))
        return Param(key, "int", values, lo, hi, log=bool(spec.get("log")))
    return Param(key, kind, [], lo, hi, num=num, log=kind == "loguniform")


@dataclass
class Space:
    """An ordered set of Params; ``grid()`` / ``sample()`` give parameter assignments (key -> value)."""

    params: list[Param]

    def grid_size(self) -> int:
        return math.prod(len(p.grid()) for p in self.params) if self.params else 1

    def grid(self) -> list[dict[str, Any]]:
        axes = [p.grid() for p in self.params]
        return [dict(zip([p.key for p in self.params], combo)) for combo in itertools.product(*axes)]

    def sample(self, n: int, seed: int = 0) -> list[dict[str, Any]]:
        rng = np.random.default_rng(seed)
        return [{p.key: p.sample(rng) for p in self.params} for _ in range(n)]

    def overrides(self, assignment: dict[str, Any]) -> dict[str, Any]:
        """Dotted config overrides for one assignment (groups expanded)."""
        out: dict[str, Any] = {}
        for p in self.params:
            out.update(p.overrides(assignment[p.key]))
        return out


def _check_keys(base: RunConfig, items: dict[str, Any], where: str) -> None:
    for key, value in items.items():
        try:
            apply_overrides(base, [f"{key}={format_value(value)}"])
        except ConfigError as e:
            raise ConfigError(f"{where} {key!r}: {e}") from None


def parse_space(spec: dict[str, Any], base: RunConfig | None = None) -> Space:
    """Parse a ``space:`` mapping; with ``base``, check every key and discrete value against the config."""
    if not isinstance(spec, dict) or not spec:
        raise ConfigError("sweep: `space` must be a non-empty mapping of dotted.config.key -> values")
    params = []
    for key, value in spec.items():
        param = parse_param(str(key), value)
        if base is not None:
            if param.kind == "group":
                for name, bundle in param.groups.items():
                    _check_keys(base, bundle, f"space key {key!r} group {name!r}:")
            else:
                probe = param.values if param.kind in ("choice", "int") else [param.low, param.high]
                for v in probe:
                    _check_keys(base, {param.key: v}, "space key")
        params.append(param)
    return Space(params)
