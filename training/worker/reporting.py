"""Ray Train reports off the training thread: one background thread per worker, in order.

Every ``ray.train.report`` is a cluster-wide barrier: each rank waits in a call to Ray's
synchronisation actor until all ranks have arrived (~15-25 ms on 2 busy cores, more when a
rank is late). On the training thread that barrier was most of a checkpoint's pause. Here the
training thread hands the call over and goes on to the next step; the ranks' background
threads meet in the barrier instead. With the async upload mode Ray's own upload thread then
serialises and uploads (``checkpointer.make_uploader``), so nothing of a checkpoint but the staging
copy stays on the training thread.

All of a worker's reports go through its one thread, in the order they were made, so every
rank enters Ray's collectives in the same order (Ray numbers them). An error in a report is
raised on the training thread at its next hand-over or wait. The thread is a daemon: a report
stuck in a barrier that a dead peer broke must not keep the process alive.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any


class Reporter:
    """Runs hand-overs one at a time, in order, on a daemon thread."""

    def __init__(self) -> None:
        self._work: queue.SimpleQueue[tuple[Future, Callable[[], Any]] | None] = queue.SimpleQueue()
        self._pending: list[Future] = []
        self._thread = threading.Thread(target=self._run, name="ray-train-report", daemon=True)
        self._thread.start()

    def submit(self, call: Callable[[], Any]) -> Future:
        """Queue ``call``; first raise the error of any earlier one that failed."""
        self.raise_failures()
        future: Future = Future()
        self._pending.append(future)
        self._work.put((future, call))
        return future

    def raise_failures(self) -> None:
        """Raise the first error among the calls that have ended; forget those that ended."""
        ended = [f for f in self._pending if f.done()]
        self._pending = [f for f in self._pending if not f.done()]
        for future in ended:
            future.result()  # raises the call's error

    def wait(self) -> None:
        """Block until every queued call has ended; raise the first error."""
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def stop(self) -> None:
        """No more calls; the thread ends after those queued (or with the process)."""
        self._work.put(None)

    def _run(self) -> None:
        while (item := self._work.get()) is not None:
            future, call = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(call())
            except BaseException as exc:  # handed to the training thread, not lost here
                future.set_exception(exc)
