"""Held-out metrics, sharded over the ranks like a training batch."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from training import tasks
from training.core import data
from training.worker.cadence import Interval, reduce_totals
from training.worker.context import unwrap
from training.worker.step import autocast

if TYPE_CHECKING:
    from training.worker.context import Worker


@torch.no_grad()
def evaluate(worker: Worker, global_step: int) -> dict[str, float]:
    """Held-out metrics on the first ``eval.batches`` global batches of val, each sharded over
    the ranks like a training batch; no augmentation, no RNG, so it cannot perturb training."""
    size = worker.cfg.training.global_batch_size
    count = min(len(worker.val), worker.cfg.eval.batches * size)
    model = unwrap(worker.model)
    model.eval()
    seed = data.derive_seed(worker.cfg.training.seed, "eval")  # the same at every evaluation
    interval = Interval()
    for start in range(0, count, size):
        batch_ids = torch.arange(start, min(start + size, count))
        ids = data.rank_slice(batch_ids, worker.rank, worker.world_size)
        if len(ids) == 0:
            continue
        samples = worker.task.batch(worker.val, ids, seed, training=False)
        batch = tasks.to_device(samples, worker.device)
        with autocast(worker):
            interval.add(worker.task.step(model, batch).totals)
    totals, *_ = reduce_totals(worker.comm, interval.totals, None)
    if not totals:
        return {}
    reported = {f"val_{k}": v for k, v in worker.task.metrics(totals, worker.info).items()}
    if worker.runlog is not None:
        worker.runlog.write("eval", global_step=global_step, **reported)
    return reported
