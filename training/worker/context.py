"""What one worker needs at every step (``Worker``), built once per attempt, and the run's
``Plan``: how many global steps it has and where a step falls in its epoch."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs
import torch
from torch import nn

from training import tasks
from training.core import data
from training.core.config import Config
from training.core.runlog import RunLog
from training.core.save_protocol import SaveProtocol
from training.ray_internals import spares
from training.worker import chaos, reporting
from training.worker.boundary import StepBoundary
from training.worker.cadence import Interval
from training.worker.collectives import Collectives
from training.worker.runtime import Runtime
from training.worker.staging import Stager


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
    runtime: Runtime
    comm: Collectives
    rank: int
    world_size: int
    device: torch.device
    fs: pafs.FileSystem
    run_dir: str
    task: tasks.Task
    train: Any
    val: Any
    info: Any  # Loaded.info: what the task's load learned, for its build_model and metrics
    plan: Plan
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    attempt: str
    runlog: RunLog | None  # rank 0 only
    spare_keeper: spares.Keeper | None = None  # the lowest local rank of each node only
    interval: Interval = field(default_factory=Interval)
    stager: Stager = field(default_factory=Stager)
    reporter: reporting.Reporter = field(default_factory=reporting.Reporter)
    # Who writes the state, among the training, report, upload and shutdown threads.
    saves: SaveProtocol = field(default_factory=SaveProtocol)
    warned_slow_save: bool = False
    # The non-parameter state as the last completed step left it (``StepBoundary``).
    boundary: StepBoundary | None = None
    tampering: bool = False  # a test-only chaos fault changes the ids of one step
    # fsdp's asynchronous checkpoints: the ranks' second group, for the report thread's seal.
    side_comm: Collectives | None = None
    pending_seal: Future | None = None  # ends with the newest checkpoint's manifest (fsdp)

    def __post_init__(self) -> None:
        self.tampering = chaos.tampers(self.cfg.chaos.faults, self.rank)


def inject_faults(worker: Worker, global_step: int, during: str) -> None:
    chaos.maybe_inject(
        worker.cfg.chaos.faults, worker.fs, worker.run_dir, worker.rank, global_step, during
    )


def initial_model(cfg: Config, task: tasks.Task, info: Any) -> nn.Module:
    """The task's model as a fresh run starts it: built under the run's seed, so every rank
    (and every attempt) gets the same initial values."""
    torch.manual_seed(data.derive_seed(cfg.training.seed, "init"))
    return task.build_model(info)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DDP (checkpoints never store the ``module.`` prefix)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
