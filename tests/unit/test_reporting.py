"""The report thread: the training thread hands reports over and goes on, in order, and an
error in a report reaches the training thread; and what a checkpoint's report hands Ray."""

import os
import threading

import pytest

from training.worker import reporting
from training.worker.runtime import RayRuntime


def test_reports_run_in_the_order_handed_over_while_the_caller_goes_on():
    reporter = reporting.Reporter()
    barrier_open = threading.Event()
    ran = []

    def blocked_report():  # a barrier that a late rank has not reached yet
        barrier_open.wait(timeout=10)
        ran.append("checkpoint 10")

    first = reporter.submit(blocked_report)
    second = reporter.submit(lambda: ran.append("metrics 20"))
    assert ran == [] and not first.done()  # the caller was not held by the barrier
    barrier_open.set()
    reporter.wait()
    assert ran == ["checkpoint 10", "metrics 20"]
    assert first.done() and second.done()
    reporter.stop()


def test_a_failed_report_is_raised_on_the_training_thread():
    reporter = reporting.Reporter()

    def failing_report():
        raise ValueError("metrics hold a tensor")

    reporter.submit(failing_report)
    with pytest.raises(ValueError, match="metrics hold a tensor"):
        reporter.wait()
    reporter.submit(failing_report)
    after_it = threading.Event()
    reporter.submit(after_it.set)
    assert after_it.wait(timeout=10)  # the failed report has ended
    with pytest.raises(ValueError, match="metrics hold a tensor"):
        reporter.submit(lambda: None)  # the next hand-over raises it
    reporter.stop()


def test_every_checkpoint_report_names_one_empty_directory_that_nobody_deletes(monkeypatch):
    """Ray Train reports a checkpoint from a local directory; the upload writes the files. A
    directory per report, for Ray to delete after the upload, was left behind in /tmp whenever
    the upload did not end (refused after a failure, failed, or its worker killed)."""
    import ray.train

    reports = []
    monkeypatch.setattr(ray.train, "report", lambda metrics, **kw: reports.append(kw))
    runtime = object.__new__(RayRuntime)  # only report_checkpoint: no Ray Train context
    for step in (10, 20):
        runtime.report_checkpoint({}, f"checkpoint_{step}", lambda: "", asynchronous=True)
    runtime.report_checkpoint({}, "checkpoint_30", None, asynchronous=True)  # rank > 0
    paths = [r["checkpoint"].path if r["checkpoint"] else None for r in reports]
    assert paths[0] == paths[1] and paths[2] is None, paths
    assert os.path.isdir(paths[0]) and os.listdir(paths[0]) == []
    assert not any(r["delete_local_checkpoint_after_upload"] for r in reports)
