"""TensorBoard event files for a run, written by rank 0 through the run log.

    pip install 'elastic-trainer[tensorboard]'     # the viewer
    tensorboard --logdir <storage.path>/<run.name>/tensorboard

Every run-log event becomes scalars (see training/core/events.py): ``train/<metric>`` from ``step``
events, ``eval/<metric>`` from ``eval`` events, ``checkpoint/blocked_s`` (the training pause of
each checkpoint) and ``run/world_size`` at each (re)start.

No zig-zags after a restart: all attempts write into ONE directory (one TensorBoard run, one
curve per tag), and each attempt opens its event file with ``purge_step`` = the first step it
redoes (the checkpoint's step + 1). TensorBoard reads the files in name (= time) order and, at
that marker, drops every earlier point at or after the step: the steps the failed attempt ran
after its last checkpoint were rolled back, so they vanish and the curve is the history the
final model contains. (One directory per attempt would keep them: overlapping curves in
different colours, and the reader has to work out which one counts.)

Storage: on a local or shared filesystem the writer appends to one event file per attempt in
place. An object store (pyarrow.fs, e.g. S3) cannot append: like the run log, each flush
(checkpoints, the end) uploads what was written since the last one as a new event file, a
segment, staged in a local temporary directory. TensorBoard reads a directory's files in name
order (start time, host, ``<attempt>-<segment>``), which is the order they were written in.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import tempfile
import time
from typing import Any

import pyarrow.fs as pafs

from training.core import events, storage

TENSORBOARD_DIR = "tensorboard"
# How often a local event file is flushed between run-log flushes, so a live TensorBoard on a
# shared filesystem follows training.
FLUSH_SECS = 10


class EventWriter:
    """Scalars for one attempt; the event file is opened at the attempt's ``start`` event.

    Events are written synchronously (tensorboardX's EventsWriter, not its SummaryWriter): the
    SummaryWriter queues events for a background thread and its flush() does not wait for that
    queue, so an upload right after a flush could miss the last steps before a checkpoint.
    """

    def __init__(self, fs: pafs.FileSystem, run_dir: str, attempt: str):
        self.fs = fs
        self.target = posixpath.join(run_dir, TENSORBOARD_DIR)
        self.attempt = attempt
        self._local = storage.is_local(fs)
        self._logdir = self.target if self._local else tempfile.mkdtemp(prefix="et-tensorboard-")
        self._writer: Any = None
        self._segments = 0
        self._flushed = time.monotonic()

    def add(self, event: dict[str, Any]) -> None:
        """Turn one run-log event into scalars (events without a step are ignored)."""
        if event["event"] == "start":
            first = events.first_step(event)
            self._open(purge_step=first)
            self._scalar("run/world_size", event.get("world_size"), first, event)
        elif event["event"] == "step" and "loss" not in event:
            pass  # a ledger-only step between log lines: nothing per step on the hot path
        elif event["event"] in events.METRIC_EVENTS and "global_step" in event:
            prefix = "train" if event["event"] == "step" else "eval"
            for name, value in events.scalar_fields(event).items():
                self._scalar(f"{prefix}/{name}", value, event["global_step"], event)
        elif event["event"] == "checkpoint":
            step = event["global_step"]
            self._scalar("checkpoint/blocked_s", event.get("blocked_s"), step, event)
        if self._local and time.monotonic() - self._flushed > FLUSH_SECS:
            self.flush()

    def flush(self) -> None:
        """Local: flush the file. Object store: upload the segment; the next event starts one."""
        if self._writer is None:
            return
        self._flushed = time.monotonic()
        if self._local:
            self._writer.flush()
            return
        self._writer.close()
        self._writer = None
        for name in os.listdir(self._logdir):
            path = os.path.join(self._logdir, name)
            with open(path, "rb") as source:
                storage.write_bytes(self.fs, posixpath.join(self.target, name), source.read())
            os.remove(path)

    def close(self) -> None:
        self.flush()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if not self._local:
            shutil.rmtree(self._logdir, ignore_errors=True)

    def _open(self, purge_step: int | None) -> None:
        from tensorboardX.event_file_writer import EventsWriter  # installed with ray[train]
        from tensorboardX.proto.event_pb2 import Event, SessionLog

        if self._writer is not None:
            self.flush()
        os.makedirs(self._logdir, exist_ok=True)
        # The attempt (and segment) in the name: never two writers on one file, and the name
        # says whose. EventsWriter writes the file-version record first, which purging needs.
        suffix = f".{self.attempt}" if self._local else f".{self.attempt}-{self._segments:06d}"
        self._segments += 1
        self._writer = EventsWriter(posixpath.join(self._logdir, "events"), suffix)
        if purge_step is not None:
            restart = Event(wall_time=time.time(), step=purge_step)
            restart.session_log.status = SessionLog.START  # TensorBoard purges steps >= this
            self._writer.write_event(restart)

    def _scalar(self, tag: str, value: Any, step: int, event: dict[str, Any]) -> None:
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.proto.summary_pb2 import Summary

        if not isinstance(value, int | float) or isinstance(value, bool):
            return
        if self._writer is None:
            # A later segment continues the attempt (no purge); a step before any start has
            # nothing to purge either.
            self._open(purge_step=None)
        summary = Summary(value=[Summary.Value(tag=tag, simple_value=float(value))])
        wall_time = event.get("time") or time.time()
        self._writer.write_event(Event(wall_time=wall_time, step=step, summary=summary))
