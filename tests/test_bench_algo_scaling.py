"""``modformer bench algo-scaling``: the --tiny run through the registry (schema, headline, one row per run) and
the fit helper on synthetic data with a known exponent."""

from __future__ import annotations

import json

import numpy as np

from modformer.bench.studies.algo_scaling import MIN_POINTS, fit_relation
from modformer.cli import main


def test_tiny_run_writes_rows_fits_and_plot(tmp_path, capsys):
    assert main(["bench", "algo-scaling", "--tiny", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    data = json.loads((tmp_path / "algo_scaling.json").read_text())
    assert {"benchmark", "command", "device", "torch", "git_commit", "date", "headline", "rows"} <= set(data)
    assert data["benchmark"] == "algo_scaling" and (tmp_path / "algo_scaling.png").stat().st_size > 0
    rows = data["rows"]
    # --tiny: 2 tasks x 3 widths x 2 data settings x 2 seeds, one row each
    assert len(rows) == 24
    assert {(r["task"], r["width"], r["data"], r["seed"]) for r in rows} == {
        (t, w, d, s) for t, ds in (("modular", (0.5, 0.9)), ("sort", (20, 80))) for w in (8, 16, 24)
        for d in ds for s in (0, 1)}
    for r in rows:
        assert r["params"] > 0 and r["wall_s"] > 0 and r["loss_step"] == 10
        assert r["loss_at_step"] > 0 and 10 <= r["steps_run"] <= 20     # every run reaches its loss step
        assert 0 < r["best_loss_to_step"] <= r["loss_at_step"]
        assert r["generalised"] == (r["steps_to_generalise"] is not None)
    assert [r["train_examples"] for r in rows if r["task"] == "sort"][:1] == [20]   # the data axis is exact
    assert len({r["params"] for r in rows if r["task"] == "modular"}) == 3
    head = data["headline"]
    for task in ("modular", "sort"):
        assert head[f"{task}_runs"] == 12
        assert 0 <= head[f"{task}_generalised_share"] <= 1
        for key in ("loss_alpha", "loss_alpha_ci95", "loss_fit_meaningful", "loss_fit_note", "steps_beta",
                    "steps_beta_ci95", "steps_fit_meaningful", "steps_fit_note", "steps_fit_at_width"):
            assert f"{task}_{key}" in head
        loss_fit = data["fits"][task]["loss_vs_params"]
        assert set(loss_fit) == {str(d) for d in {r["data"] for r in rows if r["task"] == task}}
        assert all(f["fitted"] and f["points"] == 6 for f in loss_fit.values())   # 3 widths x 2 seeds
        assert set(data["fits"][task]["steps_vs_data"]) == {"8", "16", "24"}


def test_fit_recovers_a_known_exponent_within_the_noise():
    """S = A x^-beta with multiplicative log-normal noise sigma: the fit (relative error ~ a log-space fit) has
    standard error se = sigma / sqrt(sum (log x - mean)^2) on beta; it must land within 4 se, and the 95%
    bootstrap interval must have about the width that se implies (2 x 1.96 se; between 1 and 8 se here) and lie
    within 5 se of the true value."""
    rng = np.random.default_rng(0)
    beta, amp, sigma = 1.3, 40.0, 0.05
    x = np.repeat([0.2, 0.3, 0.4, 0.5, 0.6, 0.7], 3)
    y = amp * x ** -beta * np.exp(rng.normal(0, sigma, x.size))
    fit = fit_relation(x, y, irreducible=False, bootstrap=300, seed=0)
    se = sigma / np.sqrt(((np.log(x) - np.log(x).mean()) ** 2).sum())
    assert fit["fitted"] and fit["meaningful"], fit
    assert abs(fit["alpha"] - beta) < 4 * se
    lo, hi = fit["ci95"]
    assert 1 * se < hi - lo < 8 * se
    assert beta - 5 * se < lo < fit["alpha"] < hi < beta + 5 * se


def test_fit_with_a_floor_recovers_the_exponent():
    """L = E + A N^-alpha with 1% noise over three decades of N: alpha back within the noise, E close."""
    rng = np.random.default_rng(1)
    alpha, amp, floor, sigma = 0.5, 30.0, 0.8, 0.01
    n = np.repeat(np.geomspace(1e3, 1e6, 6), 2)
    clean = floor + amp * n ** -alpha
    y = clean * np.exp(rng.normal(0, sigma, n.size))
    fit = fit_relation(n, y, irreducible=True, bootstrap=300, seed=0)
    assert fit["fitted"] and fit["meaningful"], fit
    assert fit["ci95"][0] <= alpha <= fit["ci95"][1]
    assert abs(fit["alpha"] - alpha) < 0.1 and abs(fit["E"] - floor) < 0.05


def test_fit_says_when_it_is_not_meaningful():
    few = fit_relation([0.3, 0.5, 0.7], [300, 200, 150], irreducible=False)       # 3 points: not fitted
    assert not few["fitted"] and not few["meaningful"] and f">= {MIN_POINTS} points" in few["note"]
    two_x = fit_relation([0.3, 0.3, 0.7, 0.7, 0.7], [300, 310, 150, 140, 160], irreducible=False)
    assert not two_x["fitted"] and "2 distinct x" in two_x["note"]
    # steps that grow with the data: S = A x^-beta with beta >= 0 cannot follow, the exponent sits at its bound
    rising = fit_relation(np.repeat([0.3, 0.5, 0.7], 2), [100, 110, 200, 190, 300, 310], irreducible=False)
    assert rising["fitted"] and not rising["meaningful"] and "bound" in rising["note"]
