"""Where the training loop runs: inside Ray Train's workers, or in plain processes.

The loop (``training/worker/``) asks its runtime for what differs between the two: its rank
and world size, its device, the run's storage, how the model is prepared, how a checkpoint and
metrics are reported, whether a node is being drained. :class:`RayRuntime` is the product;
:class:`LocalRuntime` runs the same loop in one process or under ``torchrun`` (gloo on CPU,
NCCL on GPUs), which the fast tests and the torchrun baseline use. Everything Ray-specific in
the worker goes through here.
"""

from __future__ import annotations

import datetime
import os
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from training.core import storage
from training.core.config import Config
from training.observability import metrics
from training.ray_internals import console, drain, spares

# Writes a checkpoint to storage (manifest last) and returns its directory.
Upload = Callable[[], str]


class RayRuntime:
    """A Ray Train worker (``ray.train.get_context()``): Ray made the process group."""

    def __init__(self, cfg: Config) -> None:
        import ray.train
        import ray.train.torch

        console.quiet_report_echo()  # Ray's echo of every report: the progress lines say it
        self._cfg = cfg
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.local_rank = context.get_local_rank()
        self.local_world_size = context.get_local_world_size()
        self.device = ray.train.torch.get_device()
        if self.device.type == "cuda":  # Ray sets it too; NCCL and CUDA seeding depend on it
            torch.cuda.set_device(self.device)
        run_storage = context.get_storage()
        self.fs, self.run_dir = run_storage.storage_filesystem, run_storage.experiment_fs_path
        self.metrics = metrics  # Prometheus through Ray's metrics agent

    def prepare_model(self, model: nn.Module) -> nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)  # to the device, DDP when world > 1

    def report_metrics(self, reported: dict[str, Any]) -> None:
        import ray.train

        ray.train.report(reported)  # a barrier of all ranks

    def report_checkpoint(
        self, reported: dict[str, Any], dir_name: str, upload: Upload | None, asynchronous: bool
    ) -> None:
        """Every rank calls this for every checkpoint (a barrier); rank 0 passes ``upload``,
        which Ray runs after the barrier (in its upload thread when ``asynchronous``)."""
        import ray.train

        local_dir = empty_checkpoint_dir() if upload else None
        ray.train.report(  # our upload writes the files, the manifest last; Ray registers them
            reported,
            checkpoint=ray.train.Checkpoint.from_directory(local_dir) if local_dir else None,
            checkpoint_dir_name=dir_name,
            checkpoint_upload_mode=(
                ray.train.CheckpointUploadMode.ASYNC
                if asynchronous
                else ray.train.CheckpointUploadMode.SYNC
            ),
            checkpoint_upload_fn=(
                (lambda _local, _name: ray.train.Checkpoint(upload(), filesystem=self.fs))
                if upload
                else None
            ),
            delete_local_checkpoint_after_upload=False,
        )

    def drain_requested(self) -> bool:
        return drain.local_flag()

    def spare_keeper(self) -> spares.Keeper | None:
        """Warm spare processes for the next attempt, kept by the lowest local rank of a node."""
        if self._cfg.failure.spare_workers and self.local_rank == 0:
            return spares.Keeper(self.local_world_size)
        return None


def empty_checkpoint_dir() -> str:
    """The local directory every report of a checkpoint names: Ray Train reports a checkpoint
    only from a local directory, and the project's upload writes the files itself, so it stays
    empty. One per user and machine, never deleted. (A new one per report, for Ray to delete
    after the upload, was left behind each time the upload did not run to its end: refused
    after a failure, failed, or its worker killed.)"""
    path = os.path.join(tempfile.gettempdir(), f"elastic-trainer-empty-checkpoint-{os.getuid()}")
    os.makedirs(path, exist_ok=True)
    return path


class NoMetrics:
    """Outside Ray there is no metrics agent to publish to; the run log keeps every figure."""

    @staticmethod
    def record(run: str, step_metrics: dict[str, Any], steps: int, samples: int) -> None:
        del run, step_metrics, steps, samples

    @staticmethod
    def attempt_started(run: str, global_step: int, world_size: int) -> None:
        del run, global_step, world_size

    @staticmethod
    def run_ended(run: str) -> None:
        del run


class LocalRuntime:
    """One process of a plain (``torchrun``-style) job: rank and world from ``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE`` (one process alone when unset); the
    process group is made here when there is more than one rank. Checkpoints are written at
    once, in the caller's thread (the loop's report thread when the upload is asynchronous)."""

    def __init__(self, cfg: Config, timeout_s: float = 600.0, init_method: str = "env://") -> None:
        self.rank = int(os.environ.get("RANK", "0"))
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", str(self.rank)))
        self.local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(self.world_size)))
        self.device = (
            torch.device("cuda", self.local_rank) if cfg.scaling.use_gpu else torch.device("cpu")
        )
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # NCCL and CUDA seeding use the current device
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group(
                "nccl" if self.device.type == "cuda" else "gloo",
                init_method=init_method,  # env://: MASTER_ADDR and MASTER_PORT, as torchrun sets
                rank=self.rank,
                world_size=self.world_size,
                timeout=datetime.timedelta(seconds=timeout_s),
            )
        self.fs, self.run_dir = storage.run_location(cfg.storage, cfg.run.name)
        self.metrics = NoMetrics

    def prepare_model(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        if self.world_size == 1:
            return model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    def report_metrics(self, reported: dict[str, Any]) -> None:
        del reported  # nobody to report to: the run log has them

    def report_checkpoint(
        self, reported: dict[str, Any], dir_name: str, upload: Upload | None, asynchronous: bool
    ) -> None:
        del reported, dir_name, asynchronous
        if upload is not None:
            upload()

    def drain_requested(self) -> bool:
        return False

    def spare_keeper(self) -> None:
        return None


Runtime = RayRuntime | LocalRuntime
