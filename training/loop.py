"""The per-worker DDP loop that Ray Train runs on every worker (``train_func``).

The framework owns time, the task owns samples: which sample ids a step uses, the randomness
inside it, accumulation, precision, clipping, checkpoints and the ledger live here; what a sample
is, the model and the loss come from the task (``training/tasks``).

Fresh start and resume are one code path: every attempt looks for the newest valid checkpoint
on storage and continues from the step after it. Which samples a step uses and the randomness
inside it are functions of (seed, global step, rank), never of the attempt, which is what makes
a resumed run bitwise equal to an uninterrupted one at the same world size.

Nothing per step talks to other ranks beyond DDP's gradient all-reduce: the task's totals stay
on the device and are summed over the ranks once per log interval (and before a checkpoint, so
a non-finite loss is caught before it can be saved).

Where the loop runs is its runtime's business (``training/runtime.py``): Ray Train's workers
(``train_func``), or plain processes (``train_in_process``: one process, or ``torchrun``), and
every collective goes through ``training/collectives.py``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import math
import os
import posixpath
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs
import torch
import torch.distributed as dist
from torch import nn

from training import (
    chaos,
    checkpoint,
    data,
    drain,
    events,
    pace,
    priority,
    reporting,
    save_protocol,
    shutdown_grace,
    spares,
    stops,
    task_contract,
    tasks,
)
from training.checkpoint import Progress
from training.collectives import Collectives
from training.config import Config
from training.optim import build_optimizer, build_scheduler
from training.runlog import RunLog
from training.runtime import LocalRuntime, RayRuntime, Runtime
from training.save_protocol import FailureSave, SaveProtocol

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
class Interval:
    """The task's totals since the last log line, kept on the device (no host sync per step),
    and the first step whose loss or gradient norm was not finite (inf: none)."""

    totals: dict[str, torch.Tensor] = field(default_factory=dict)
    first_bad_step: torch.Tensor | None = None
    # The ledger's witness: per step, how many ids this rank fed ``task.batch`` and their digest.
    consumed: dict[int, list[int]] = field(default_factory=dict)
    steps: int = 0
    samples: int = 0
    started: float = field(default_factory=time.perf_counter)

    def add(self, totals: dict[str, torch.Tensor]) -> None:
        for key, value in totals.items():
            self.totals[key] = self.totals[key] + value if key in self.totals else value

    def consume(self, global_step: int, ids: torch.Tensor) -> None:
        count_and_digest = self.consumed.setdefault(global_step, [0, 0])
        count_and_digest[0] += len(ids)
        count_and_digest[1] += data.ids_digest(ids)

    def consumed_row(self) -> list[float]:
        return [float(v) for step in sorted(self.consumed) for v in self.consumed[step]]

    def watch(self, global_step: int, *values: torch.Tensor) -> None:
        if values[0].device.type == "cpu":  # reading a CPU tensor syncs nothing: check in Python
            if self.first_bad_step is None and not all(
                math.isfinite(x) for v in values for x in v.detach().float().flatten().tolist()
            ):
                self.first_bad_step = torch.tensor(float(global_step))
            return
        finite = torch.stack([torch.isfinite(v.detach().float()).all() for v in values]).all()
        step = torch.where(finite, math.inf, float(global_step)).to(values[0].device)
        if self.first_bad_step is None:
            self.first_bad_step = step
        else:
            self.first_bad_step = torch.minimum(self.first_bad_step, step)


class StepBoundary:
    """The state a forward pass changes, as the last completed step left it.

    BatchNorm's running statistics and counters (any persistent buffer) move in the forward
    pass, before the step's gradients are all-reduced, and a task may change its own state in
    ``batch`` or ``step``. When a peer dies inside a step, rank 0 already holds the step in
    flight's buffers beside the last completed step's parameters and optimizer (those change
    only in the optimizer step, after every collective). The save on failure takes the buffers
    and the task state from here. Per step: one copy of the buffers into reused tensors on
    their device (no host sync), and a copy of the task state if the task keeps any; nothing
    at all for a model without buffers and a task without state.
    """

    def __init__(self, model: nn.Module, task: tasks.Task) -> None:
        self._model, self._task = model, task
        self._live = buffers_of(model)
        self._saved = {name: torch.empty_like(t) for name, t in self._live.items()}
        self._keeps_task_state = type(task).state_dict is not tasks.Task.state_dict
        self._task_state: dict[str, Any] = {}
        self.step = -1

    def capture(self, step: int) -> None:
        with torch.no_grad():
            for name, tensor in self._live.items():
                self._saved[name].copy_(tensor)
        if self._keeps_task_state:
            self._task_state = copy.deepcopy(self._task.state_dict())
        self.step = step

    def state_at(self, step: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(model state, task state) as step ``step`` ended; raises if this boundary cannot
        say (not captured at that step, or the model replaced a buffer object since)."""
        if step != self.step:
            raise RuntimeError(f"step {step} is not the captured boundary ({self.step})")
        live = buffers_of(self._model)
        if live.keys() != self._live.keys() or any(
            live[name] is not tensor for name, tensor in self._live.items()
        ):
            raise RuntimeError("the model replaced a buffer during training")
        model_state = {**self._model.state_dict(), **self._saved}
        task_state = self._task_state if self._keeps_task_state else self._task.state_dict()
        return model_state, task_state


def buffers_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """The persistent buffers of ``model`` by state-dict key (live tensors, not copies)."""
    params = {id(p) for p in model.parameters()}
    return {
        name: tensor
        for name, tensor in model.state_dict(keep_vars=True).items()
        if id(tensor) not in params
    }


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
    plan: Plan
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    attempt: str
    runlog: RunLog | None  # rank 0 only
    spare_keeper: spares.Keeper | None = None  # the lowest local rank of each node only
    interval: Interval = field(default_factory=Interval)
    stager: checkpoint.Stager = field(default_factory=checkpoint.Stager)
    reporter: reporting.Reporter = field(default_factory=reporting.Reporter)
    # Who writes the state, among the training, report, upload and shutdown threads.
    saves: SaveProtocol = field(default_factory=SaveProtocol)
    warned_slow_save: bool = False
    # The non-parameter state as the last completed step left it (``StepBoundary``).
    boundary: StepBoundary | None = None
    tampering: bool = False  # a test-only chaos fault changes the ids of one step

    def __post_init__(self) -> None:
        self.tampering = chaos.tampers(self.cfg.chaos.faults, self.rank)


def train_func(config_dict: dict[str, Any]) -> None:
    """Entry point on every Ray Train worker."""
    attempt(config_dict, RayRuntime)


def train_in_process(
    config_dict: dict[str, Any], timeout_s: float = 600.0, init_method: str = "env://"
) -> None:
    """The same attempt without Ray: one process, or one of a ``torchrun`` job (see
    ``runtime.LocalRuntime``); ``timeout_s`` bounds a collective whose peer died."""
    attempt(
        config_dict,
        functools.partial(LocalRuntime, timeout_s=timeout_s, init_method=init_method),
    )
    # The group's threads must end before the interpreter does: left to process exit, gloo's
    # teardown aborted a finished rank ("terminate called without an active exception").
    if dist.is_initialized():
        dist.destroy_process_group()


def attempt(config_dict: dict[str, Any], make_runtime: Callable[[Config], Runtime]) -> None:
    saves = save_protocol.THIS_PROCESS
    saves.begin_attempt()  # from here Ray's shutdown of the group waits for a failure save
    try:
        run_attempt(*start_attempt(config_dict, make_runtime, saves))
    finally:
        saves.end_attempt()  # Ray may now kill this process


def run_attempt(worker: Worker, progress: Progress) -> None:
    try:
        run_steps(worker, progress)
    except (stops.NonFiniteLoss, stops.BrokenTask) as exc:
        if worker.rank == 0:
            stops.record(worker.fs, worker.run_dir, exc)
            worker.runlog.write("stopped", global_step=exc.step, reason=str(exc))
            worker.runtime.metrics.run_ended(worker.cfg.run.name)
        raise
    except Exception:
        if worker.cfg.checkpoint.on_failure:
            save_on_failure(worker)
        raise
    finally:
        worker.reporter.stop()
        if worker.spare_keeper is not None:
            worker.spare_keeper.stop()
        if worker.runlog is not None:
            worker.runlog.close()


def match_threads_to_cpus() -> None:
    """Size torch's thread pool to the CPUs Ray gave this worker (OMP_NUM_THREADS, which Ray
    sets as the actor starts). A worker process that imported torch before that (for example
    with ``RAY_preload_python_modules=torch``) would otherwise run one thread per core of the
    machine: measured 6x slower steps with 2 workers on 2 cores."""
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0 and torch.get_num_threads() != int(threads):
        torch.set_num_threads(int(threads))


def start_attempt(
    config_dict: dict[str, Any], make_runtime: Callable[[Config], Runtime], saves: SaveProtocol
) -> tuple[Worker, Progress]:
    began = time.time()  # for the recovery timeline: worker up -> state restored -> first step
    cfg = Config.model_validate(config_dict)
    runtime = make_runtime(cfg)  # rank, world size, device and the run's storage
    stopped = stops.read(runtime.fs, runtime.run_dir)
    if stopped:  # a retry after a non-finite loss would only repeat it
        raise RuntimeError(stopped)
    match_threads_to_cpus()
    if cfg.training.deterministic:
        make_deterministic(runtime.device)
    worker = build_worker(cfg, config_dict, runtime, saves=saves)

    restore_started = time.perf_counter()
    rank, fs, run_dir = worker.rank, worker.fs, worker.run_dir
    worker.attempt = worker.comm.broadcast_object(uuid.uuid4().hex[:8] if rank == 0 else None)
    worker.runlog = RunLog(fs, run_dir, worker.attempt) if rank == 0 else None
    worker.spare_keeper = runtime.spare_keeper()
    progress, resumed_from = resume(worker)
    saves.resumed_from(progress.global_step)
    if rank == 0 and cfg.checkpoint.on_failure:
        worker.boundary = StepBoundary(unwrap(worker.model), worker.task)
        worker.boundary.capture(progress.global_step)
    install_fault_hooks(worker)
    timing = {"began": began, "restore_s": time.perf_counter() - restore_started}
    announce_start(worker, progress, resumed_from, timing)
    return worker, progress


def build_worker(
    cfg: Config, config_dict: dict[str, Any], runtime: Runtime, **fields: Any
) -> Worker:
    """The task and its data, the model as the runtime prepares it (on the device, in DDP when
    the world is larger than one), optimizer, LR schedule and grad scaler: what every step
    needs. The attempt, the torchrun baseline and the unit tests build theirs here."""
    task = tasks.build(cfg.task.name, cfg.task.options, tasks.data_source(cfg))
    train, val = task.load()
    plan = Plan.for_run(cfg, len(train))
    torch.manual_seed(data.derive_seed(cfg.training.seed, "init"))  # same init on every rank
    model = runtime.prepare_model(task.build_model())
    optimizer = build_optimizer(cfg.training.optimizer, model, task.param_groups(unwrap(model)))
    device = runtime.device
    return Worker(
        cfg=cfg,
        config_dict=config_dict,
        runtime=runtime,
        comm=Collectives(device),
        rank=runtime.rank,
        world_size=runtime.world_size,
        device=device,
        fs=runtime.fs,
        run_dir=runtime.run_dir,
        task=task,
        train=train,
        val=val,
        plan=plan,
        model=model,
        optimizer=optimizer,
        scheduler=build_scheduler(cfg.training.lr_schedule, optimizer, plan.total_steps),
        scaler=torch.amp.GradScaler(device.type, enabled=cfg.training.precision == "fp16"),
        **{"attempt": "", "runlog": None, **fields},
    )


def resume(worker: Worker) -> tuple[Progress, str | None]:
    """Load the newest valid checkpoint on storage, if any; rank 0 chooses it for everyone by
    loading it (one read, its checksum checked as it streams; a corrupted one is skipped), then
    every other rank reads it once."""
    fs, run_dir = worker.fs, worker.run_dir
    loaded = None
    if worker.rank == 0:
        checkpoint.remember_registered(fs, run_dir)  # prune leaves these to Ray
        loaded = checkpoint.load_newest(fs, run_dir)
    path = worker.comm.broadcast_object(loaded[0].path if loaded else None)
    progress = Progress(global_step=0, epoch=0, step_in_epoch=0, attempt="")
    if path is not None:
        state = loaded[1] if loaded else checkpoint.load(fs, path)
        progress = checkpoint.restore(
            state, unwrap(worker.model), worker.optimizer, worker.scheduler
        )
        restore_extra(worker, state)
    worker.comm.barrier()  # everyone has loaded before rank 0 deletes anything
    if worker.rank == 0:
        checkpoint.prune(
            fs, run_dir, keep=worker.cfg.checkpoint.num_to_keep, attempt=worker.attempt
        )
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
        train_samples=len(worker.train),
        # The ledger: with these, a step's sample ids are a pure function of its position.
        seed=worker.cfg.training.seed,
        layout=data.layout_record(worker.task.shard_layout()),
        task=worker.cfg.task.name,
        pid=os.getpid(),  # rank 0's process: tells a failure of rank 0 from one of a peer
        nice=os.getpriority(os.PRIO_PROCESS, 0),  # the training thread's (training/priority.py)
        # Before the failure: the attempt runs in a warm spare (training/spares.py).
        process_started_at=spares.process_started_at(),
        preloaded_at=spares.preloaded_at,
        **timing,
    )
    worker.runlog.flush()
    worker.runtime.metrics.attempt_started(
        worker.cfg.run.name, progress.global_step, worker.world_size
    )
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
    worker.interval = Interval()
    # Not on streamed data: reads outside the prefetch plan there would cost the plan's memory
    # budget and its bookkeeping (check-task still checks such a task).
    if progress.global_step == 0 and worker.rank == 0 and worker.task.shard_layout() is None:
        check_task_at_start(worker)
    # Streaming (#15): tell the task which ids this rank's remaining steps use, so it can read
    # ahead in the background; a no-op for in-memory tasks.
    worker.task.prefetch(worker.train, upcoming_ids(worker, progress.global_step))
    for global_step in range(progress.global_step + 1, last_step + 1):
        inject_faults(worker, global_step, "step")
        started = time.perf_counter()
        lr = train_step(worker, global_step)
        step_completed(worker, global_step)
        if global_step == progress.global_step + 1 and worker.spare_keeper is not None:
            worker.spare_keeper.start()  # after the first step: the spares' imports do not delay it
        # The step's own timer, without a device sync: exact on CPU, launch time on GPU.
        step_s = time.perf_counter() - started
        checkpoint_due = global_step % cfg.checkpoint.every_n_steps == 0 or global_step == last_step
        every_report = cfg.training.report_every_n_steps
        report_due = every_report is not None and global_step % every_report == 0
        evaluate_now = cfg.eval.due(global_step, checkpoint_due)
        log_due = global_step % cfg.training.log_every_n_steps == 0
        step_metrics: dict[str, Any] = {}
        draining = False  # a node drain (training/drain.py): checkpoint now, then no more steps
        if checkpoint_due or report_due or evaluate_now or log_due:
            # Raises on a non-finite loss; the ranks agree on a drain in the same reduction.
            step_metrics, draining = close_interval(worker, global_step, lr)
        if worker.runlog is not None:
            record_step(worker, global_step, step_s, step_metrics)
            worker.saves.recorded_step = global_step  # the training thread's own fields
        if evaluate_now:
            step_metrics.update(evaluate(worker, global_step))
        if checkpoint_due or draining:
            save_and_report(worker, global_step, step_metrics)
            if draining and global_step < last_step:
                worker.reporter.wait()  # the drain checkpoint is Ray's before this rank stops
                drain.hold(global_step)
        elif report_due:  # Ray: a barrier, hence only every N steps, and off this thread
            worker.reporter.submit(
                functools.partial(worker.runtime.report_metrics, dict(step_metrics))
            )
    worker.reporter.wait()  # the last checkpoint is handed to Ray before the attempt ends
    if worker.runlog is not None:
        worker.runlog.write("end", global_step=last_step)
        worker.runtime.metrics.run_ended(cfg.run.name)


def check_task_at_start(worker: Worker) -> None:
    """``check-task``'s cheap checks on the real model and data before the first step: a
    ``batch`` that is not pure or totals that are means, not sums, would train to wrong metrics
    and break resume. A broken task stops the run (``stops.BrokenTask``), not retried."""
    failures = task_contract.batch_and_totals_failures(
        worker.task, unwrap(worker.model), worker.train
    )
    if failures:
        raise stops.BrokenTask(failures)


def step_completed(worker: Worker, global_step: int) -> None:
    """The state is now that of ``global_step``: what a save on failure may write."""
    worker.saves.state_step = global_step
    if worker.boundary is not None:
        worker.boundary.capture(global_step)


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
        batch = tasks.to_device(worker.task.batch(worker.train, chunk, batch_seed), worker.device)
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
    if cfg.grad_clip_norm is not None:
        worker.scaler.unscale_(worker.optimizer)
        norm = nn.utils.clip_grad_norm_(worker.model.parameters(), cfg.grad_clip_norm)
        if not worker.scaler.is_enabled():  # fp16: the scaler skips steps with inf gradients
            worker.interval.watch(global_step, norm)
    lr = worker.scheduler.get_last_lr()[0]
    worker.scaler.step(worker.optimizer)
    worker.scaler.update()
    worker.scheduler.step()
    worker.interval.steps += 1
    worker.interval.samples += cfg.global_batch_size
    return lr


def no_sync_unless(model: nn.Module, sync: bool):
    """DDP's no_sync on every micro-batch but the last: one gradient all-reduce per step."""
    if sync or not isinstance(model, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


def autocast(worker: Worker):
    precision = worker.cfg.training.precision
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(worker.device.type, dtype=dtype)


def global_batch_ids(worker: Worker, epoch: int, step_in_epoch: int) -> torch.Tensor:
    # Streaming (#15): a sharded task's layout makes the order shard-aware (None: a shuffle).
    layout = worker.task.shard_layout()
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


def reduce_totals(
    comm: Collectives,
    totals: dict[str, torch.Tensor],
    first_bad: torch.Tensor | None,
    flag: bool = False,
    extra: list[float] | None = None,
) -> tuple[dict[str, float], float, bool, list[float]]:
    """Sum the totals over all ranks, find the earliest non-finite step, whether any rank
    raised ``flag``, and sum ``extra`` (the same length on every rank) over the ranks: one
    all-gather of a small tensor (``collectives``), one host sync."""
    keys, extra = sorted(totals), extra or []
    bad = first_bad if first_bad is not None else torch.tensor(math.inf)
    # A task may count on the CPU while its loss lives on the GPU: the seam moves each to the
    # device the backend needs.
    head = torch.stack(
        [*(totals[k].detach().to(comm.device).double() for k in keys), bad.to(comm.device).double()]
    )
    tail = torch.tensor([float(flag), *extra], dtype=torch.float64, device=comm.device)
    gathered = comm.gather_rows(torch.cat([head, tail])).cpu()
    n = len(keys)
    sums = gathered[:, :n].sum(dim=0).tolist()
    first = float(gathered[:, n].min())
    extra_sums = gathered[:, n + 2 :].sum(dim=0).tolist()
    return dict(zip(keys, sums, strict=True)), first, bool(gathered[:, n + 1].max() > 0), extra_sums


def close_interval(worker: Worker, global_step: int, lr: float) -> tuple[dict[str, Any], bool]:
    """Metrics of the steps since the last log line, over all ranks, and whether the ranks
    agree that a node is being drained; raises NonFiniteLoss."""
    interval = worker.interval
    totals, first_bad, draining, consumed = reduce_totals(
        worker.comm,
        interval.totals,
        interval.first_bad_step,
        worker.runtime.drain_requested(),
        interval.consumed_row(),
    )
    if math.isfinite(first_bad):
        raise stops.NonFiniteLoss(int(first_bad))
    elapsed = time.perf_counter() - interval.started
    epoch, step_in_epoch = worker.plan.position(global_step)
    step_metrics = {
        "global_step": global_step,
        "epoch": epoch,
        "step_in_epoch": step_in_epoch + 1,
        **(worker.task.metrics(totals) if totals else {}),
        "lr": lr,
        "samples_per_s": interval.samples / elapsed if elapsed > 0 else 0.0,
        "world_size": worker.world_size,
    }
    if worker.runlog is not None:
        steps = sorted(interval.consumed)
        worker.runlog.write(  # what the ranks fed task.batch; `verify` checks it
            "consumed",
            steps=steps,
            counts=[int(c) for c in consumed[0::2]],
            digests=[int(d) for d in consumed[1::2]],
        )
        # An actor call under Ray: off this thread.
        worker.reporter.submit(
            functools.partial(
                worker.runtime.metrics.record,
                worker.cfg.run.name,
                dict(step_metrics),
                interval.steps,
                interval.samples,
            )
        )
    worker.interval = Interval()
    return step_metrics, draining


def record_step(
    worker: Worker, global_step: int, step_s: float, step_metrics: dict[str, Any]
) -> None:
    """The ledger: the step's position and world size, from which the sample ids its global
    batch held are recomputed (``runlog.consumed_ids``, with the start event's seed and data
    layout): a line of constant size, whatever the batch; on log steps also the interval's
    metrics."""
    epoch, step_in_epoch = worker.plan.position(global_step)
    worker.runlog.write(
        "step",
        global_step=global_step,
        epoch=epoch,
        step_in_epoch=step_in_epoch + 1,
        world_size=worker.world_size,
        step_s=round(step_s, 6),
        **{k: v for k, v in step_metrics.items() if k not in LEDGER_FIELDS},
    )
    if step_metrics:
        log_progress(worker, step_metrics)


LEDGER_FIELDS = (*events.POSITION, "world_size")  # written by record_step itself


def log_progress(worker: Worker, step_metrics: dict[str, Any]) -> None:
    shown = " ".join(
        f"{k} {v:.4g}" for k, v in step_metrics.items() if k not in events.NOT_TASK_METRICS
    )
    log.info(
        "step %d/%d epoch %d %s lr %.2e %.0f samples/s world %d, %s",
        step_metrics["global_step"],
        worker.plan.total_steps,
        step_metrics["epoch"],
        shown,
        step_metrics["lr"],
        step_metrics["samples_per_s"],
        worker.world_size,
        pace.describe(step_metrics["global_step"], worker.plan.total_steps),
    )


@torch.no_grad()
def evaluate(worker: Worker, global_step: int) -> dict[str, float]:
    """Held-out metrics on the first ``eval.batches`` global batches of val, each sharded over
    the ranks like a training batch; no augmentation, no RNG, so it cannot perturb training."""
    size = worker.cfg.training.global_batch_size
    count = min(len(worker.val), worker.cfg.eval.batches * size)
    model = unwrap(worker.model)
    model.eval()
    interval = Interval()
    for start in range(0, count, size):
        batch_ids = torch.arange(start, min(start + size, count))
        ids = data.rank_slice(batch_ids, worker.rank, worker.world_size)
        if len(ids) == 0:
            continue
        batch = tasks.to_device(worker.task.batch(worker.val, ids, None), worker.device)
        with autocast(worker):
            interval.add(worker.task.step(model, batch).totals)
    totals, *_ = reduce_totals(worker.comm, interval.totals, None)
    if not totals:
        return {}
    reported = {f"val_{k}": v for k, v in worker.task.metrics(totals).items()}
    if worker.runlog is not None:
        worker.runlog.write("eval", global_step=global_step, **reported)
    return reported


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
    while not worker.saves.wait_until_free(timeout=60):
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


def inject_faults(worker: Worker, global_step: int, during: str) -> None:
    chaos.maybe_inject(
        worker.cfg.chaos.faults, worker.fs, worker.run_dir, worker.rank, global_step, during
    )


def install_fault_hooks(worker: Worker) -> None:
    """Faults inside the forward and the backward pass of a step (``chaos``): hooks on this
    rank's model, only when such a fault is configured for it (nothing per step otherwise).
    ``forward`` fires after the model's forward ran (its buffers moved); ``backward`` once the
    first parameter's gradient is accumulated, which autograd reaches last, so DDP has
    all-reduced the other buckets by then."""
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


def make_deterministic(device: torch.device) -> None:
    """``training.deterministic``: deterministic kernels only. cuBLAS needs a fixed workspace
    for that (else torch raises at the first matmul on CUDA); it is read when cuBLAS starts, so
    set it before the first CUDA matmul, unless the user chose a setting."""
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DDP (checkpoints never store the ``module.`` prefix)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
