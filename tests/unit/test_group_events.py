"""Ray Train's controller writes each worker group's start and each failure decision into the
run log (``ray_internals.group_events``), where the benchmarks' recovery rows read them; the
hooks are called here in the order Ray Train 2.60 calls them, with stand-ins for its objects."""

from __future__ import annotations

from types import SimpleNamespace

import pyarrow.fs as pafs
from ray.train.v2._internal.execution.failure_handling import FailureDecision

from training.core import runlog
from training.ray_internals import group_events
from training.ray_internals.group_events import GroupEvents

FS = pafs.LocalFileSystem()


def worker(rank: int, pid: int) -> SimpleNamespace:
    return SimpleNamespace(
        distributed_context=SimpleNamespace(world_rank=rank), metadata=SimpleNamespace(pid=pid)
    )


def start_group(callback: GroupEvents, attempt: str, pids: list[int]) -> None:
    callback.before_worker_group_start(SimpleNamespace(run_attempt_id=attempt))
    workers = [worker(rank, pid) for rank, pid in reversed(list(enumerate(pids)))]
    assert callback.before_init_train_context(workers) == {}
    group = SimpleNamespace(get_workers=lambda: workers)
    callback.after_worker_group_start(group)
    callback.after_worker_group_training_start(group)


def test_a_restart_is_a_failure_decision_then_a_new_group_in_the_run_log(tmp_path, monkeypatch):
    monkeypatch.setattr(group_events, "placement_group_seconds", lambda group: 0.25)
    callback = GroupEvents(FS, str(tmp_path))
    start_group(callback, "aaaa", [101, 102])
    callback.before_controller_execute_failure_decision(FailureDecision.RETRY)
    start_group(callback, "bbbb", [201, 202])
    events = runlog.read_events(FS, str(tmp_path))
    assert [(e["event"], e["attempt"], e["group"]) for e in events] == [
        ("group_started", "aaaa", 1),
        ("failure_detected", "aaaa", 1),
        ("group_started", "bbbb", 2),
    ]
    started = events[-1]
    assert started["pids"] == [201, 202] and started["world_size"] == 2  # by world rank
    assert started["requested_at"] <= started["actors_at"] <= started["context_at"]
    assert started["context_at"] <= started["time"] and started["placement_group_s"] == 0.25
    assert events[1]["decision"] == "RETRY"


def test_a_run_log_that_cannot_be_written_does_not_fail_the_run(tmp_path):
    (tmp_path / "runlog").write_text("a file where the directory should be")
    callback = GroupEvents(FS, str(tmp_path))
    callback.before_worker_group_start(SimpleNamespace(run_attempt_id="aaaa"))
    callback.before_controller_execute_failure_decision(FailureDecision.RAISE)  # no raise
