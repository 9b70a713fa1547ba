"""The sweep file: a base run config, a metric, a search space, a budget and an output folder.

    name: archsearch_modular
    base: ../grokking.yaml           # run config; relative to this file (or the working directory)
    out_dir: runs/sweeps/archsearch  # default runs/sweeps/<name>
    metric: flops_to_target          # a summary.json key or a derived one (results.DERIVED)
    mode: min                        # min | max
    rank_by: [val_acc, max]          # optional tie-break for halving promotions (metric missing = worst)
    method: grid                     # grid | random
    num_samples: 20                  # random: trials drawn (seeded)
    seed: 0
    overrides: {train.steps: 500}    # fixed for every trial (mapping or list of key=value)
    space: {model.n_layer: [1, 2], train.lr: {loguniform: [1e-3, 1e-2]}}
    halving: {eta: 3, min_steps: 100}   # optional successive halving; max steps = train.steps;
                                     # restart: true retrains promoted trials (cosine schedules)
    workers: 2                       # CPU trials at once (GPU: one per visible GPU)
    devices: auto                    # auto | cpu | [0, 1, ...] (CUDA device ids)
    per_gpu: 1                       # trials sharing each GPU at once (small models underuse an H100)
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from modformer.config import ConfigError, RunConfig, apply_overrides, load_config, parse_yaml, read_yaml_mapping
from modformer.registry import suggest
from modformer.sweep.space import Space, format_value, parse_space


@dataclass
class Halving:
    eta: int = 3
    min_steps: int = 100
    max_steps: int | None = None     # None = the base config's train.steps (after fixed overrides)
    restart: bool = False            # promoted trials retrain from scratch (exact LR schedule per rung)
                                     # instead of continuing from their end-of-rung checkpoint

    def rungs(self, max_steps: int) -> list[int]:
        """Step budgets of the rungs: min_steps * eta^k, the last one exactly max_steps."""
        if self.eta < 2 or self.min_steps < 1:
            raise ConfigError(f"halving: eta must be >= 2 and min_steps >= 1 (got {self.eta}, {self.min_steps})")
        out, s = [], self.min_steps
        while s < max_steps:
            out.append(s)
            s *= self.eta
        return out + [max_steps]


@dataclass
class SweepSpec:
    name: str
    base: str
    space: dict[str, Any]
    metric: str = "final_val_loss"
    mode: str = "min"
    rank_by: list[Any] | None = None
    method: str = "grid"
    num_samples: int = 10
    seed: int = 0
    out_dir: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    halving: Halving | None = None
    workers: int = 1
    devices: Any = "auto"
    per_gpu: int = 1
    path: str | None = None          # the sweep file (to resolve `base`)

    @property
    def folder(self) -> Path:
        return Path(self.out_dir or f"runs/sweeps/{self.name}")

    def base_path(self) -> Path:
        p = Path(self.base)
        if not p.is_absolute() and self.path is not None and (Path(self.path).parent / p).is_file():
            return Path(self.path).parent / p
        return p

    def base_config(self) -> RunConfig:
        cfg = load_config(self.base_path())
        try:
            return apply_overrides(cfg, [f"{k}={format_value(v)}" for k, v in self.overrides.items()]).validate()
        except ConfigError as e:
            raise ConfigError(f"sweep overrides: {e}") from None

    def parsed_space(self) -> Space:
        return parse_space(self.space, self.base_config())

    def max_steps(self) -> int:
        if self.halving and self.halving.max_steps:
            return self.halving.max_steps
        return self.base_config().train.steps

    def rungs(self) -> list[int]:
        """Step budgets of the halving rungs; without halving one rung (each trial's own train.steps)."""
        return self.halving.rungs(self.max_steps()) if self.halving else [self.max_steps()]


def _overrides(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, dict):
        return {str(k): v for k, v in value.items()}
    if isinstance(value, list):
        out = {}
        for item in value:
            if not isinstance(item, str) or "=" not in item:
                raise ConfigError(f"sweep overrides: {item!r} must look like key=value")
            k, v = item.split("=", 1)
            out[k.strip()] = parse_yaml(v, f"sweep override {item}") if v else ""
        return out
    raise ConfigError("sweep overrides must be a mapping or a list of key=value")


def parse_sweep(raw: dict[str, Any], path: str | None = None) -> SweepSpec:
    """Validate a sweep mapping -> SweepSpec (one-line ConfigErrors naming the key)."""
    if not isinstance(raw, dict):
        raise ConfigError("sweep file: top level must be a mapping")
    names = [f.name for f in fields(SweepSpec) if f.name != "path"]
    for key in raw:
        if key not in names:
            raise ConfigError(f"sweep: unknown key {key!r}{suggest(str(key), names)}")
    for key in ("name", "base", "space"):
        if key not in raw:
            raise ConfigError(f"sweep: missing required key {key!r}")
    data = dict(raw)
    data["overrides"] = _overrides(raw.get("overrides"))
    if raw.get("halving") is not None:
        h = raw["halving"]
        if not isinstance(h, dict):
            raise ConfigError("sweep: halving must be a mapping (eta, min_steps, max_steps)")
        hn = [f.name for f in fields(Halving)]
        for key in h:
            if key not in hn:
                raise ConfigError(f"sweep: unknown key 'halving.{key}'{suggest(str(key), hn)}")
        data["halving"] = Halving(**h)
    spec = SweepSpec(**data, path=path)
    if spec.mode not in ("min", "max"):
        raise ConfigError(f"sweep: mode must be min or max, got {spec.mode!r}")
    if spec.method not in ("grid", "random"):
        raise ConfigError(f"sweep: method must be grid or random, got {spec.method!r}")
    if not isinstance(spec.num_samples, int) or spec.num_samples < 1:
        raise ConfigError(f"sweep: num_samples must be a positive integer, got {spec.num_samples!r}")
    if spec.rank_by is not None and (len(spec.rank_by) != 2 or spec.rank_by[1] not in ("min", "max")):
        raise ConfigError(f"sweep: rank_by must be [metric, min|max], got {spec.rank_by!r}")
    if not isinstance(spec.workers, int) or spec.workers < 1:
        raise ConfigError(f"sweep: workers must be a positive integer, got {spec.workers!r}")
    if not isinstance(spec.per_gpu, int) or spec.per_gpu < 1:
        raise ConfigError(f"sweep: per_gpu must be a positive integer, got {spec.per_gpu!r}")
    return spec


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> SweepSpec:
    """Read a sweep YAML; ``overrides`` are ``key=value`` strings for the sweep's own keys
    (``num_samples=4``, ``halving.min_steps=50``, ``overrides.train.steps=100``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file not found: {path}")
    raw = read_yaml_mapping(path)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"sweep override {item!r} must look like key=value")
        key, text = item.split("=", 1)
        value = parse_yaml(text, f"override {item}") if text else ""
        head, _, rest = key.partition(".")
        if head in ("overrides", "space") and rest:
            node = raw.setdefault(head, {})
            if isinstance(node, list):
                node = raw[head] = _overrides(node)
            node[rest] = value
        elif head == "halving" and rest:
            raw.setdefault("halving", {})[rest] = value
        else:
            raw[key] = value
    return parse_sweep(raw, str(path))
