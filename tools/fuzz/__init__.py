"""Fuzzing of everything that parses peer bytes: see targets.py, and `python -m tools.fuzz --help`."""
