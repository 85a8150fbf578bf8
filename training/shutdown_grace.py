"""Let rank 0 finish its save on failure before Ray kills the worker group.

When a worker dies, Ray Train's controller asks every worker to shut down (``Worker.shutdown``,
which runs the workers' ``before_worker_shutdown`` callbacks) and kills them all once they
return or after 5 s. Rank 0 notices the dead peer through its collective and starts saving the
state it holds (``loop.save_on_failure``); without this callback the kill lands mid-upload on a
slow store (S3) and the retry falls back to the newest periodic checkpoint, redoing its steps.

The callback holds the shutdown while that save runs, never past Ray's patience. Ray starts one
attempt at a time in a worker process, so the attempt's state is kept per process.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from ray.train.v2._internal.execution.callback import WorkerCallback

# Ray's patience for shutdown hooks is 5 s (worker_group/state.py: _shutdown_workers).
HOLD_AT_MOST_S = 4.5
# How long a still-running attempt gets to notice the failure and start its save: the dead
# peer breaks rank 0's collective at once, Ray's controller sees it within a health check.
NOTICE_WITHIN_S = 1.0

log = logging.getLogger(__name__)

IDLE, TRAINING, SAVING = "idle", "training", "saving"
_state = IDLE
_changed = threading.Condition()
# What to save when Ray shuts the group down while the report of a staged checkpoint is still
# blocked in a barrier that a dead peer broke: set by the loop.
_rescue: Callable[[], None] | None = None


def set_state(state: str) -> None:
    global _state
    with _changed:
        _state = state
        _changed.notify_all()


def set_rescue(rescue: Callable[[], None] | None) -> None:
    global _rescue
    with _changed:
        _rescue = rescue


def clear_rescue(rescue: Callable[[], None]) -> None:
    """Unset ``rescue`` unless a newer one replaced it (reports end on another thread)."""
    global _rescue
    with _changed:
        if _rescue is rescue:
            _rescue = None


def wait_for_failure_save(notice_within_s: float, hold_at_most_s: float) -> str:
    """Block while a save on failure may still come or is running; returns the state seen last.
    A training thread still blocked after ``notice_within_s`` with a rescue set: run it here."""
    started = time.monotonic()
    with _changed:
        _changed.wait_for(lambda: _state != TRAINING, timeout=notice_within_s)
        rescue = _rescue if _state == TRAINING else None
        if _state == SAVING:
            remaining = hold_at_most_s - (time.monotonic() - started)
            _changed.wait_for(lambda: _state != SAVING, timeout=max(0.0, remaining))
        if rescue is None:
            return _state
    rescue()  # Ray kills the process at its 5 s patience, whatever this thread is doing
    return "rescued"


class WaitForFailureSave(WorkerCallback):
    """Passed in ``RunConfig.callbacks``; Ray copies it to every worker."""

    def before_worker_shutdown(self) -> None:
        started = time.monotonic()
        held_while = _state
        ended_as = wait_for_failure_save(NOTICE_WITHIN_S, HOLD_AT_MOST_S)
        if held_while != IDLE:
            log.warning(
                "Held Ray's shutdown of this worker %.2f s (%s -> %s)",
                time.monotonic() - started,
                held_while,
                ended_as,
            )
