"""Benchmarks: ours vs a reference measured in the same run (results in docs/benchmarks.md)."""
