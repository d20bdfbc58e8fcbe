"""Benchmarks. Run them as scripts from the source tree: ``python3 benchmarks/run.py --help``."""
