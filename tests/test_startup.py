"""Start-up: what the trainer's imports and construction load, and `modformer bench startup` end to end (tiny)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ("matplotlib", "tensorboard", "transformers", "peft")


def test_trainer_import_and_a_run_without_tensorboard_load_no_optional_package(tmp_path):
    """Importing the trainer and the full CLI parser, and building a Trainer with tensorboard off, load none of
    matplotlib, tensorboard, transformers or peft (the report's plots import matplotlib at the end of a run)."""
    code = ("import sys\nfrom modformer.cli import build_parser\nbuild_parser()\n"
            "from modformer.config import load_config\nfrom modformer.train.trainer import Trainer\n"
            f"cfg = load_config({str(ROOT / 'configs' / 'grokking.yaml')!r}, ['model.n_layer=1', 'model.d_model=32', "
            f"'model.d_ff=64', 'train.tensorboard=false', 'train.progress=false', 'out_dir={tmp_path}'])\n"
            "tr = Trainer(cfg)\ntr.train_step()\ntr.lock.release()\n"
            "print(' '.join(sorted(m.split('.')[0] for m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    loaded = set(out.stdout.split())
    assert "torch" in loaded and not loaded & set(OPTIONAL), loaded & set(OPTIONAL)


def test_bench_startup_reports_every_phase(tmp_path):
    from modformer.bench import startup

    assert startup.main(["--config", str(ROOT / "configs" / "grokking.yaml"), "--set", "model.n_layer=1",
                         "--set", "model.d_model=32", "--set", "model.d_ff=64", "--set", "train.tensorboard=false",
                         "--device", "cpu", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "startup.json").read_text())
    head, rows = result["headline"], {r["phase"]: r["seconds"] for r in result["rows"]}
    assert head["device"] == "cpu" and head["trainer_init_s"] > 0 and head["first_step_s"] > 0
    parts = {k.removeprefix("  Trainer(): "): v for k, v in rows.items() if k.startswith("  Trainer(): ")}
    assert list(parts) == ["set-up (device, precision, profiler)", "dataset (build_dataset)",
                           "model (build, to device, EMA)", "wrap and torch.compile (imports Dynamo / Inductor)",
                           "optimizer, schedule, pruner", "run folder, metrics logger, resume"]
    assert all(v > 0 for v in parts.values()) and sum(parts.values()) <= head["trainer_init_s"]   # laps of it
    assert head["compile_wrapper_s"] == parts["wrap and torch.compile (imports Dynamo / Inductor)"]
    assert head["process_wall_s"] >= head["trainer_init_s"] + head["first_step_s"]


def test_compiled_runs_use_a_persistent_inductor_cache_unless_one_is_set(tmp_path, monkeypatch):
    from modformer.config import load_config
    from modformer.train.compile_cache import use_persistent_cache
    from modformer.train.trainer import Trainer

    monkeypatch.setenv("MODFORMER_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    cfg = load_config(ROOT / "configs" / "grokking.yaml", ["model.n_layer=1", "model.d_model=32", "model.d_ff=64",
                                                           "train.compile=true", "train.tensorboard=false",
                                                           "train.progress=false", f"out_dir={tmp_path}"])
    Trainer(cfg).lock.release()
    import os

    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache" / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cold"))      # a benchmark's empty cache is kept
    assert use_persistent_cache() == tmp_path / "cold"
