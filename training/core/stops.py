"""A run stopped for good: the loss or the gradients became NaN or infinite, or the task broke
its contract at the first step.

Resuming would replay the same steps from the same checkpoint into the same non-finite values, so
the step that went wrong is recorded on storage (``<run dir>/stopped.json``): every later attempt
and every resubmission refuses to train until the user changes something (a new run name, a lower
learning rate, grad clipping) or deletes the marker. Checkpoints are never written after the step
that went wrong: the newest valid checkpoint stays the one before it.

A broken task (``BrokenTask``) stops the retries of one submission only: the driver clears that
marker when the run is submitted again (``clear_for_resubmission``), and the fixed task is
checked again before its first step.
"""

from __future__ import annotations

import json
import posixpath

import pyarrow.fs as pafs

from training.core import storage

MARKER_FILE = "stopped.json"


class NonFiniteLoss(RuntimeError):
    """The loss or the gradient norm was NaN or infinite at ``step``."""

    reason = "non-finite"

    def __init__(self, step: int):
        self.step = step
        super().__init__(
            f"the loss or the gradients became NaN/infinite at step {step}: training diverged "
            "(learning rate too high, no grad clipping, fp16 overflow) or the data hold "
            "non-finite values; no checkpoint was written at or after that step"
        )


class BrokenTask(RuntimeError):
    """The task failed the contract checks ``check-task`` runs (``task_contract``)."""

    reason, step = "task-contract", 0

    def __init__(self, failures: list[str]):
        super().__init__(
            "the task breaks the contract the framework relies on (python -m training "
            "check-task shows the same): " + "; ".join(failures)
        )


def record(fs: pafs.FileSystem, run_dir: str, error: NonFiniteLoss | BrokenTask) -> None:
    marker = {"reason": error.reason, "step": error.step, "message": str(error)}
    storage.write_bytes(fs, posixpath.join(run_dir, MARKER_FILE), json.dumps(marker).encode())


def clear_for_resubmission(fs: pafs.FileSystem, run_dir: str) -> None:
    """A new submission checks the task again: a broken task's marker has done its work."""
    marker = _marker(fs, run_dir)
    if marker is not None and marker.get("reason") == BrokenTask.reason:
        fs.delete_file(posixpath.join(run_dir, MARKER_FILE))


def _marker(fs: pafs.FileSystem, run_dir: str) -> dict | None:
    path = posixpath.join(run_dir, MARKER_FILE)
    return json.loads(storage.read_bytes(fs, path)) if storage.exists(fs, path) else None


def read(fs: pafs.FileSystem, run_dir: str) -> str | None:
    """The one-line reason a run was stopped for good, with what to do; None if it was not."""
    marker = _marker(fs, run_dir)
    if marker is None:
        return None
    path = posixpath.join(run_dir, MARKER_FILE)
    if marker.get("reason") == BrokenTask.reason:
        message = marker["message"]
        return f"was stopped before its first step: {message}. Fix the task and submit again"
    return (
        f"was stopped: {marker['message']}. Resuming would repeat it: "
        f"start a new run.name (e.g. with a lower learning rate), or delete "
        f"{storage.display(fs, path)} to retry"
    )
