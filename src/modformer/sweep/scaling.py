"""Scaling-law fits: L(N, D) = E + A/N^alpha + B/D^beta (Chinchilla) and L(C) = E + A/C^alpha.

Fitting is variable projection: for fixed exponents the loss is linear in (E, A, B), solved exactly as
non-negative least squares (all 7 supports of 3 coefficients, keep the best feasible), in relative
error (residuals divided by L, like a fit in log space). The exponents come from a coarse grid then
repeated zooming around the best point, so there is no starting-point lottery. Uncertainty is a
bootstrap over rows (percentile intervals).

Compute-optimal allocation for C = 6 N D (Hoffmann et al. 2022, eq. 4):
    N_opt = G (C/6)^(beta/(alpha+beta)),  D_opt = C / (6 N_opt),  G = (alpha A / (beta B))^(1/(alpha+beta))
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modformer.config import ConfigError

CHINCHILLA = ("E", "A", "alpha", "B", "beta")
POWER = ("E", "A", "alpha")
_SUPPORTS = [s for r in (1, 2, 3) for s in itertools.combinations(range(3), r)]


def _nnls_batch(X: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted NNLS for a batch of designs X (G, n, k<=3) -> coefficients (G, k), objective (G,)."""
    G, n, k = X.shape
    Xw, yw = X * w[None, :, None], (y * w)[None, :]
    best_obj = np.full(G, np.inf)
    best_coef = np.zeros((G, k))
    for support in _SUPPORTS:
        if max(support) >= k:
            continue
        s = list(support)
        A = Xw[:, :, s]                                       # (G, n, |s|)
        gram = A.transpose(0, 2, 1) @ A + 1e-12 * np.eye(len(s))
        rhs = A.transpose(0, 2, 1) @ yw[..., None]            # (G, |s|, 1)
        try:
            coef = np.linalg.solve(gram, rhs)[..., 0]
        except np.linalg.LinAlgError:
            continue
        resid = (A @ coef[..., None])[..., 0] - yw
        obj = (resid ** 2).sum(-1)
        ok = (coef >= 0).all(-1) & np.isfinite(obj) & (obj < best_obj)
        best_obj = np.where(ok, obj, best_obj)
        full = np.zeros((G, k))
        full[:, s] = coef
        best_coef = np.where(ok[:, None], full, best_coef)
    return best_coef, best_obj


def _design(exps: np.ndarray, logs: list[np.ndarray], irreducible: bool) -> tuple[np.ndarray, np.ndarray]:
    """Columns [1, x1^-e1, x2^-e2] (scaled to max 1) for a batch of exponent vectors (G, m)."""
    G, n = exps.shape[0], logs[0].shape[0]
    cols, scales = [], []
    if irreducible:
        cols.append(np.ones((G, n)))
        scales.append(np.ones(G))
    for j, lx in enumerate(logs):
        c = np.exp(-exps[:, j:j + 1] * lx[None, :])         # (G, n)
        s = c.max(1)
        cols.append(c / s[:, None])
        scales.append(s)
    return np.stack(cols, -1), np.stack(scales, -1)


def _fit(logs: list[np.ndarray], loss: np.ndarray, irreducible: bool = True,
         bounds: tuple[float, float] = (0.01, 2.5), grid: int = 40, zooms: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Best (coefficients, exponents) for L = E + sum_j c_j x_j^-e_j."""
    m = len(logs)
    w = 1.0 / loss
    axes = [np.linspace(*bounds, grid)] * m
    step = (bounds[1] - bounds[0]) / (grid - 1)
    best_e, best_c = None, None
    for _ in range(zooms + 1):
        exps = np.array(list(itertools.product(*axes)))     # (G, m)
        X, scales = _design(exps, logs, irreducible)
        coef, obj = _nnls_batch(X, loss, w)
        i = int(np.argmin(obj))
        best_e, best_c = exps[i], coef[i] / scales[i]
        axes = [np.clip(np.linspace(e - 2 * step, e + 2 * step, 9), *bounds) for e in best_e]
        step /= 2
    if not irreducible:
        best_c = np.concatenate([[0.0], best_c])
    return best_c, best_e


@dataclass
class Fit:
    """Point estimates, bootstrap draws and percentile intervals of a scaling law's parameters."""

    kind: str                                   # chinchilla | power
    params: dict[str, float]
    draws: dict[str, np.ndarray]
    level: float = 0.95

    def interval(self, name: str) -> tuple[float, float]:
        d = self.draws[name]
        q = (1 - self.level) / 2
        return float(np.quantile(d, q)), float(np.quantile(d, 1 - q))

    def predict(self, *x: Any) -> np.ndarray:
        return _predict(self.kind, self.params, *x)

    def warnings(self, bounds: tuple[float, float] = (0.01, 2.5)) -> list[str]:
        """Exponents stuck at the search bounds: the data do not determine them (fit not trustworthy)."""
        return [f"{k}={self.params[k]:.3g} is at the search bound {bounds}" for k in ("alpha", "beta")
                if k in self.params and min(abs(self.params[k] - b) for b in bounds) < 1e-6]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "level": self.level, "params": self.params, "warnings": self.warnings(),
                "intervals": {k: self.interval(k) for k in self.draws}, "bootstrap": len(next(iter(
                    self.draws.values()))) if self.draws else 0}


def _predict(kind: str, p: dict[str, float], *x: Any) -> np.ndarray:
    if kind == "chinchilla":
        n, d = (np.asarray(v, dtype=float) for v in x)
        return p["E"] + p["A"] / n ** p["alpha"] + p["B"] / d ** p["beta"]
    c = np.asarray(x[0], dtype=float)
    return p["E"] + p["A"] / c ** p["alpha"]


def fit_chinchilla(n: Any, d: Any, loss: Any, bootstrap: int = 200, seed: int = 0, level: float = 0.95,
                   grid: int = 40) -> Fit:
    """Fit L(N, D) = E + A/N^alpha + B/D^beta, with a row bootstrap of ``bootstrap`` refits."""
    n, d, loss = (np.asarray(v, dtype=float) for v in (n, d, loss))
    if len(np.unique(n)) < 2 or len(np.unique(d)) < 2 or len(loss) < 5:
        raise ConfigError("a Chinchilla fit needs >= 5 rows with >= 2 distinct sizes N and >= 2 token counts D "
                          f"(got {len(loss)} rows, {len(np.unique(n))} N, {len(np.unique(d))} D); fit L(C) instead")
    if (n <= 0).any() or (d <= 0).any() or (loss <= 0).any():
        raise ConfigError("N, D and the loss must all be positive")

    def one(idx: np.ndarray, g: int) -> dict[str, float]:
        c, e = _fit([np.log(n[idx]), np.log(d[idx])], loss[idx], grid=g)
        return {"E": c[0], "A": c[1], "alpha": e[0], "B": c[2], "beta": e[1]}

    params = one(np.arange(len(loss)), grid)
    draws = _bootstrap(one, len(loss), bootstrap, seed, max(16, grid // 2))
    return Fit("chinchilla", {k: float(v) for k, v in params.items()}, draws, level)


def fit_power(c: Any, loss: Any, irreducible: bool = True, bootstrap: int = 200, seed: int = 0,
              level: float = 0.95, grid: int = 200) -> Fit:
    """Fit L(C) = E + A/C^alpha (E = 0 with ``irreducible=False``)."""
    c, loss = np.asarray(c, dtype=float), np.asarray(loss, dtype=float)
    if len(np.unique(c)) < 3:
        raise ConfigError(f"an L(C) fit needs >= 3 distinct compute values (got {len(np.unique(c))})")
    if (c <= 0).any() or (loss <= 0).any():
        raise ConfigError("compute and the loss must all be positive")

    def one(idx: np.ndarray, g: int) -> dict[str, float]:
        coef, e = _fit([np.log(c[idx])], loss[idx], irreducible=irreducible, grid=g)
        return {"E": coef[0], "A": coef[1], "alpha": e[0]}

    params = one(np.arange(len(loss)), grid)
    draws = _bootstrap(one, len(loss), bootstrap, seed, max(40, grid // 2))
    return Fit("power", {k: float(v) for k, v in params.items()}, draws, level)


def _bootstrap(one: Any, n: int, reps: int, seed: int, grid: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out: dict[str, list[float]] = {}
    for _ in range(reps):
        idx = rng.integers(0, n, n)
        for k, v in one(idx, grid).items():
            out.setdefault(k, []).append(float(v))
    return {k: np.array(v) for k, v in out.items()}


def compute_optimal(p: dict[str, float], budget: float, flops_per_param_token: float = 6.0) -> dict[str, float]:
    """N_opt, D_opt and the predicted loss for ``budget`` FLOPs under L(N, D) with C = k N D."""
    a, b = p["alpha"], p["beta"]
    if p["A"] <= 0 or p["B"] <= 0:
        return {"n_opt": float("nan"), "d_opt": float("nan"), "loss_opt": float("nan")}
    g = (a * p["A"] / (b * p["B"])) ** (1.0 / (a + b))
    n_opt = g * (budget / flops_per_param_token) ** (b / (a + b))
    d_opt = budget / (flops_per_param_token * n_opt)
    return {"n_opt": float(n_opt), "d_opt": float(d_opt),
            "loss_opt": float(_predict("chinchilla", p, n_opt, d_opt))}


def compute_optimal_interval(fit: Fit, budget: float, flops_per_param_token: float = 6.0) -> dict[str, Any]:
    """compute_optimal at the point estimate plus bootstrap percentile intervals."""
    point = compute_optimal(fit.params, budget, flops_per_param_token)
    reps = len(fit.draws["E"])
    sims = [compute_optimal({k: float(fit.draws[k][i]) for k in CHINCHILLA}, budget, flops_per_param_token)
            for i in range(reps)]
    q = (1 - fit.level) / 2
    out: dict[str, Any] = {"budget": budget, **point}
    for key in point:
        vals = np.array([s[key] for s in sims])
        vals = vals[np.isfinite(vals)]
        if len(vals):
            out[f"{key}_interval"] = (float(np.quantile(vals, q)), float(np.quantile(vals, 1 - q)))
    return out


def _save_loss_plot(fig: Any, ax: Any, xlabel: str, title: str, path: Path) -> Path:
    """Shared finish of the scaling plots: log x axis, labels, legend, grid, atomic PNG write."""
    import matplotlib.pyplot as plt

    from modformer.utils import atomic_write

    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return path


def plot_fits(rows_n: np.ndarray, rows_d: np.ndarray | None, rows_c: np.ndarray | None, loss: np.ndarray,
              chin: Fit | None, power: Fit | None, out: Path) -> list[Path]:
    """scaling_nd.png (loss vs N per token budget D, fitted curves) and scaling_c.png (loss vs compute)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    if chin is not None and rows_d is not None:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        grid = np.geomspace(rows_n.min() / 1.5, rows_n.max() * 1.5, 100)
        for i, dv in enumerate(np.unique(rows_d)):
            m = rows_d == dv
            ax.scatter(rows_n[m], loss[m], color=f"C{i}", s=18, label=f"D={dv:.3g}")
            ax.plot(grid, chin.predict(grid, np.full_like(grid, dv)), color=f"C{i}", lw=1)
        p = chin.params
        paths.append(_save_loss_plot(fig, ax, "parameters N", f"E={p['E']:.3g}  α={p['alpha']:.3g}  β={p['beta']:.3g}",
                                     out / "scaling_nd.png"))
    if power is not None and rows_c is not None:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        ax.scatter(rows_c, loss, s=18, alpha=0.6, label="runs")
        grid = np.geomspace(rows_c.min() / 1.5, rows_c.max() * 3, 100)
        ax.plot(grid, power.predict(grid), "r-", label="fit")
        reps = len(power.draws["E"])
        curves = np.array([_predict("power", {k: power.draws[k][i] for k in POWER}, grid) for i in range(reps)])
        q = (1 - power.level) / 2
        ax.fill_between(grid, np.quantile(curves, q, 0), np.quantile(curves, 1 - q, 0), color="r", alpha=0.15,
                        label=f"{power.level:.0%} bootstrap")
        p = power.params
        paths.append(_save_loss_plot(fig, ax, "training FLOPs C",
                                     f"L(C) = {p['E']:.3g} + {p['A']:.3g} C^-{p['alpha']:.3g}", out / "scaling_c.png"))
    return paths


def frontier(c: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """Indices of the runs on the lower envelope of loss vs compute (no cheaper run is better)."""
    order = np.argsort(c)
    keep, best = [], np.inf
    for i in order:
        if loss[i] < best:
            keep.append(i)
            best = loss[i]
    return np.array(keep)


def analyze(rows: list[dict[str, Any]], out: Path, loss_key: str = "final_val_loss", n_key: str = "params",
            d_key: str = "tokens", c_key: str = "flops", budgets: list[float] | None = None,
            bootstrap: int = 200, seed: int = 0) -> dict[str, Any]:
    """Fit what the rows support, write scaling.json and plots into ``out``; return the result."""
    def col(key: str) -> np.ndarray | None:
        vals = [r.get(key) for r in rows]
        return np.array(vals, dtype=float) if all(isinstance(v, (int, float)) for v in vals) else None

    rows = [r for r in rows if r.get("status", "ok") != "failed" and isinstance(r.get(loss_key), (int, float))
            and np.isfinite(r[loss_key])]
    if not rows:
        raise ConfigError(f"no rows with a finite {loss_key!r}")
    loss = np.array([r[loss_key] for r in rows], dtype=float)
    n, d, c = col(n_key), col(d_key), col(c_key)
    result: dict[str, Any] = {"rows": len(rows), "loss_key": loss_key, "n_key": n_key, "d_key": d_key, "c_key": c_key}
    chin = power = None
    if n is not None and d is not None:
        try:
            chin = fit_chinchilla(n, d, loss, bootstrap=bootstrap, seed=seed)
            result["chinchilla"] = chin.to_dict()
        except ConfigError as e:
            result["chinchilla_error"] = str(e)
    if c is None and n is not None and d is not None:
        c = 6 * n * d
        result["c_key"] = "6*N*D"
    if c is not None:
        idx = frontier(c, loss)
        try:
            power = fit_power(c[idx], loss[idx], bootstrap=bootstrap, seed=seed)
            result["power"] = {**power.to_dict(), "frontier_rows": len(idx)}
        except ConfigError as e:
            result["power_error"] = str(e)
    if chin is not None and budgets:
        result["compute_optimal"] = [compute_optimal_interval(chin, b) for b in budgets]
    out.mkdir(parents=True, exist_ok=True)
    result["plots"] = [str(p) for p in plot_fits(n, d, c, loss, chin, power, out)] if n is not None else \
        [str(p) for p in plot_fits(loss, None, c, loss, None, power, out)]
    from modformer.utils import atomic_write_text

    atomic_write_text(out / "scaling.json", json.dumps(result, indent=2, default=float))
    return result
