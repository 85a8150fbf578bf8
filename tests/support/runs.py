"""A small run's config, reading a run back from storage (run log, checkpoints), the comparisons
the fault tests make, and Ray's view of the training workers (state API)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pyarrow.fs as pafs
import yaml

from training.core import checkpoint, runlog


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


def attempt_state(storage: Path, name: str) -> tuple[int, int, int]:
    """(attempts, world size of the latest attempt, steps it ran) from the run log."""
    try:
        logged = events(storage, name)
    except FileNotFoundError:
        return 0, 0, 0
    starts = [e for e in logged if e["event"] == "start"]
    if not starts:
        return 0, 0, 0
    latest = starts[-1]
    done = [e for e in logged if e["event"] == "step" and e["attempt"] == latest["attempt"]]
    return len(starts), latest["world_size"], len(done)


def running_on(storage: Path, name: str, world_size: int, steps: int, after_attempt=0) -> bool:
    """True once an attempt later than ``after_attempt`` runs ``steps`` steps on ``world_size``."""
    attempts, size, done = attempt_state(storage, name)
    return attempts > after_attempt and size == world_size and done >= steps


def newest_valid_step(storage: Path, name: str) -> int | None:
    newest = checkpoint.newest_valid(pafs.LocalFileSystem(), run_dir(storage, name))
    return newest.step if newest else None


def fault_fired(storage: Path, name: str, index: int) -> bool:
    """The chaos fault ``chaos.faults[index]`` of a run on local storage has fired (its marker
    is written just before it fires: training/worker/chaos.py)."""
    return (storage / "runs" / name / "chaos" / f"fault-{index}.fired").exists()
