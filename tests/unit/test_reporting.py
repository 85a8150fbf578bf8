"""The report thread: the training thread hands reports over and goes on, in order, and an
error in a report reaches the training thread."""

import threading

import pytest

from training.worker import reporting


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
