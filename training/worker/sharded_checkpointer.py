"""Checkpoints under ``training.parallelism: fsdp``: every rank writes its shards, resume loads
the newest valid checkpoint at whatever world size this attempt has.

The differences from the DDP checkpointer (``checkpointer.py``): no rank holds the whole state,
so there is no rank-0 staging copy, no upload of it and no save on failure (the config refuses
``checkpoint.on_failure: true``); the save is DCP's, on the training thread of every rank, and
what Ray is handed afterwards is the finished directory. The validity rule is the same:
``manifest.json`` last (``sharded.save``), a directory without it or with a torn file skipped.
"""

from __future__ import annotations

import functools
import logging
import posixpath
import time
from typing import TYPE_CHECKING, Any

from torch import nn

from training import tasks
from training.core import checkpoint
from training.core.checkpoint import InvalidCheckpoint, Progress
from training.core.config import Config
from training.worker import sharded
from training.worker.checkpointer import prune_leftovers, restore_extra
from training.worker.context import initial_model, inject_faults

if TYPE_CHECKING:
    import torch

    from training.worker.context import Worker

log = logging.getLogger(__name__)


def build_model(cfg: Config, task: tasks.Task, info: Any, device: torch.device) -> nn.Module:
    """The task's model sharded over the ranks without any rank building all of it: built with
    its parameters on the meta device, sharded, then given storage for this rank's shards.
    Its values are unset: ``initialise`` or a checkpoint sets them."""
    with sharded.parameters_on_meta():
        skeleton = task.build_model(info)
    units = task.shard_units(skeleton)
    return sharded.prepare(skeleton, units, cfg.training.precision, device)


def initialise(model: nn.Module, cfg: Config, task: tasks.Task, info: Any) -> None:
    """A fresh run's initial values: rank 0 builds the model as ddp does (the run's seed), every
    rank takes its shards of it. Bit for bit the values of a build on every rank; rank 0 holds
    the whole model for the moment it takes (host memory, released after)."""
    sharded.load_full(model, lambda: initial_model(cfg, task, info))


def save_and_report(worker: Worker, global_step: int, step_metrics: dict[str, Any]) -> None:
    """Every rank writes its shards of step ``global_step`` (the training thread's pause), rank
    0 the loop state and the manifest; then every rank reports (off the training thread when
    ``checkpoint.upload: async``) and Ray registers the finished directory."""
    epoch, done_in_epoch = divmod(global_step, worker.plan.steps_per_epoch)
    progress = Progress(global_step, epoch, done_in_epoch, worker.attempt)
    started = time.perf_counter()
    dir_name = checkpoint.dir_name(global_step, worker.attempt)
    target = posixpath.join(worker.run_dir, dir_name)
    if worker.rank == 0:
        worker.runlog.flush()  # the ledger reaches storage before the checkpoint that needs it
    sharded.save(
        target,
        worker.model,
        worker.optimizer,
        loop_state(worker, progress) if worker.rank == 0 else None,
        before_manifest=lambda: inject_faults(worker, global_step, "checkpoint"),
    )
    worker.saves.saved(global_step)
    blocked_s = time.perf_counter() - started

    def registered() -> str:  # Ray's upload thread on rank 0: the files are already there
        prune_leftovers(worker)
        return target

    report = functools.partial(
        worker.runtime.report_checkpoint,
        dict(step_metrics),
        dir_name,
        registered if worker.rank == 0 else None,
        asynchronous=worker.cfg.checkpoint.upload == "async",
    )
    if worker.cfg.checkpoint.upload == "async":
        worker.reporter.submit(report)
    else:
        worker.reporter.wait()
        report()
    if worker.rank == 0:
        worker.runlog.write("checkpoint", global_step=global_step, blocked_s=blocked_s, path=target)


def loop_state(worker: Worker, progress: Progress) -> dict[str, Any]:
    """What is not sharded: the same on every rank, written once, by rank 0."""
    return {
        "format": checkpoint.FORMAT_VERSION,
        "scheduler": worker.scheduler.state_dict(),
        "progress": vars(progress).copy(),
        "config": worker.config_dict,
        "extra": {"scaler": worker.scaler.state_dict(), "task": worker.task.state_dict()},
    }


def resume(worker: Worker) -> tuple[Progress, str | None]:
    """Load the newest valid checkpoint, resharded to this world size. Rank 0 lists the
    candidates whose manifest and sizes hold (newest first); the ranks split checking their
    checksums (each hashes every W-th file) and skip any with a corrupted file, all alike."""
    fs, run_dir = worker.fs, worker.run_dir
    candidates = None
    if worker.rank == 0:
        checkpoint.remember_registered(fs, run_dir)  # prune leaves these to Ray
        candidates = [info.path for info in checkpoint.scan(fs, run_dir) if info.valid]
    progress = Progress(global_step=0, epoch=0, step_in_epoch=0, attempt="")
    chosen = None
    for path in worker.comm.broadcast_object(candidates):
        problems = worker.comm.gather_objects(share_problems(path, worker.rank, worker.world_size))
        if any(problems):
            if worker.rank == 0:
                log.warning("Skipping checkpoint %s: %s", path, "; ".join(p for p in problems if p))
            continue
        state = sharded.load(path, worker.model, worker.optimizer)
        worker.scheduler.load_state_dict(state["scheduler"])
        restore_extra(worker, state)
        progress, chosen = Progress(**state["progress"]), path
        break
    if chosen is None:  # a fresh start: only now is the whole model built (on rank 0)
        initialise(worker.model, worker.cfg, worker.task, worker.info)
    worker.comm.barrier()  # everyone has loaded before rank 0 deletes anything
    if worker.rank == 0:
        checkpoint.prune(
            fs, run_dir, keep=worker.cfg.checkpoint.num_to_keep, attempt=worker.attempt
        )
    return progress, chosen


def share_problems(path: str, rank: int, world_size: int) -> str:
    """Why this rank's share of ``path`` must not be loaded ('' if it may)."""
    try:
        bad = sharded.corrupted_files(path, rank, world_size)
    except InvalidCheckpoint as exc:
        return str(exc)
    return f"checksum of {', '.join(bad)} does not match the manifest" if bad else ""
