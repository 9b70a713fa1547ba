"""Benchmarks behind ``modformer bench NAME``; each writes benchmarks/results/NAME.json."""

BENCHMARKS = ("throughput", "attention", "generation", "memory", "time-to-loss", "fidelity")
