"""The per-worker DDP loop that Ray Train runs on every worker (``train_func``).

Fresh start and resume are one code path: every attempt looks for the newest valid checkpoint
on storage and continues from the step after it. Which samples a step uses and the randomness
inside it are functions of (seed, global step, rank), never of the attempt, which is what makes
a resumed run bitwise equal to an uninterrupted one at the same world size.

Ray-specific calls are marked ``# Ray:``.
"""

from __future__ import annotations

import logging
import os
import posixpath
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import pyarrow.fs as pafs
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from training import chaos, checkpoint, data, drain, metrics
from training.checkpoint import Progress
from training.config import Config
from training.models import build_model
from training.optim import build_optimizer, build_scheduler
from training.runlog import RunLog

# Ray Train routes worker logging to the driver's console; print() would be shown twice.
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """How many global steps the run has and where a global step falls in its epoch."""

    steps_per_epoch: int
    total_steps: int

    @classmethod
    def for_run(cls, cfg: Config, train_samples: int) -> Plan:
        per_epoch = data.steps_per_epoch(train_samples, cfg.training.global_batch_size)
        total = per_epoch * cfg.training.epochs
        if cfg.training.max_steps is not None:
            total = min(total, cfg.training.max_steps)
        return cls(per_epoch, total)

    def position(self, global_step: int) -> tuple[int, int]:
        """(epoch, step index in the epoch) of 1-based ``global_step``."""
        return divmod(global_step - 1, self.steps_per_epoch)


@dataclass
class Worker:
    """What one worker needs at every step; built once per attempt."""

    cfg: Config
    config_dict: dict[str, Any]
    rank: int
    world_size: int
    device: torch.device
    fs: pafs.FileSystem
    run_dir: str
    splits: data.Splits
    plan: Plan
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    attempt: str
    runlog: RunLog | None  # rank 0 only


def train_func(config_dict: dict[str, Any]) -> None:
    """Entry point on every Ray Train worker."""
    worker, progress = start_attempt(config_dict)
    try:
        run_steps(worker, progress)
    finally:
        if worker.runlog is not None:
            worker.runlog.close()


def start_attempt(config_dict: dict[str, Any]) -> tuple[Worker, Progress]:
    began = time.time()  # for the recovery timeline: worker up -> state restored -> first step
    cfg = Config.model_validate(config_dict)
    context = ray.train.get_context()  # Ray: rank, world size and the run's storage
    rank, world_size = context.get_world_rank(), context.get_world_size()
    run_storage = context.get_storage()
    fs, run_dir = run_storage.storage_filesystem, run_storage.experiment_fs_path
    splits = data.load_splits(cfg.data, cfg.storage)
    plan = Plan.for_run(cfg, len(splits.train))

    torch.manual_seed(data.derive_seed(cfg.training.seed, "init"))  # same init on every rank
    model = build_model(cfg.model, splits.num_features, splits.num_classes)
    model = ray.train.torch.prepare_model(model)  # Ray: move to device, wrap in DDP
    optimizer = build_optimizer(cfg.training.optimizer, model)
    scheduler = build_scheduler(cfg.training.lr_schedule, optimizer, plan.total_steps)

    restore_started = time.perf_counter()
    attempt = broadcast(uuid.uuid4().hex[:8] if rank == 0 else None)
    progress, resumed_from = resume(
        fs, run_dir, rank, cfg.checkpoint.num_to_keep, attempt, unwrap(model), optimizer, scheduler
    )
    worker = Worker(
        cfg=cfg,
        config_dict=config_dict,
        rank=rank,
        world_size=world_size,
        device=ray.train.torch.get_device(),  # Ray
        fs=fs,
        run_dir=run_dir,
        splits=splits,
        plan=plan,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        attempt=attempt,
        runlog=RunLog(fs, run_dir, attempt) if rank == 0 else None,
    )
    timing = {"began": began, "restore_s": time.perf_counter() - restore_started}
    announce_start(worker, progress, resumed_from, timing)
    return worker, progress


def resume(
    fs: pafs.FileSystem,
    run_dir: str,
    rank: int,
    keep: int,
    attempt: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> tuple[Progress, str | None]:
    """Load the newest valid checkpoint on storage, if any; rank 0 chooses it for everyone."""
    chosen = checkpoint.newest_valid(fs, run_dir) if rank == 0 else None
    path = broadcast(chosen.path if chosen else None)
    progress = Progress(global_step=0, epoch=0, step_in_epoch=0, attempt="")
    if path is not None:
        progress = checkpoint.restore(checkpoint.load(fs, path), model, optimizer, scheduler)
    barrier()  # everyone has loaded before rank 0 deletes anything
    if rank == 0:
        checkpoint.prune(fs, run_dir, keep=keep, attempt=attempt)
    return progress, path


def announce_start(
    worker: Worker, progress: Progress, resumed_from: str | None, timing: dict[str, float]
) -> None:
    if worker.runlog is None:
        return
    worker.runlog.write(
        "start",
        world_size=worker.world_size,
        resumed_from_step=progress.global_step if resumed_from else None,
        resumed_from_attempt=progress.attempt if resumed_from else None,
        steps_per_epoch=worker.plan.steps_per_epoch,
        total_steps=worker.plan.total_steps,
        global_batch_size=worker.cfg.training.global_batch_size,
        train_samples=len(worker.splits.train),
        **timing,
    )
    worker.runlog.flush()
    where = f"resuming from step {progress.global_step}" if resumed_from else "starting at step 0"
    log.info(
        "[attempt %s] world size %d, %s of %d (%d steps/epoch)",
        worker.attempt,
        worker.world_size,
        where,
        worker.plan.total_steps,
        worker.plan.steps_per_epoch,
    )


def run_steps(worker: Worker, progress: Progress) -> None:
    cfg = worker.cfg
    last_step = worker.plan.total_steps
    for global_step in range(progress.global_step + 1, last_step + 1):
        inject_faults(worker, global_step, "step")
        step_metrics = train_step(worker, global_step)
        if worker.runlog is not None:
            record_step(worker, global_step, step_metrics)
        # Node drain (training/drain.py): checkpoint now, then take no further step.
        draining = drain.requested(global_step, worker.world_size, cfg.training.log_every_n_steps)
        if draining or global_step % cfg.checkpoint.every_n_steps == 0 or global_step == last_step:
            save_and_report(worker, global_step, step_metrics)
            if draining and global_step < last_step:
                drain.hold(global_step)
        elif global_step % cfg.training.report_every_n_steps == 0:
            ray.train.report(public(step_metrics))  # Ray: a barrier, hence only every N steps
    if worker.runlog is not None:
        worker.runlog.write("end", global_step=last_step)


def train_step(worker: Worker, global_step: int) -> dict[str, Any]:
    """One global step; returns metrics averaged over the whole global batch (all ranks)."""
    started = time.perf_counter()
    epoch, step_in_epoch = worker.plan.position(global_step)
    batch = data.global_batch(
        epoch_order_cached(worker.cfg.training.seed, epoch, len(worker.splits.train)),
        step_in_epoch,
        worker.cfg.training.global_batch_size,
    )
    ids = data.rank_slice(batch, worker.rank, worker.world_size)
    features = worker.splits.train.features[ids].to(worker.device)
    labels = worker.splits.train.labels[ids].to(worker.device)

    # In-step randomness (dropout) depends only on (seed, global step, rank).
    torch.manual_seed(data.derive_seed(worker.cfg.training.seed, "step", global_step, worker.rank))
    worker.model.train()
    logits = worker.model(features)
    loss = nn.functional.cross_entropy(logits, labels)
    worker.optimizer.zero_grad(set_to_none=True)
    loss.backward()  # DDP all-reduces gradients here
    if worker.cfg.training.grad_clip_norm is not None:
        nn.utils.clip_grad_norm_(worker.model.parameters(), worker.cfg.training.grad_clip_norm)
    lr = worker.scheduler.get_last_lr()[0]
    worker.optimizer.step()
    worker.scheduler.step()

    correct = (logits.argmax(dim=1) == labels).sum()
    totals, all_ids = gather_step(loss.detach() * len(ids), correct, ids)
    elapsed = time.perf_counter() - started
    return {
        "global_step": global_step,
        "epoch": epoch,
        "step_in_epoch": step_in_epoch + 1,
        "loss": totals[0] / len(batch),
        "accuracy": totals[1] / len(batch),
        "lr": lr,
        "samples_per_s": len(batch) / elapsed,
        "world_size": worker.world_size,
        "samples": all_ids,
    }


def gather_step(loss_sum: torch.Tensor, correct: torch.Tensor, ids: torch.Tensor):
    """One small all-gather: every rank's loss, hits and sample ids, for logs and the ledger."""
    local = torch.cat(
        [torch.stack([loss_sum.float().cpu(), correct.float().cpu()]).double(), ids.double()]
    )
    if not dist.is_initialized() or dist.get_world_size() == 1:
        gathered = [local]
    else:
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, local)
    totals = [sum(float(t[i]) for t in gathered) for i in (0, 1)]
    all_ids = [int(i) for t in gathered for i in t[2:].tolist()]
    return totals, all_ids


@lru_cache(maxsize=2)
def epoch_order_cached(seed: int, epoch: int, num_samples: int) -> torch.Tensor:
    return data.epoch_order(seed, epoch, num_samples)


def record_step(worker: Worker, global_step: int, step_metrics: dict[str, Any]) -> None:
    worker.runlog.write("step", **step_metrics)
    metrics.record(step_metrics)
    if global_step % worker.cfg.training.log_every_n_steps == 0:
        log.info(
            "step %d/%d epoch %d loss %.4f acc %.3f lr %.2e %.0f samples/s world %d",
            global_step,
            worker.plan.total_steps,
            step_metrics["epoch"],
            step_metrics["loss"],
            step_metrics["accuracy"],
            step_metrics["lr"],
            step_metrics["samples_per_s"],
            worker.world_size,
        )


def save_and_report(worker: Worker, global_step: int, step_metrics: dict[str, Any]) -> None:
    """Checkpoint (rank 0 writes, Ray uploads) and report; every rank calls report."""
    epoch, done_in_epoch = divmod(global_step, worker.plan.steps_per_epoch)
    progress = Progress(global_step, epoch, done_in_epoch, worker.attempt)
    started = time.perf_counter()  # the whole pause: eval, write, report (and sync upload)
    reported = public(step_metrics)
    local_dir = None
    if worker.rank == 0:
        reported.update(evaluate(worker))
        worker.runlog.write("eval", global_step=global_step, **_eval_fields(reported))
        worker.runlog.flush()  # the ledger reaches storage before the checkpoint that needs it
        local_dir = tempfile.mkdtemp(prefix="elastic-trainer-ckpt-")
        checkpoint.write(
            local_dir,
            unwrap(worker.model),
            worker.optimizer,
            worker.scheduler,
            progress,
            worker.config_dict,
        )
    else:
        inject_faults(worker, global_step, "checkpoint")
    report_checkpoint(worker, global_step, reported, local_dir)
    if worker.rank == 0:
        blocked = time.perf_counter() - started
        worker.runlog.write(
            "checkpoint",
            global_step=global_step,
            blocked_s=blocked,
            path=posixpath.join(worker.run_dir, checkpoint.dir_name(global_step, worker.attempt)),
        )
        checkpoint.prune(
            worker.fs, worker.run_dir, worker.cfg.checkpoint.num_to_keep, worker.attempt
        )


def report_checkpoint(
    worker: Worker, global_step: int, reported: dict[str, Any], local_dir: str | None
) -> None:
    asynchronous = worker.cfg.checkpoint.upload == "async"
    ray.train.report(  # Ray: registers the checkpoint; our upload writes the manifest last
        reported,
        checkpoint=ray.train.Checkpoint.from_directory(local_dir) if local_dir else None,
        checkpoint_dir_name=checkpoint.dir_name(global_step, worker.attempt),
        checkpoint_upload_mode=(
            ray.train.CheckpointUploadMode.ASYNC
            if asynchronous
            else ray.train.CheckpointUploadMode.SYNC
        ),
        checkpoint_upload_fn=make_uploader(worker, global_step) if local_dir else None,
        delete_local_checkpoint_after_upload=bool(local_dir),
    )


def make_uploader(worker: Worker, global_step: int):
    """Copy a local checkpoint to storage with the manifest last, so a crash mid-upload leaves
    a directory that validation rejects rather than one that looks complete."""

    def upload(local: ray.train.Checkpoint, dir_name: str) -> ray.train.Checkpoint:
        target = posixpath.join(worker.run_dir, dir_name)
        worker.fs.create_dir(target, recursive=True)
        names = sorted(p for p in os.listdir(local.path) if p != checkpoint.MANIFEST_FILE)
        for name in names:
            _copy_file(posixpath.join(local.path, name), worker.fs, posixpath.join(target, name))
        inject_faults(worker, global_step, "checkpoint")
        manifest = posixpath.join(local.path, checkpoint.MANIFEST_FILE)
        _copy_file(manifest, worker.fs, posixpath.join(target, checkpoint.MANIFEST_FILE))
        return ray.train.Checkpoint(target, filesystem=worker.fs)

    return upload


def _copy_file(source: str, fs: pafs.FileSystem, target: str) -> None:
    with open(source, "rb") as src, fs.open_output_stream(target) as dst:
        shutil.copyfileobj(src, dst, length=8 << 20)


@torch.no_grad()
def evaluate(worker: Worker) -> dict[str, float]:
    """Held-out loss and accuracy on rank 0; uses no RNG, so it cannot perturb training."""
    val = worker.splits.val
    if len(val) == 0:
        return {}
    model = unwrap(worker.model)
    model.eval()
    logits = model(val.features.to(worker.device))
    labels = val.labels.to(worker.device)
    return {
        "val_loss": float(nn.functional.cross_entropy(logits, labels)),
        "val_accuracy": float((logits.argmax(dim=1) == labels).float().mean()),
    }


def _eval_fields(reported: dict[str, Any]) -> dict[str, Any]:
    return {k: reported[k] for k in ("val_loss", "val_accuracy") if k in reported}


def public(step_metrics: dict[str, Any]) -> dict[str, Any]:
    """The metrics reported to Ray: scalars only (sample ids stay in the run log)."""
    return {k: v for k, v in step_metrics.items() if k != "samples"}


def inject_faults(worker: Worker, global_step: int, during: str) -> None:
    chaos.maybe_inject(
        worker.cfg.chaos.faults, worker.fs, worker.run_dir, worker.rank, global_step, during
    )


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DDP (checkpoints never store the ``module.`` prefix)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def broadcast(value: Any) -> Any:
    """Rank 0's value on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
