"""Sweeps: search-space parsing, scheduling with a fake runner (halving, resume), one real tiny sweep,
and scaling-law fits on synthetic data with known parameters."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from modformer.config import ConfigError, load_config
from modformer.sweep import Sweep, fit_chinchilla, fit_power, load_sweep, parse_space, parse_sweep
from modformer.sweep.results import pareto_front, read_table
from modformer.sweep.scaling import analyze, compute_optimal
from modformer.sweep.space import format_value

TINY = {"name": "tiny",
        "model": {"n_layer": 1, "d_model": 16, "n_head": 2, "max_seq_len": 3, "attn_backend": "eager"},
        "data": {"name": "modular", "options": {"p": 7, "train_fraction": 0.5}},
        "train": {"steps": 10, "batch_size": 0, "lr": 0.01, "eval_every": 5, "log_every": 5, "threads": 1}}


@pytest.fixture
def base(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


# ---- search space ----------------------------------------------------------------------
def test_grid_size_and_values(base: Path) -> None:
    cfg = load_config(base)
    space = parse_space({"model.n_layer": [1, 2, 3], "model.d_model": {"choice": [16, 32]},
                         "train.lr": {"loguniform": [1e-4, 1e-2], "num": 3},
                         "model.n_head": {"int": [1, 4], "step": 1}, "train.seed": 0}, cfg)
    assert space.grid_size() == 3 * 2 * 3 * 4 * 1 == len(space.grid())
    lrs = sorted({a["train.lr"] for a in space.grid()})
    assert np.allclose(lrs, [1e-4, 1e-3, 1e-2])


def test_random_sampling_is_seeded(base: Path) -> None:
    spec = {"train.lr": {"loguniform": [1e-4, 1e-1]}, "train.weight_decay": {"uniform": [0, 2]},
            "model.n_layer": {"int": [1, 8]}, "model.norm": ["layernorm", "rmsnorm"]}
    space = parse_space(spec, load_config(base))
    a, b, c = space.sample(20, seed=3), space.sample(20, seed=3), space.sample(20, seed=4)
    assert a == b and a != c
    assert all(1e-4 <= s["train.lr"] <= 1e-1 and 0 <= s["train.weight_decay"] <= 2 for s in a)
    assert {s["model.n_layer"] for s in a} <= set(range(1, 9))
    with pytest.raises(ConfigError, match="continuous"):
        space.grid()


@pytest.mark.parametrize("spec, match", [
    ({"model.n_layre": [1, 2]}, "model.n_layre.*n_layer"),
    ({"train.lr": {"logunifrom": [1e-4, 1e-2]}}, "train.lr.*loguniform"),
    ({"train.lr": {"loguniform": [0, 1e-2]}}, "train.lr.*low > 0"),
    ({"train.lr": {"uniform": [1.0, 0.5]}}, "train.lr.*low < high"),
    ({"model.n_layer": {"int": [1, 2.5]}}, "model.n_layer.*integers"),
    ({"model.n_layer": ["two"]}, "model.n_layer.*integer"),
    ({"recipe": {"group": {"old": {"model.norm_placment": "post"}}}}, "group 'old'.*norm_placement"),
])
def test_bad_space_errors_name_the_key(base: Path, spec: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_space(spec, load_config(base))


def test_groups_and_value_formatting(base: Path) -> None:
    space = parse_space({"recipe": {"group": {"old": {"model.norm_placement": "post", "model.ffn": "relu"},
                                              "new": {"model.norm": "rmsnorm", "model.ffn": "swiglu"}}}},
                        load_config(base))
    assert [a["recipe"] for a in space.grid()] == ["old", "new"]
    assert space.overrides({"recipe": "new"}) == {"model.norm": "rmsnorm", "model.ffn": "swiglu"}
    assert yaml.safe_load(format_value(1e-5)) == 1e-5 and yaml.safe_load(format_value("+")) == "+"
    assert yaml.safe_load(format_value("true")) == "true" and yaml.safe_load(format_value([0.9, 0.95])) == [0.9, 0.95]


def test_sweep_file_errors(base: Path) -> None:
    with pytest.raises(ConfigError, match="metrc.*metric"):
        parse_sweep({"name": "s", "base": str(base), "space": {"train.lr": [1]}, "metrc": "x"})
    with pytest.raises(ConfigError, match="missing required key 'space'"):
        parse_sweep({"name": "s", "base": str(base)})
    with pytest.raises(ConfigError, match="mode"):
        parse_sweep({"name": "s", "base": str(base), "space": {"train.lr": [1]}, "mode": "lowest"})


# ---- scheduling with a fake runner -----------------------------------------------------
class _Done:
    def poll(self) -> int:
        return 0

    def terminate(self) -> None:
        pass


class FakeRunner:
    """Writes a summary.json instantly; loss = 1/lr-rank-ish function of the params and steps."""

    def __init__(self, interrupt_after: int | None = None) -> None:
        self.started: list[tuple[str, int, bool]] = []
        self.interrupt_after = interrupt_after

    def start(self, job, env, extra):  # noqa: ANN001, ANN201
        if self.interrupt_after is not None and len(self.started) >= self.interrupt_after:
            raise KeyboardInterrupt
        self.started.append((job.trial.id, job.steps, job.resume))
        (job.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (job.run_dir / "checkpoints" / "latest").write_text("x")
        loss = 1.0 / job.trial.params["train.lr"] + 10.0 / job.steps
        (job.run_dir / "summary.json").write_text(json.dumps(
            {"steps": job.steps, "stop_reason": "steps", "final_val_loss": loss, "params": 100}))
        return _Done()


def _spec(base: Path, tmp_path: Path, **kw) -> object:
    raw = {"name": "fake", "base": str(base), "out_dir": str(tmp_path / "sweep"), "metric": "final_val_loss",
           "mode": "min", "space": {"train.lr": [float(i) for i in range(1, 10)]}, "workers": 2,
           "devices": "cpu", **kw}
    return parse_sweep(raw)


def test_successive_halving_keeps_best_fraction(base: Path, tmp_path: Path) -> None:
    spec = _spec(base, tmp_path, halving={"eta": 3, "min_steps": 10, "max_steps": 90})
    runner = FakeRunner()
    sweep = Sweep(spec, runner=runner, log=lambda *_: None)
    assert sweep.rungs == [10, 30, 90] and sweep.plan() == [9, 3, 1]
    rows = sweep.run()
    by_rung = {s: sorted(t for t, st, _ in runner.started if st == s) for s in (10, 30, 90)}
    assert len(by_rung[10]) == 9
    assert by_rung[30] == ["t0006", "t0007", "t0008"]        # the three largest lr = the lowest losses
    assert by_rung[90] == ["t0008"]
    assert all(r for t, s, r in runner.started if s > 10)    # later rungs continue from the checkpoint
    best = [r for r in rows if r["trial"] == "t0008"][0]
    assert best["rung_steps"] == 90
    assert yaml.safe_load((tmp_path / "sweep" / "best.yaml").read_text())["train"]["lr"] == 9.0
    assert len(read_table(tmp_path / "sweep" / "results.csv")) == 9
    again = FakeRunner()
    Sweep(_spec(base, tmp_path / "r", halving={"eta": 3, "min_steps": 10, "max_steps": 90, "restart": True}),
          runner=again, log=lambda *_: None).run()
    assert len(again.started) == 13 and not any(r for _, _, r in again.started)   # retrained from scratch
    assert (tmp_path / "sweep" / "plots" / "pareto.png").is_file()


def test_resume_skips_finished_trials(base: Path, tmp_path: Path) -> None:
    spec = _spec(base, tmp_path)
    with pytest.raises(KeyboardInterrupt):
        Sweep(spec, runner=FakeRunner(interrupt_after=4), log=lambda *_: None).run()
    state = json.loads((tmp_path / "sweep" / "state.json").read_text())
    assert len(state["records"]) == 4
    # a trial that finished but whose record was lost in the interruption is adopted, not rerun
    del state["records"]["t0003"]
    (tmp_path / "sweep" / "state.json").write_text(json.dumps(state))
    with pytest.raises(ConfigError, match="--resume"):
        Sweep(spec, runner=FakeRunner(), log=lambda *_: None)
    runner = FakeRunner()
    rows = Sweep(spec, runner=runner, resume=True, log=lambda *_: None).run()
    assert sorted(t for t, _, _ in runner.started) == [f"t{i:04d}" for i in range(4, 9)]
    assert len(rows) == 9
    changed = _spec(base, tmp_path, space={"train.lr": [1.0, 2.0]})
    with pytest.raises(ConfigError, match="differ"):
        Sweep(changed, runner=FakeRunner(), resume=True, log=lambda *_: None)


def test_per_trial_budgets_and_gpu_slots(base: Path, tmp_path: Path) -> None:
    runner = FakeRunner()
    spec = _spec(base, tmp_path, space={"train.lr": [1.0], "train.steps": [5, 7]}, devices=[0, 1])
    sweep = Sweep(spec, runner=runner, log=lambda *_: None)
    assert [env["CUDA_VISIBLE_DEVICES"] for env, _ in sweep.slots] == ["0", "1"]   # one trial per GPU
    shared = Sweep(_spec(base, tmp_path / "s", devices=[0, 1], per_gpu=2), runner=runner, log=lambda *_: None)
    assert sorted(env["CUDA_VISIBLE_DEVICES"] for env, _ in shared.slots) == ["0", "0", "1", "1"]
    with pytest.raises(ConfigError, match="per_gpu"):
        _spec(base, tmp_path / "bad", per_gpu=0)
    sweep.run()
    assert sorted(s for _, s, _ in runner.started) == [5, 7]
    with pytest.raises(ConfigError, match="halving"):
        Sweep(_spec(base, tmp_path / "h", space={"train.steps": [5, 7]}, halving={"min_steps": 2}),
              runner=runner, log=lambda *_: None)
    cpu = Sweep(_spec(base, tmp_path / "c", devices="cpu"), runner=runner, workers=2, log=lambda *_: None)
    assert len(cpu.slots) == 2 and all("train.device=cpu" in extra for _, extra in cpu.slots)


def test_pareto_front() -> None:
    pts = [(1, 5.0), (2, 3.0), (3, 4.0), (4, 1.0), (5, 1.0)]
    assert pareto_front(pts, "min") == [0, 1, 3]
    assert pareto_front(pts, "max") == [0]


# ---- one real, tiny end-to-end sweep (subprocess trials) --------------------------------
def test_real_tiny_sweep_cli(base: Path, tmp_path: Path, capsys) -> None:
    from modformer.cli import main

    sweep_file = tmp_path / "s.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "name": "real", "base": "tiny.yaml", "out_dir": str(tmp_path / "out"), "metric": "final_val_loss",
        "mode": "min", "space": {"model.d_model": [8, 16]}, "overrides": {"train.steps": 4, "train.eval_every": 4},
        "devices": "cpu"}))
    assert main(["sweep", str(sweep_file), "--workers", "2"]) == 0
    rows = read_table(tmp_path / "out" / "results.jsonl")
    assert [r["status"] for r in rows] == ["ok", "ok"] and all(r["steps"] == 4 for r in rows)
    assert rows[1]["params"] > rows[0]["params"] and rows[0]["flops"] > 0
    out = capsys.readouterr().out           # progress: banner, a line per trial start and end (with ETA), table
    assert "[real] 2 trials" in out and "start t0000@4 (model.d_model=8)" in out and "2/2 runs done" in out
    table = out[out.index("rank  trial"):].splitlines()
    best = min(rows, key=lambda r: r["final_val_loss"])["trial"]
    assert table[0].split() == ["rank", "trial", "model.d_model", "status", "steps", "final_val_loss", "seconds"]
    assert table[1].split()[:2] == ["1", best] and len(table) == 3
    # resuming a finished sweep runs nothing more
    assert main(["sweep", str(sweep_file), "--resume"]) == 0
    assert load_sweep(sweep_file, ["num_samples=3", "halving.min_steps=2"]).halving.min_steps == 2


# ---- scaling laws ----------------------------------------------------------------------
TRUE = {"E": 1.69, "A": 406.4, "alpha": 0.34, "B": 410.7, "beta": 0.28}


def _synthetic(noise: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n, d = np.meshgrid(np.geomspace(1e6, 1e9, 7), np.geomspace(1e8, 1e11, 5))
    n, d = n.ravel(), d.ravel()
    loss = (TRUE["E"] + TRUE["A"] / n ** TRUE["alpha"] + TRUE["B"] / d ** TRUE["beta"])
    return n, d, loss * np.exp(rng.normal(0, noise, n.size))


def test_chinchilla_fit_recovers_parameters() -> None:
    n, d, loss = _synthetic(noise=0.0)
    exact = fit_chinchilla(n, d, loss, bootstrap=0)
    for k, v in TRUE.items():
        assert exact.params[k] == pytest.approx(v, rel=0.02), k
    hits = {"E": 0, "alpha": 0, "beta": 0}
    for seed in range(3):                                    # 0.5% noise, 3 realisations
        n, d, loss = _synthetic(noise=0.005, seed=seed)
        fit = fit_chinchilla(n, d, loss, bootstrap=40, seed=1)
        assert fit.params["alpha"] == pytest.approx(0.34, abs=0.03)
        assert fit.params["beta"] == pytest.approx(0.28, abs=0.03)
        assert fit.params["E"] == pytest.approx(1.69, abs=0.1)
        for k in hits:
            lo, hi = fit.interval(k)
            hits[k] += lo <= TRUE[k] <= hi
    assert min(hits.values()) >= 2, hits                      # 95% intervals: (nearly) always cover
    opt, true_opt = compute_optimal(fit.params, 1e21), compute_optimal(TRUE, 1e21)
    assert opt["n_opt"] == pytest.approx(true_opt["n_opt"], rel=0.5)
    assert 6 * opt["n_opt"] * opt["d_opt"] == pytest.approx(1e21)


def test_power_law_fit_and_interval() -> None:
    rng = np.random.default_rng(0)
    c = np.geomspace(1e15, 1e21, 15)
    loss = (2.0 + 50.0 * c ** -0.1) * np.exp(rng.normal(0, 0.003, c.size))
    fit = fit_power(c, loss, bootstrap=100)
    assert fit.params["alpha"] == pytest.approx(0.1, abs=0.02)
    lo, hi = fit.interval("alpha")
    assert lo <= 0.1 <= hi
    pure = fit_power(c, 50.0 * c ** -0.1, irreducible=False, bootstrap=0)
    assert pure.params["E"] == 0 and pure.params["alpha"] == pytest.approx(0.1, abs=1e-3)


def test_scaling_cli_on_results(tmp_path: Path) -> None:
    from modformer.cli import main

    n, d, loss = _synthetic(noise=0.003)
    rows = [{"params": a, "tokens": b, "flops": 6 * a * b, "final_val_loss": c} for a, b, c in zip(n, d, loss)]
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["scaling", str(path), "--budget", "1e21", "--bootstrap", "20", "--out", str(tmp_path / "sc")]) == 0
    out = json.loads((tmp_path / "sc" / "scaling.json").read_text())
    assert out["chinchilla"]["params"]["alpha"] == pytest.approx(0.34, abs=0.05)
    assert out["compute_optimal"][0]["n_opt"] > 0 and "power" in out
    assert (tmp_path / "sc" / "scaling_nd.png").is_file() and (tmp_path / "sc" / "scaling_c.png").is_file()
    with pytest.raises(ConfigError, match="finite"):
        analyze([{"final_val_loss": None}], tmp_path / "x")
