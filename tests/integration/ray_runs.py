"""Helpers for the integration tests: configs, the training CLI run against a real Ray, polling,
and reading a run back from storage."""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import yaml

from training.core import checkpoint, runlog

REPO = Path(__file__).resolve().parents[2]


def write_config(path: Path, root: Path, **sections) -> Path:
    """A small, fast run under ``root``: 1843 training rows, batch 32, 57 steps/epoch."""
    raw = {
        "run": {"name": "run"},
        "storage": {"path": str(root / "runs")},
        "scaling": {"min_workers": 2, "max_workers": 2},
        "training": {
            "epochs": 2,
            "global_batch_size": 32,
            "log_every_n_steps": 20,
            "report_every_n_steps": 1000,
            "lr_schedule": {"warmup_steps": 5},
        },
        "data": {"path": str(root / "data.parquet"), "create_demo_if_missing": True},
        "task": {"options": {"demo_rows": 2048, "mlp": {"hidden_sizes": [64, 64]}}},
        "checkpoint": {"every_n_steps": 20, "num_to_keep": 2},
        # Retries on: a resumed run is exact, so a transient fault must not fail a test.
        "failure": {"max_failures": 2},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(raw))
    return path


def train_cli(config: Path, *args: str, address: str, timeout: float = 300):
    """`python -m training train` in a subprocess joined to the test's Ray (RAY_ADDRESS)."""
    env = {**os.environ, "RAY_ADDRESS": address, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "training", "train", "--config", str(config), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_dir(storage: Path, name: str) -> str:
    return str(storage / "runs" / name)


def final_state(storage: Path, name: str) -> dict:
    fs = pafs.LocalFileSystem()
    newest = checkpoint.newest_valid(fs, run_dir(storage, name))
    assert newest is not None, f"run {name} has no valid checkpoint"
    return checkpoint.load(fs, newest.path)


def events(storage: Path, name: str) -> list[dict]:
    return runlog.read_events(pafs.LocalFileSystem(), run_dir(storage, name))


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a["progress"]["global_step"] == b["progress"]["global_step"]
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert a["model"][key].dtype == b["model"][key].dtype
        assert a["model"][key].equal(b["model"][key]), f"model weight {key} differs"
    for pa_, pb in zip(
        a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True
    ):
        for key in pa_:
            assert pa_[key].equal(pb[key]), f"optimizer state {key} differs"


def start_cli(config: Path, log: Path, *args: str, address: str) -> subprocess.Popen:
    """The training CLI in the background (output to ``log``), joined to the test's Ray."""
    env = {**os.environ, "RAY_ADDRESS": address, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "training", "train", "--config", str(config), *args],
        cwd=REPO,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None):
    """Poll ``predicate`` until it returns a truthy value; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"training exited ({proc.returncode}) while waiting for {what}")
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


def progress(storage: Path, name: str) -> tuple[int, int]:
    """(number of attempts so far, newest step of the latest attempt) from the run log."""
    try:
        logged = events(storage, name)
    except FileNotFoundError:
        return 0, 0
    starts = [e for e in logged if e["event"] == "start"]
    if not starts:
        return 0, 0
    latest = starts[-1]["attempt"]
    steps = [e["global_step"] for e in logged if e["event"] == "step" and e["attempt"] == latest]
    return len(starts), max(steps, default=0)


def alive_train_workers(address: str) -> list:
    """RayTrainWorker actors alive in the cluster, through Ray's state API."""
    from ray.util.state import list_actors

    return list_actors(
        address=address,
        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
        timeout=10,
    )


def alive_actor_pid(address: str, class_name: str) -> int:
    """The process of the one alive actor of ``class_name``, through Ray's state API."""
    from ray.util.state import list_actors

    (actor,) = list_actors(
        address=address,
        filters=[("class_name", "=", class_name), ("state", "=", "ALIVE")],
        timeout=10,
    )
    return actor.pid


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def redone_steps(logged: list[dict]) -> list[int]:
    """For each restart: steps the failed attempt completed that the next one did again."""
    last: dict[str, int] = {}
    for event in logged:
        if event["event"] == "step":
            last[event["attempt"]] = max(last.get(event["attempt"], 0), event["global_step"])
    starts = [e for e in logged if e["event"] == "start"]
    return [
        last.get(before["attempt"], 0) - (after["resumed_from_step"] or 0)
        for before, after in itertools.pairwise(starts)
    ]


@contextlib.contextmanager
def two_worker_cluster():
    """A head with no CPUs (no training worker lands there) and two 1-CPU worker nodes."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 0, "dashboard_port": free_port()}
    )
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    try:
        yield cluster, nodes
    finally:
        cluster.shutdown()
