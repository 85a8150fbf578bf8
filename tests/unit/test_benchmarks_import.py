"""The benchmark harness imports against the current package (CI runs it last; a stale import
of a moved module should fail here, in seconds, not after the e2e tier)."""

from __future__ import annotations

import importlib

import pytest

MODULES = [
    "harness",
    "analyze",
    "floor",
    "launch",
    "report",
    "ray_session",
    "torchrun_baseline",
    "torchrun_plain",
    "fsdp_memory",
    "wheelhouse",
]


@pytest.mark.parametrize("module", MODULES)
def test_benchmark_module_imports(module):
    assert importlib.import_module(f"benchmarks.{module}")
