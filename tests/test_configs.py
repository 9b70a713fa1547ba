"""Every shipped YAML in configs/ loads with its own loader and, for runs, builds its model."""

import dataclasses
from pathlib import Path

import pytest

import modformer as mf
from modformer.compose import calm, cbtm, gates_run
from modformer.compose.spec import load_spec
from modformer.compress.distill import load_distill_config
from modformer.config import load_config
from modformer.sweep.spec import load_sweep

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
COMPOSE = {"compose_calm.yaml": calm, "compose_calm_base.yaml": calm, "compose_calm_vocab.yaml": calm,
           "compose_cbtm.yaml": cbtm,
           "compose_cbtm_taskmix.yaml": cbtm, "compose_gates.yaml": gates_run}
DISTILL = {"sparse_gate.yaml", "sparse_gate_4k.yaml", "sparse_performer.yaml", "sparse_sink.yaml",
           "sparse_sink512.yaml", "sparse_window.yaml"}


def _all() -> list[Path]:
    return sorted(CONFIGS.rglob("*.yaml"))


@pytest.mark.parametrize("path", _all(), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_shipped_config_loads(path: Path) -> None:
    if path.parent.name == "sweeps":
        assert load_sweep(path).name
    elif path.name in COMPOSE:
        assert load_spec(path, COMPOSE[path.name].DEFAULTS)["name"]
    elif path.name in DISTILL:
        assert load_distill_config(path).student
    else:                                     # a training run: its model must build
        cfg = load_config(path, [])
        model = mf.build_model(dataclasses.replace(cfg.model, vocab_size=cfg.model.vocab_size or 64))
        assert sum(p.numel() for p in model.parameters()) > 0
