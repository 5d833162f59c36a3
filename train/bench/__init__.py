"""Benchmarks that print figures (``python -m train.bench NAME``); never part of the test suite."""
