"""Studies: models trained to answer one research question each (docs/studies/, BENCHMARKS.md)."""
