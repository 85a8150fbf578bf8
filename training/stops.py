"""A run stopped for good: the loss or the gradients became NaN or infinite.

Resuming would replay the same steps from the same checkpoint into the same non-finite values, so
the step that went wrong is recorded on storage (``<run dir>/stopped.json``): every later attempt
and every resubmission refuses to train until the user changes something (a new run name, a lower
learning rate, grad clipping) or deletes the marker. Checkpoints are never written after the step
that went wrong: the newest valid checkpoint stays the one before it.
"""

from __future__ import annotations

import json
import posixpath

import pyarrow.fs as pafs

from training import storage

MARKER_FILE = "stopped.json"


class NonFiniteLoss(RuntimeError):
    """The loss or the gradient norm was NaN or infinite at ``step``."""

    def __init__(self, step: int):
        self.step = step
        super().__init__(
            f"the loss or the gradients became NaN/infinite at step {step}: training diverged "
            "(learning rate too high, no grad clipping, fp16 overflow) or the data hold "
            "non-finite values; no checkpoint was written at or after that step"
        )


def record(fs: pafs.FileSystem, run_dir: str, error: NonFiniteLoss) -> None:
    marker = {"reason": "non-finite", "step": error.step, "message": str(error)}
    storage.write_bytes(fs, posixpath.join(run_dir, MARKER_FILE), json.dumps(marker).encode())


def read(fs: pafs.FileSystem, run_dir: str) -> str | None:
    """The one-line reason a run was stopped for good, with what to do; None if it was not."""
    path = posixpath.join(run_dir, MARKER_FILE)
    if not storage.exists(fs, path):
        return None
    marker = json.loads(storage.read_bytes(fs, path))
    return (
        f"was stopped: {marker['message']}. Resuming would repeat it: "
        f"start a new run.name (e.g. with a lower learning rate), or delete "
        f"{storage.display(fs, path)} to retry"
    )
