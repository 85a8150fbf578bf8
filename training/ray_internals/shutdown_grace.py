"""Let rank 0 finish its save on failure before Ray kills the worker group.

When a worker dies, Ray Train's controller asks every worker to shut down (``Worker.shutdown``,
which runs the workers' ``before_worker_shutdown`` callbacks) and kills them all once they
return or after 5 s. Rank 0 notices the dead peer through its collective and starts saving the
state it holds (``checkpointer.save_on_failure``); without this callback the kill lands mid-upload
on a
slow store (S3) and the retry falls back to the newest periodic checkpoint, redoing its steps.

The callback holds the shutdown while that save runs, never past Ray's patience. Ray starts one
attempt at a time in a worker process, so the attempt's state is kept per process
(``save_protocol.THIS_PROCESS``, which also says what the states and transitions are).
"""

from __future__ import annotations

import logging
import time

from ray.train.v2._internal.execution.callback import WorkerCallback

from training.core import save_protocol

# Ray's patience for shutdown hooks is 5 s (worker_group/state.py: _shutdown_workers).
HOLD_AT_MOST_S = 4.5
# How long a still-running attempt gets to notice the failure and start its save: the dead
# peer breaks rank 0's collective at once, Ray's controller sees it within a health check.
NOTICE_WITHIN_S = 1.0

log = logging.getLogger(__name__)


class WaitForFailureSave(WorkerCallback):
    """Passed in ``RunConfig.callbacks``; Ray copies it to every worker."""

    def before_worker_shutdown(self) -> None:
        saves = save_protocol.THIS_PROCESS
        started = time.monotonic()
        held_while = saves.attempt
        ended_as = saves.hold_shutdown(NOTICE_WITHIN_S, HOLD_AT_MOST_S)
        if held_while is not save_protocol.Attempt.IDLE:
            log.warning(
                "Held Ray's shutdown of this worker %.2f s (%s -> %s)",
                time.monotonic() - started,
                held_while.value,
                ended_as,
            )
