"""Checkpoints under ``training.parallelism: fsdp``: every rank writes its shards, resume loads
the newest valid checkpoint at whatever world size this attempt has.

The differences from the DDP checkpointer (``checkpointer.py``): no rank holds the whole state,
so there is no rank-0 staging copy, no upload of it and no save on failure (the config refuses
``checkpoint.on_failure: true``); the save is DCP's, on the training thread of every rank, and
what Ray is handed afterwards is the finished directory. The validity rule is the same:
``manifest.json`` last (``sharded.save``), a directory without it or with a torn file skipped.
Everything is on the run's storage (``worker.fs``, ``worker.run_dir``): a local or shared path,
or S3, through ``pyarrow.fs``.
"""

from __future__ import annotations

import functools
import logging
import posixpath
import time
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import pyarrow.fs as pafs
from torch import nn

from training import tasks
from training.core import checkpoint, dcp_storage
from training.core.checkpoint import InvalidCheckpoint, Progress
from training.core.config import Config
from training.worker import sharded
from training.worker.checkpointer import prune_leftovers, restore_extra
from training.worker.collectives import Collectives
from training.worker.context import initial_model, inject_faults

if TYPE_CHECKING:
    import torch

    from training.worker.context import Worker

log = logging.getLogger(__name__)
# How long a failed attempt waits for a checkpoint being sealed in the background (await_seal).
SEAL_GRACE_S = 60.0


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
    """Every rank writes its shards of step ``global_step``, rank 0 the loop state and the
    manifest, last; then every rank reports and Ray registers the finished directory.

    ``checkpoint.upload: async``: the training thread pauses for the staging copy of its shards
    only; DCP's background thread writes them and this rank's report thread seals the
    checkpoint (hashes, manifest) and reports it. One save is in flight at a time: the next
    one, a drain and the end of the attempt wait for it (``reporter.wait``), and prune never
    touches this attempt's directories. ``sync``: all of it on the training thread."""
    asynchronous = worker.cfg.checkpoint.upload == "async"
    worker.reporter.wait()  # the previous save is sealed and reported: one in flight
    epoch, done_in_epoch = divmod(global_step, worker.plan.steps_per_epoch)
    progress = Progress(global_step, epoch, done_in_epoch, worker.attempt)
    dir_name = checkpoint.dir_name(global_step, worker.attempt)
    target = posixpath.join(worker.run_dir, dir_name)
    if worker.rank == 0:
        worker.runlog.flush()  # the ledger reaches storage before the checkpoint that needs it
    started = time.perf_counter()
    state = loop_state(worker, progress) if worker.rank == 0 else None
    if asynchronous and worker.side_comm is None:  # every rank's first save: the same step
        worker.side_comm = Collectives.side_group()
    comm = worker.side_comm if asynchronous else worker.comm
    group = comm.group if asynchronous else None
    save = sharded.start_save(worker.fs, target, worker.model, worker.optimizer, state, group)
    blocked_s = time.perf_counter() - started
    worker.pending_seal = sealed = Future()

    def seal_and_report() -> None:  # the report thread (async) or the training thread (sync)
        try:
            with dcp_storage.storage_failures():
                save.wait()  # every rank's shards and .metadata are on storage
            chaos = functools.partial(inject_faults, worker, global_step, "checkpoint")
            sharded.seal(worker.fs, target, comm, state, save.entries(), before_manifest=chaos)
        except BaseException as exc:
            sealed.set_exception(exc)
            raise
        sealed.set_result(global_step)
        worker.saves.saved(global_step)
        worker.runtime.report_checkpoint(
            dict(step_metrics),
            dir_name,
            functools.partial(registered, worker, target) if worker.rank == 0 else None,
            asynchronous=asynchronous,
        )

    if asynchronous:
        worker.reporter.submit(seal_and_report)
    else:
        seal_and_report()
        blocked_s = time.perf_counter() - started
    if worker.rank == 0:
        worker.runlog.write("checkpoint", global_step=global_step, blocked_s=blocked_s, path=target)


def await_seal(worker: Worker, timeout_s: float = SEAL_GRACE_S) -> None:
    """The attempt failed with a checkpoint still being sealed in the background: its peers'
    report threads go on sealing (a peer's training thread may be stuck in a collective, its
    report thread is not), so wait a while for it rather than lose it. A dead peer fails the
    seal at once (its connections close); the manifest is then never written."""
    if worker.pending_seal is None or worker.pending_seal.done():
        return
    try:
        step = worker.pending_seal.result(timeout=timeout_s)
        log.warning("The attempt failed; its checkpoint of step %d was sealed first", step)
    except Exception as exc:  # the seal's own error, or still unsealed after timeout_s
        log.warning("The attempt failed; its checkpoint in flight was not sealed: %r", exc)


def registered(worker: Worker, target: str) -> str:
    """Ray's upload thread on rank 0: the files are already there."""
    prune_leftovers(worker)
    return target


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
        problems = worker.comm.gather_objects(
            share_problems(fs, path, worker.rank, worker.world_size)
        )
        if any(problems):
            if worker.rank == 0:
                log.warning("Skipping checkpoint %s: %s", path, "; ".join(p for p in problems if p))
            continue
        state = sharded.load(fs, path, worker.model, worker.optimizer)
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


def share_problems(fs: pafs.FileSystem, path: str, rank: int, world_size: int) -> str:
    """Why this rank's share of ``path`` must not be loaded ('' if it may)."""
    try:
        bad = sharded.corrupted_files(fs, path, rank, world_size)
    except InvalidCheckpoint as exc:
        return str(exc)
    return f"checksum of {', '.join(bad)} does not match the manifest" if bad else ""
