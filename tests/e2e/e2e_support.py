"""Shared by the e2e fixtures and tests: run a command, fail the test with its output."""

from __future__ import annotations

import subprocess

import pytest


def run(
    cmd: list[str], *, timeout: float = 120, check: bool = True, **kwargs
) -> subprocess.CompletedProcess[str]:
    """Run a command, capture its output as text, and fail the test with that output on error."""
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, check=False, **kwargs
    )
    if check and proc.returncode != 0:
        pytest.fail(
            f"command failed (exit {proc.returncode}): {' '.join(cmd)}\n"
            f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"
        )
    return proc
