"""What Ray Train's controller does between a failure and the next attempt, in the run log.

Rank 0 logs its own attempt (``start``, ``step``, ...); only the controller knows when it
decided what a failure means and when the new worker group was up. This callback, in
``RunConfig.callbacks``, runs in the controller and writes two events (``runlog.write_event``,
one file each, named after Ray Train's attempt id, which is the event's ``attempt``):

- ``failure_detected``: Ray Train's failure policy decided (``decision``: RETRY or RAISE);
- ``group_started``: the group's training function was launched on every worker; with
  ``world_size``, ``pids`` (by world rank), ``group`` (1 for the first group of this
  controller), and when the group was asked for (``requested_at``), its actor processes were
  up (``actors_at``), its train context initialised (``context_at``: the workers have
  imported the project), and ``placement_group_s`` as Ray's GCS timed it.

The hooks are Ray Train 2.60's developer API (``ControllerCallback``, ``WorkerGroupCallback``).
Writing never fails the run: the controller would count a raising callback as a failure.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pyarrow.fs as pafs
from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback

from training.core import runlog

log = logging.getLogger(__name__)


class GroupEvents(ControllerCallback, WorkerGroupCallback):
    def __init__(self, fs: pafs.FileSystem, run_dir: str):
        self.fs, self.run_dir = fs, run_dir
        self.groups = 0
        self.ray_attempt = ""
        self.times: dict[str, float] = {}

    def before_worker_group_start(self, worker_group_context: Any) -> None:
        self.groups += 1
        self.ray_attempt = str(worker_group_context.run_attempt_id)
        self.times = {"requested_at": round(time.time(), 4)}

    def before_init_train_context(self, workers: list[Any]) -> dict[str, list[Any]]:
        self.times["actors_at"] = round(time.time(), 4)
        return {}

    def after_worker_group_start(self, worker_group: Any) -> None:
        self.times["context_at"] = round(time.time(), 4)

    def after_worker_group_training_start(self, worker_group: Any) -> None:
        launched = round(time.time(), 4)  # before asking Ray's GCS about the placement group
        workers = sorted(worker_group.get_workers(), key=lambda w: w.distributed_context.world_rank)
        self.write(
            "group_started",
            time=launched,
            world_size=len(workers),
            pids=[w.metadata.pid for w in workers],
            placement_group_s=placement_group_seconds(worker_group),
            **self.times,
        )

    def before_controller_execute_failure_decision(self, failure_decision: Any) -> None:
        self.write("failure_detected", decision=str(getattr(failure_decision, "value", "")))

    def write(self, event: str, **fields: Any) -> None:
        try:
            name = f"ray-{self.ray_attempt}-{event}"
            runlog.write_event(
                self.fs, self.run_dir, name, event, attempt=self.ray_attempt, group=self.groups,
                **fields,
            )  # fmt: skip
        except Exception as exc:  # an observation; the run goes on without it
            log.warning("could not write %s to the run log: %s", event, exc)


def placement_group_seconds(worker_group: Any) -> float | None:
    """The group's placement group, creation to ready, as Ray's GCS timed it (None if unknown)."""
    try:
        from ray.util import placement_group_table

        handle = worker_group.get_worker_group_state().placement_group_handle
        stats = placement_group_table(handle.placement_group)["stats"]
        return stats["end_to_end_creation_latency_ms"] / 1000
    except Exception:
        return None
