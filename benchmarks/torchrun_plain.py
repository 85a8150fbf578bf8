"""A plain torchrun training script, FSDP2 or DDP, written as a user would write one: the
comparison point for the project's ``training.parallelism: fsdp`` (and ``ddp``).

    torchrun --standalone --nproc-per-node 2 benchmarks/torchrun_plain.py \
        --config training/configs/language_model.yaml --set training.parallelism=fsdp \
        --set KEY=VALUE ... --run-dir DIR [--save-final PATH]

The same work per step as the project's run of that config: the task's model built under the
run's seed, then ``fully_shard`` on each of its units (``Task.shard_units``: the language
model's Transformer blocks) and on the root (fsdp), or wrapped in DDP (ddp); the same samples
(the project's sample order, a pure function of seed and epoch), the task's batches and loss,
the optimizer and LR schedule of ``training/core/optim.py``, gradient clipping. Nothing of the
worker package: no ``build_worker`` or ``train_step``, no meta-device build, no micro-batches
(one pass per step; a config with ``micro_batch_size`` is refused), fp32 only, no per-step
reseeding, no interval totals, evaluation, checkpoints, ledger or failure handling.

Rank 0 writes the ``start`` and ``step`` events of the torchrun baseline's run log
(``<run dir>/runlog/<attempt>.jsonl``, ``step_s`` timing the whole step, batch building
included), so one reader serves both. ``--save-final`` writes the whole model at the end
(rank 0): with dropout 0 it is bitwise what the project's fsdp loop ends with
(``tests/unit/test_benchmarks_baseline.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from training import tasks
from training.core import data
from training.core.optim import build_optimizer, build_scheduler
from training.driver.settings import load_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--save-final", help="rank 0 writes the whole model here at the end")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    train = cfg.training
    if train.micro_batch_size or train.precision != "fp32":
        sys.exit("torchrun_plain.py: one pass per step in fp32 only")

    dist.init_process_group("gloo")  # torchrun's env:// rendezvous
    rank, world = dist.get_rank(), dist.get_world_size()
    task = tasks.build(cfg.task.name, cfg.task.options, tasks.data_source(cfg))
    loaded = tasks.load(task)
    torch.manual_seed(data.derive_seed(train.seed, "init"))  # the project's initial values
    model = task.build_model(loaded.info)
    if train.parallelism == "fsdp":
        mesh = init_device_mesh("cpu", (world,))
        for unit in task.shard_units(model) or []:
            fully_shard(unit, mesh=mesh)
        fully_shard(model, mesh=mesh)
    else:
        model = nn.parallel.DistributedDataParallel(model)
    bare = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    optimizer = build_optimizer(train.optimizer, model, task.param_groups(bare))
    per_epoch = data.steps_per_epoch(len(loaded.train), train.global_batch_size)
    total = min(per_epoch * train.epochs, train.max_steps or per_epoch * train.epochs)
    scheduler = build_scheduler(train.lr_schedule, optimizer, total)
    log = RunLog(Path(args.run_dir)) if rank == 0 else None
    if log:
        log.write("start", world_size=world, total_steps=total, threads=torch.get_num_threads(),
                  parallelism=train.parallelism, script="torchrun_plain")  # fmt: skip

    model.train()
    order, order_epoch = None, -1
    for global_step in range(1, total + 1):
        started = time.perf_counter()
        epoch, step_in_epoch = divmod(global_step - 1, per_epoch)
        if epoch != order_epoch:
            order = data.epoch_order(train.seed, epoch, len(loaded.train))
            order_epoch = epoch
        batch_ids = data.global_batch(order, step_in_epoch, train.global_batch_size)
        ids = data.rank_slice(batch_ids, rank, world)
        seed = data.derive_seed(train.seed, "batch", epoch)
        batch = task.batch(loaded.train, ids, seed, training=True)
        optimizer.zero_grad(set_to_none=True)
        task.step(model, batch).loss.backward()
        if train.grad_clip_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip_norm)
        optimizer.step()
        scheduler.step()
        if log:
            log.write("step", global_step=global_step, step_s=time.perf_counter() - started)

    if args.save_final:
        if train.parallelism == "fsdp":  # a collective: every rank
            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            state = get_model_state_dict(model, options=options)
        else:
            state = bare.state_dict()
        if rank == 0:
            torch.save(state, args.save_final)
    dist.barrier()  # every rank has finished before any exits
    # Out without tearing down (as the torchrun baseline: freeing a DDP model after the group
    # was destroyed deadlocked in torch 2.13's teardown). Nothing is left to flush but stdio.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class RunLog:
    def __init__(self, run_dir: Path):
        self.attempt = f"{time.time_ns()}-plain"
        path = run_dir / "runlog" / f"{self.attempt}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("a", buffering=1)

    def write(self, event: str, **fields) -> None:
        line = {"event": event, "attempt": self.attempt, "time": time.time(), **fields}
        self.file.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
