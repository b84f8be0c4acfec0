"""Benchmarks: each writes bench/results/NAME.json (machine, versions, settings, raw samples)."""
