"""The one launcher of the training CLI (`python -m training ...` in a subprocess, as a user runs
it) and the one way to wait: poll a real condition until a deadline, never a bare sleep."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def cli_env(address: str | None, env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a CLI process: joined to the Ray at ``address`` (RAY_ADDRESS), or
    with ``address=None`` starting its own embedded Ray; ``env`` is added on top."""
    merged = {**os.environ, "PYTHONPATH": str(REPO)}
    merged.pop("RAY_ADDRESS", None)
    if address is not None:
        merged["RAY_ADDRESS"] = address
    return {**merged, **(env or {})}


def command(args: tuple) -> list[str]:
    return [sys.executable, "-m", "training", *map(str, args)]


def start(*args, log: Path, address: str | None, env=None, cwd=REPO, **popen):
    """`python -m training *args` in the background, stdout and stderr to ``log``."""
    with log.open("a") as out:
        return subprocess.Popen(
            command(args), cwd=cwd, env=cli_env(address, env), stdout=out,
            stderr=subprocess.STDOUT, text=True, **popen,
        )  # fmt: skip


def run(*args, address: str | None, env=None, timeout: float = 600, cwd=REPO):
    """`python -m training *args` to the end; the CompletedProcess with its output captured."""
    return subprocess.run(
        command(args), cwd=cwd, env=cli_env(address, env), capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def train_cli(config: Path, *args: str, address: str | None, timeout: float = 300, **kw):
    """`python -m training train --config CONFIG *args` to the end."""
    return run("train", "--config", config, *args, address=address, timeout=timeout, **kw)


def start_cli(config: Path, log: Path, *args: str, address: str | None, **kw):
    """`python -m training train --config CONFIG *args` in the background, output to ``log``."""
    return start("train", "--config", config, *args, log=log, address=address, **kw)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 300) -> int:
    """Wait for ``proc`` (killed if it outlives ``timeout``); its exit code."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)
        pytest.fail(f"training still running after {timeout:.0f}s: {log.read_text()[-5000:]}")


def wait_for(predicate, timeout: float, what: str, proc=None, every: float = 0.1):
    """Poll ``predicate`` every ``every`` seconds until it returns a truthy value (that value);
    fail with ``what`` after ``timeout``, or as soon as ``proc`` (a Popen) exits."""
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"training exited ({proc.returncode}) while waiting for {what}")
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what} (last: {value!r:.300})")
