"""One global step: which sample ids it uses, micro-batches, precision, the optimizer step;
and the chaos points inside forward and backward."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from training import tasks
from training.core import data
from training.worker import chaos, sharded
from training.worker.context import inject_faults, unwrap

if TYPE_CHECKING:
    from training.worker.context import Worker


def train_step(worker: Worker, global_step: int) -> float:
    """One global step: the worker's share of the global batch in micro-batches, gradients
    accumulated (DDP syncs only on the last), then clip and optimizer step. Returns the LR used."""
    cfg = worker.cfg.training
    epoch, step_in_epoch = worker.plan.position(global_step)
    ids = data.rank_slice(
        global_batch_ids(worker, epoch, step_in_epoch), worker.rank, worker.world_size
    )
    if worker.tampering:  # test-only chaos: the ledger's witness must notice
        ids = chaos.tamper(worker.cfg.chaos.faults, worker.rank, global_step, ids)
    chunks = ids.split(cfg.micro_batch_size or len(ids))
    batch_seed = data.derive_seed(cfg.seed, "batch", epoch)
    worker.model.train()
    worker.optimizer.zero_grad(set_to_none=True)
    for index, chunk in enumerate(chunks):
        samples = worker.task.batch(worker.train, chunk, batch_seed, training=True)
        batch = tasks.to_device(samples, worker.device)
        worker.interval.consume(global_step, chunk)
        # In-step randomness (dropout) depends only on (seed, global step, rank, micro-batch).
        data.seed_step(
            data.derive_seed(
                cfg.seed, "step", global_step, worker.rank, *((index,) if index else ())
            ),
            worker.device,
        )
        last = index == len(chunks) - 1
        with no_sync_unless(worker.model, last), autocast(worker):
            out = worker.task.step(worker.model, batch)
        # Each micro-batch weighs by its share of the worker's samples: the same gradient as one
        # pass over the whole share, whatever the micro-batch size.
        worker.scaler.scale(out.loss * (len(chunk) / len(ids))).backward()
        worker.interval.add(out.totals)
        worker.interval.watch(global_step, out.loss)
    if sharded.is_sharded(worker.model):  # DDP broadcasts rank 0's buffers itself
        worker.comm.broadcast_in_place(state_buffers(worker.model))
    if cfg.grad_clip_norm is not None:
        worker.scaler.unscale_(worker.optimizer)
        norm = nn.utils.clip_grad_norm_(worker.model.parameters(), cfg.grad_clip_norm)
        norm = sharded.full_norm(norm)
        if not worker.scaler.is_enabled():  # fp16: the scaler skips steps with inf gradients
            worker.interval.watch(global_step, norm)
    lr = worker.scheduler.get_last_lr()[0]
    worker.scaler.step(worker.optimizer)
    worker.scaler.update()
    worker.scheduler.step()
    worker.interval.steps += 1
    worker.interval.samples += cfg.global_batch_size
    return lr


def step_completed(worker: Worker, global_step: int) -> None:
    """The state is now that of ``global_step``: what a save on failure may write."""
    worker.saves.state_step = global_step
    if worker.boundary is not None:
        worker.boundary.capture(global_step)


def state_buffers(model: nn.Module) -> list[torch.Tensor]:
    """The model's persistent buffers: the ones in its state dict (BatchNorm's running statistics
    and counter), which fsdp gives every rank from rank 0 after each step's forward passes, as
    DDP's ``broadcast_buffers`` does before the next forward. Then every rank holds the state of
    the step at its end: a checkpoint (DCP writes one rank's copy of a replicated tensor) and an
    evaluation no longer depend on which rank's copy they read. A non-persistent buffer (the
    language model's causal mask) is in no checkpoint, so no resume could restore it: a
    constant, left out, and a model with nothing else issues no collective. Read every step, not
    once: a module may assign a new tensor to a buffer."""
    found = {
        id(buffer): buffer
        for module in model.modules()
        for name, buffer in module._buffers.items()
        if buffer is not None and name not in module._non_persistent_buffers_set
    }
    return list(found.values())


def no_sync_unless(model: nn.Module, sync: bool):
    """DDP's no_sync on every micro-batch but the last: one gradient all-reduce per step. FSDP2:
    its flag, read in backward, set for every micro-batch (reduce-scatter on the last only)."""
    if sharded.is_sharded(model):
        model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    if sync or not isinstance(model, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


def autocast(worker: Worker):
    precision = worker.cfg.training.precision
    # fsdp: FSDP2's mixed-precision policy casts instead (sharded.prepare).
    if precision == "fp32" or worker.cfg.training.parallelism == "fsdp":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(worker.device.type, dtype=dtype)


def global_batch_ids(worker: Worker, epoch: int, step_in_epoch: int) -> torch.Tensor:
    # Streaming (#15): a sharded task's layout makes the order shard-aware (None: a shuffle).
    layout = worker.task.shard_layout(worker.train)
    batch_size = worker.cfg.training.global_batch_size
    order = epoch_order_cached(
        worker.cfg.training.seed, epoch, len(worker.train), layout, batch_size
    )
    return data.global_batch(order, step_in_epoch, batch_size)


# Streaming (#15): the prefetcher may be an epoch ahead of the steps.
@functools.lru_cache(maxsize=4)
def epoch_order_cached(
    seed: int, epoch: int, num_samples: int, layout: data.ShardLayout | None, batch_size: int
) -> torch.Tensor:
    return data.epoch_order(seed, epoch, num_samples, layout, batch_size)


def upcoming_ids(worker: Worker, done: int) -> Iterator[torch.Tensor]:
    """Streaming (#15): this rank's ids for every step after ``done``, lazily, in order."""
    for global_step in range(done + 1, worker.plan.total_steps + 1):
        epoch, step_in_epoch = worker.plan.position(global_step)
        batch = global_batch_ids(worker, epoch, step_in_epoch)
        yield data.rank_slice(batch, worker.rank, worker.world_size)


def install_fault_hooks(worker: Worker) -> None:
    """Faults inside the forward and the backward pass of a step (``chaos``): hooks on this
    rank's model, only when such a fault is configured for it (nothing per step otherwise).
    ``forward`` fires after the model's forward ran (its buffers moved); ``backward`` once the
    first parameter's gradient is accumulated, which autograd reaches last, so DDP has
    all-reduced the other buckets by then (FSDP2 runs the hook on a sharded parameter itself,
    after reduce-scattering its gradient)."""
    points = {f.during for f in worker.cfg.chaos.faults if f.rank == worker.rank}
    model = unwrap(worker.model)

    def in_forward(module: nn.Module, *_: Any) -> None:
        if module.training:  # a training step's forward, not evaluation's
            inject_faults(worker, worker.saves.state_step + 1, "forward")

    def in_backward(_: torch.Tensor) -> None:
        inject_faults(worker, worker.saves.state_step + 1, "backward")

    if "forward" in points:
        model.register_forward_hook(in_forward)
    if "backward" in points:
        next(model.parameters()).register_post_accumulate_grad_hook(in_backward)
