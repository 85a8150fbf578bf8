"""Who writes the training state, and when: the save protocol of one worker process.

Four threads of a worker touch a checkpoint (``docs/architecture.md`` draws them):

- the **training thread** stages a checkpoint into reused CPU buffers, and when the attempt fails
  around it, saves the state of the last completed step itself (the *save on failure*);
- the **report thread** hands each checkpoint to Ray (``ray.train.report``, a barrier of all
  ranks); while it is blocked there, a *rescue* of the staged copy is on offer;
- **Ray's upload thread** writes the staged copy once the barrier held (the *upload*);
- **Ray's shutdown callback** (``shutdown_grace``) holds Ray's kill of the worker group while a
  save on failure runs, and runs the rescue when the training thread cannot.

This object is all they share: one condition variable, the phase of the checkpoint in flight and
of the attempt, and the steps that say what is on storage. Transitions::

    checkpoint:  FREE --staged--> STAGED --upload_begins--> UPLOADING --upload_ended--> FREE
                                    |  upload_begins after the attempt failed: refused, FREE
                                    '--claim_rescue--> (the shutdown callback writes it)
    attempt:     IDLE --begin_attempt--> TRAINING --failure_save_begins--> SAVING --end--> IDLE

Once the attempt has failed (a save on failure began, or a rescue was claimed) nothing else may
write: a late upload is refused, a second rescue too, so two writers never race for one step.

When Ray's shutdown begins while the training thread waits at a step boundary for the staging
buffers (checkpoints came faster than Ray registers them, and a peer died), the thread is woken
with ``ShutdownBegun``: the model holds a newer completed step than the staged copy, and the save
on failure writes that step instead of the rescue writing the older one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from enum import Enum


class Checkpoint(Enum):
    FREE = "free"  # no checkpoint in flight: the staging buffers may be reused
    STAGED = "staged"  # staged; Ray has not begun its upload (the report may be in its barrier)
    UPLOADING = "uploading"  # Ray's upload thread is writing it


class Attempt(Enum):
    IDLE = "idle"  # no attempt runs in this process: Ray may kill it at once
    TRAINING = "training"
    SAVING = "saving"  # a save on failure is running: Ray's shutdown waits for it


class FailureSave(Enum):
    """What the save on failure must do, decided under the lock."""

    SAVE = "save"  # nothing else writes this state: write it
    WAIT_FOR_UPLOAD = "wait"  # an upload is running (often of this very step): let it end first


class ShutdownBegun(RuntimeError):
    """Ray began shutting the worker group down while the training thread waited to stage."""


class SaveProtocol:
    def __init__(self) -> None:
        self._changed = threading.Condition()
        self.checkpoint = Checkpoint.FREE
        self.attempt = Attempt.IDLE
        self.failed = False
        self.shutdown_begun = False
        self.rescue: Callable[[], None] | None = None
        # The step the model holds, the last step in rank 0's ledger, the newest step complete
        # on storage (or resumed from).
        self.state_step = self.recorded_step = self.saved_step = 0

    # ---- the training thread ------------------------------------------------------------
    def begin_attempt(self) -> None:
        with self._changed:
            self.checkpoint, self.attempt, self.failed, self.rescue = (
                Checkpoint.FREE,
                Attempt.TRAINING,
                False,
                None,
            )
            self.shutdown_begun = False
            self._changed.notify_all()

    def resumed_from(self, step: int) -> None:
        """The state the attempt starts from, complete on storage (0: a fresh start)."""
        with self._changed:
            self.state_step = self.recorded_step = self.saved_step = step

    def end_attempt(self) -> None:
        """Ray may now kill this process."""
        with self._changed:
            self.attempt = Attempt.IDLE
            self._changed.notify_all()

    def wait_until_free(self, timeout: float | None) -> bool:
        """Block until no checkpoint is in flight (the staging buffers are free again)."""
        with self._changed:
            return self._changed.wait_for(lambda: self.checkpoint is Checkpoint.FREE, timeout)

    def wait_to_stage(self, timeout: float | None) -> bool:
        """Like ``wait_until_free``, for a training thread that is at a step boundary and can save
        the step it holds on failure: raises ``ShutdownBegun`` once Ray's shutdown begins."""
        with self._changed:
            free = self._changed.wait_for(
                lambda: self.checkpoint is Checkpoint.FREE or self.shutdown_begun, timeout
            )
            if self.shutdown_begun:
                raise ShutdownBegun(
                    f"Ray shut the worker group down while step {self.state_step}'s checkpoint "
                    f"waited for the previous one ({self.checkpoint.value})"
                )
            return bool(free)

    def staged(self) -> None:
        with self._changed:
            if self.checkpoint is not Checkpoint.FREE:
                raise RuntimeError(f"a checkpoint is still {self.checkpoint.value}")
            self.checkpoint = Checkpoint.STAGED

    def failure_save_begins(self) -> FailureSave:
        """The attempt failed around the training thread: from now on only it writes (or the
        upload already running finishes). Ray's shutdown waits while the attempt is SAVING."""
        with self._changed:
            self.failed = True
            self.attempt = Attempt.SAVING
            self._changed.notify_all()
            if self.checkpoint is Checkpoint.UPLOADING:
                return FailureSave.WAIT_FOR_UPLOAD
            return FailureSave.SAVE

    def saved(self, step: int) -> None:
        with self._changed:
            self.saved_step = max(self.saved_step, step)

    # ---- the report thread --------------------------------------------------------------
    def offer_rescue(self, rescue: Callable[[], None] | None) -> None:
        with self._changed:
            self.rescue = rescue

    def withdraw_rescue(self, rescue: Callable[[], None]) -> None:
        """Unset ``rescue`` unless a newer one replaced it (reports end on another thread)."""
        with self._changed:
            if self.rescue is rescue:
                self.rescue = None

    # ---- Ray's upload thread ------------------------------------------------------------
    def upload_begins(self) -> bool:
        """False (and the buffers freed) when the attempt failed first: the save on failure or
        the rescue writes this state instead."""
        with self._changed:
            if self.failed:
                self.checkpoint = Checkpoint.FREE
                self._changed.notify_all()
                return False
            self.checkpoint = Checkpoint.UPLOADING
            return True

    def upload_ended(self, step: int | None) -> None:
        """``step``: the step now complete on storage, None if the upload failed."""
        with self._changed:
            if step is not None:
                self.saved_step = max(self.saved_step, step)
            self.checkpoint = Checkpoint.FREE
            self._changed.notify_all()

    # ---- Ray's shutdown callback --------------------------------------------------------
    def claim_rescue(self) -> bool:
        """Whether the staged copy is still unwritten and nobody else will write it: the
        rescuer then owns it (the attempt counts as failed)."""
        with self._changed:
            if self.failed or self.checkpoint is not Checkpoint.STAGED:
                return False
            self.failed = True
            return True

    def hold_shutdown(self, notice_within_s: float, hold_at_most_s: float) -> str:
        """Block Ray's shutdown while a save on failure may still come or is running; returns the
        attempt's phase seen last, or "rescued". A training thread still TRAINING after
        ``notice_within_s`` with a rescue on offer is blocked in a barrier a dead peer broke:
        the rescue runs here, in the callback's thread."""
        started = time.monotonic()
        with self._changed:
            self.shutdown_begun = True  # wakes a training thread parked in wait_to_stage
            self._changed.notify_all()
            self._changed.wait_for(lambda: self.attempt is not Attempt.TRAINING, notice_within_s)
            rescue = self.rescue if self.attempt is Attempt.TRAINING else None
            if self.attempt is Attempt.SAVING:
                remaining = hold_at_most_s - (time.monotonic() - started)
                self._changed.wait_for(lambda: self.attempt is not Attempt.SAVING, remaining)
            if rescue is None:
                return self.attempt.value
        rescue()  # Ray kills the process at its patience, whatever this thread is doing
        return "rescued"


# One attempt runs at a time in a Ray Train worker process, and Ray creates the shutdown
# callback itself, so the callback finds the attempt's protocol here.
THIS_PROCESS = SaveProtocol()
