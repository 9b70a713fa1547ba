"""Sweeps over config keys (grid / random / successive halving, resumable) and scaling-law fits."""

from modformer.sweep.scaling import compute_optimal, fit_chinchilla, fit_power
from modformer.sweep.scheduler import Job, Sweep, Trial, make_trials
from modformer.sweep.space import Space, parse_space
from modformer.sweep.spec import Halving, SweepSpec, load_sweep, parse_sweep

__all__ = ["Halving", "Job", "Space", "Sweep", "SweepSpec", "Trial", "compute_optimal", "fit_chinchilla",
           "fit_power", "load_sweep", "make_trials", "parse_space", "parse_sweep"]
