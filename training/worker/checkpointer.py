"""The worker's side of checkpoints: stage on the training thread, report and upload off it,
and the save on failure (the protocol between those threads is ``core.save_protocol``)."""

from __future__ import annotations

import functools
import logging
import math
import os
import posixpath
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from training.core import checkpoint
from training.core.checkpoint import Progress
from training.core.save_protocol import FailureSave
from training.ray_internals import priority, shutdown_grace
from training.worker.cadence import record_step
from training.worker.context import inject_faults, unwrap

if TYPE_CHECKING:
    from training.worker.context import Worker

log = logging.getLogger(__name__)


def save_and_report(worker: Worker, global_step: int, step_metrics: dict[str, Any]) -> None:
    """Checkpoint in two phases and report; every rank reports.

    On the training thread rank 0 only copies the state into reusable CPU buffers (the pause).
    The report, a barrier of all ranks, runs on each rank's report thread (``reporting``);
    serialising, checksumming and uploading the copy run in Ray's upload thread (async mode),
    one save at a time, the manifest last. With ``checkpoint.upload: sync`` the report and the
    upload stay on the training thread.
    """
    epoch, done_in_epoch = divmod(global_step, worker.plan.steps_per_epoch)
    progress = Progress(global_step, epoch, done_in_epoch, worker.attempt)
    started = time.perf_counter()  # the pause: wait for the previous save, stage
    staged = None
    if worker.rank == 0:
        worker.runlog.flush()  # the ledger reaches storage before the checkpoint that needs it
        wait_for_previous_save(worker)
        staged = worker.stager.stage(full_state(worker, progress))
        worker.saves.staged()
    else:
        inject_faults(worker, global_step, "checkpoint")
    report = functools.partial(report_checkpoint, worker, global_step, dict(step_metrics), staged)
    if worker.cfg.checkpoint.upload == "async":
        worker.reporter.submit(report)
    else:
        worker.reporter.wait()  # the reports before this one, in order
        report()
    if worker.rank == 0:
        worker.runlog.write(
            "checkpoint",
            global_step=global_step,
            blocked_s=time.perf_counter() - started,
            path=posixpath.join(worker.run_dir, checkpoint.dir_name(global_step, worker.attempt)),
        )


SLOW_SAVE_WARNING_S = 0.05  # far above a free pipeline's wait (0), below a poll interval


def wait_for_previous_save(worker: Worker) -> None:
    """The staging buffers are reused: the previous save must have finished with them.

    Ray Train registers one report per controller poll (one upload thread, a result queue of
    one), so checkpoints that come faster than ``failure.health_check_interval_s`` queue up
    behind it; and the save runs at the lowest CPU priority, so on cores that training keeps
    busy it finishes only when training waits here. Either way: say so once, with the ways
    out."""
    waited = time.perf_counter()
    # With a save on failure (a step boundary kept), a shutdown of the group while waiting here
    # raises ShutdownBegun: the save on failure then writes this completed step, newer than the
    # staged copy whose report a dead peer may be blocking.
    saves = worker.saves
    wait = saves.wait_to_stage if worker.boundary is not None else saves.wait_until_free
    while not wait(timeout=60):
        log.warning(
            "still waiting for the previous checkpoint's upload (%.0f s)",
            time.perf_counter() - waited,
        )
    waited = time.perf_counter() - waited
    if waited > SLOW_SAVE_WARNING_S and not worker.warned_slow_save:
        worker.warned_slow_save = True
        log.warning(
            "Training waited %.2f s for the previous checkpoint: its save (in the background, "
            "at low CPU priority) must finish first, and Ray Train registers at most one "
            "checkpoint per health-check interval (%s s). Checkpoint less often "
            "(checkpoint.every_n_steps) or lower failure.health_check_interval_s.",
            waited,
            os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "?"),
        )


def report_checkpoint(
    worker: Worker, global_step: int, reported: dict[str, Any], staged: dict[str, Any] | None
) -> None:
    """Every rank calls this for every checkpoint; rank 0 passes the staged copy."""
    rescue = None
    if staged is not None:  # a peer that dies inside the report's barrier blocks this call
        rescue = functools.partial(rescue_staged, worker, global_step, staged)
        worker.saves.offer_rescue(rescue)
    try:
        worker.runtime.report_checkpoint(
            reported,
            checkpoint.dir_name(global_step, worker.attempt),
            make_uploader(worker, global_step, staged) if staged is not None else None,
            asynchronous=worker.cfg.checkpoint.upload == "async",
        )
    finally:
        if rescue is not None:
            worker.saves.withdraw_rescue(rescue)


def make_uploader(worker: Worker, global_step: int, staged: dict[str, Any]) -> Callable[[], str]:
    """Serialise the staged state straight to storage, checksumming as it streams, manifest
    last, so a crash at any point leaves either no directory or one that validation rejects,
    never one that looks complete; then prune dead attempts' leftovers. Returns the
    checkpoint's directory. Under Ray it runs in Ray's upload thread, once the report's
    barrier held."""

    def upload() -> str:
        # Serialising, checksumming and writing a large state compete with the step for cores:
        # at nice 19 (this thread only) they take the time training leaves idle.
        priority.lower_this_thread()
        if not worker.saves.upload_begins():  # the save on failure writes this state itself
            raise RuntimeError(f"checkpoint {global_step}: the attempt failed first")
        saved = None
        try:
            inject_faults(worker, global_step, "serialize")
            dir_name = checkpoint.dir_name(global_step, worker.attempt)
            target = write_to_storage(worker, global_step, staged, dir_name)
            saved = global_step
            prune_leftovers(worker)
            return target
        finally:
            worker.saves.upload_ended(saved)

    return upload


def prune_leftovers(worker: Worker) -> None:
    """Off the training thread (on S3 the listing and reads are requests, not microseconds).
    A failure costs nothing saved: the next checkpoint's prune sees the same leftovers."""
    try:
        checkpoint.prune(
            worker.fs, worker.run_dir, worker.cfg.checkpoint.num_to_keep, worker.attempt
        )
    except Exception as exc:
        log.warning("Could not prune old checkpoints of %s: %s", worker.run_dir, exc)


def write_to_storage(worker: Worker, global_step: int, state: dict[str, Any], dir_name: str) -> str:
    """Serialise ``state`` straight into the run directory, manifest last."""
    target = posixpath.join(worker.run_dir, dir_name)
    checkpoint.write_state(
        target,
        state,
        worker.fs,
        before_manifest=lambda: inject_faults(worker, global_step, "checkpoint"),
    )
    return target


def rescue_staged(worker: Worker, global_step: int, staged: dict[str, Any]) -> None:
    """Ray shuts the group down while rank 0 is still blocked in the report of checkpoint
    ``global_step``: a peer died inside the report's barrier, so Ray never begins the upload and
    rank 0 never sees a failure. The staged copy is that step's whole state: write it from Ray's
    shutdown callback (``shutdown_grace``), as the save on failure would."""
    if not worker.saves.claim_rescue():  # uploaded, or the attempt saves on failure itself
        return
    try:
        save_for_retry(worker, global_step, staged, time.perf_counter(), "staged, on shutdown")
    except Exception as exc:
        log.warning("Could not save the staged state of step %d: %s", global_step, exc)


def save_for_retry(
    worker: Worker, step: int, state: dict[str, Any], started: float, how: str
) -> None:
    """Write ``state`` as checkpoint ``step`` of this attempt (manifest last), outside Ray's
    registry, and log it as a save on failure: the retry resumes from it."""
    path = write_to_storage(worker, step, state, checkpoint.dir_name(step, worker.attempt))
    worker.saves.saved(step)
    took = time.perf_counter() - started
    worker.runlog.write("checkpoint", global_step=step, blocked_s=took, path=path, failure=True)
    worker.runlog.flush()
    log.warning("Saved the state of step %d (%s, %.2f s): %s", step, how, took, path)


def save_on_failure(worker: Worker) -> None:
    """Rank 0 saves the state it holds when the attempt fails around it (a peer died, a
    collective timed out), so the next attempt redoes no completed step.

    Under DDP every rank holds the whole state, and after an optimizer step all ranks hold the
    same one: the step that failed never reached the optimizer (DDP's all-reduce is inside
    backward), so what rank 0 holds is exactly an uninterrupted run's state at ``state_step``.
    Only rank 0 saves, because only it writes the ledger the checkpoint needs. Nothing here
    talks to other ranks. Ray's shutdown of the group waits for it (``shutdown_grace``) up to
    4.5 s; if Ray kills the process before it ends, the manifest is missing and the checkpoint
    is rejected on resume, which then falls back to the newest periodic one.
    """
    saves = worker.saves
    step = saves.state_step
    if worker.rank != 0 or step <= saves.saved_step or not state_is_finite(worker):
        return
    started = time.perf_counter()
    # From here Ray's shutdown waits for what follows, and no upload may begin.
    if saves.failure_save_begins() is FailureSave.WAIT_FOR_UPLOAD:
        # A periodic checkpoint is still uploading in the background, often of this very step
        # (a peer died just after it): let it finish rather than let Ray's kill cut it short.
        finished = saves.wait_until_free(timeout=shutdown_grace.HOLD_AT_MOST_S)
        if not finished:  # Ray's kill comes now; a second writer would only race the first
            return
        if step <= saves.saved_step:
            log.warning("Finished the upload of checkpoint %d on failure", step)
            return
    try:
        if saves.recorded_step < step:  # the failure came between the step and its ledger entry
            record_step(worker, step, 0.0, {})
        worker.runlog.flush()
        save_for_retry(worker, step, state_of_last_step(worker, step), started, "on failure")
    except Exception as exc:  # the original failure is what the user must see
        log.warning("Could not save the state of step %d on failure: %s", step, exc)


def state_of_last_step(worker: Worker, step: int) -> dict[str, Any]:
    """The whole state as step ``step`` ended: parameters, optimizer, schedule and scaler as
    they are (a failed step never reaches them), buffers and task state from the boundary
    (the forward pass of the step in flight may have moved them)."""
    if worker.boundary is None:
        raise RuntimeError("no step boundary was captured (checkpoint.on_failure is off)")
    model_state, task_state = worker.boundary.state_at(step)
    epoch, done_in_epoch = divmod(step, worker.plan.steps_per_epoch)
    state = full_state(worker, Progress(step, epoch, done_in_epoch, worker.attempt), task_state)
    return {**state, "model": model_state}


def full_state(
    worker: Worker, progress: Progress, task_state: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The whole training state at ``progress`` (live references: stage or write it before
    training goes on). The checkpoint's ``extra`` keys are written here and read in
    ``restore_extra``."""
    return checkpoint.build_state(
        unwrap(worker.model),
        worker.optimizer,
        worker.scheduler,
        progress,
        worker.config_dict,
        extra={
            "scaler": worker.scaler.state_dict(),
            "task": worker.task.state_dict() if task_state is None else task_state,
        },
    )


def restore_extra(worker: Worker, state: dict[str, Any]) -> None:
    extra = state.get("extra", {})
    if "scaler" in extra:
        worker.scaler.load_state_dict(extra["scaler"])
    worker.task.load_state_dict(extra.get("task", {}))


def state_is_finite(worker: Worker) -> bool:
    """No NaN/inf in this rank's losses since the last check, nor in the parameters (which the
    all-reduce would have spread from any rank); no other rank is asked."""
    bad = worker.interval.first_bad_step
    if bad is not None and math.isfinite(bad.item()):
        return False
    with torch.no_grad():
        return all(bool(torch.isfinite(p).all()) for p in worker.model.parameters())
