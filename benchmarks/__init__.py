"""Side-by-side measurements of elastic-trainer: ``python -m benchmarks [--quick]``."""
