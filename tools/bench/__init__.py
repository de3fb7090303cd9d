"""Benchmarks: run each as `python -m tools.bench.<name>` from the repository root (see README.md)."""
