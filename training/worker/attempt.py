"""An attempt: the per-worker loop that Ray Train runs on every worker (``train_func``).

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

Where the loop runs is its runtime's business (``training/worker/runtime.py``): Ray Train's workers
(``train_func``), or plain processes (``train_in_process``: one process, or ``torchrun``), and
every collective goes through ``training/worker/collectives.py``.
"""

from __future__ import annotations

import functools
import logging
import os
import time
import uuid
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from training import tasks
from training.core import checkpoint, data, save_protocol, stops
from training.core.checkpoint import Progress
from training.core.config import Config
from training.core.optim import build_optimizer, build_scheduler
from training.core.runlog import RunLog
from training.core.save_protocol import SaveProtocol
from training.ray_internals import drain, spares
from training.tasks import contract
from training.worker import sharded_checkpointer
from training.worker.boundary import StepBoundary
from training.worker.cadence import Due, Interval, close_interval, record_step
from training.worker.checkpointer import restore_extra, save_and_report, save_on_failure
from training.worker.collectives import Collectives
from training.worker.context import Plan, Worker, initial_model, inject_faults, unwrap
from training.worker.evaluation import evaluate
from training.worker.runtime import LocalRuntime, RayRuntime, Runtime
from training.worker.step import install_fault_hooks, step_completed, train_step, upcoming_ids

# Ray Train routes worker logging to the driver's console; print() would be shown twice.
log = logging.getLogger(__name__)


def train_func(config_dict: dict[str, Any]) -> None:
    """Entry point on every Ray Train worker."""
    attempt(config_dict, RayRuntime)


def train_in_process(
    config_dict: dict[str, Any], timeout_s: float = 600.0, init_method: str = "env://"
) -> None:
    """The same attempt without Ray: one process, or one of a ``torchrun`` job (see
    ``runtime.LocalRuntime``); ``timeout_s`` bounds a collective whose peer died."""
    try:
        attempt(
            config_dict,
            functools.partial(LocalRuntime, timeout_s=timeout_s, init_method=init_method),
        )
    finally:
        # The group's threads must end before the interpreter does: left to process exit,
        # gloo's teardown aborted a finished rank ("terminate called without an active
        # exception"), and crashed (SIGSEGV) one that raised.
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
        elif worker.cfg.training.parallelism == "fsdp":  # no save on failure: finish the last
            sharded_checkpointer.await_seal(worker)
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
    # fsdp: the initial values only if no checkpoint loads (sharded_checkpointer.resume).
    worker = build_worker(cfg, config_dict, runtime, initialise=False, saves=saves)

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
    cfg: Config,
    config_dict: dict[str, Any],
    runtime: Runtime,
    initialise: bool = True,
    **fields: Any,
) -> Worker:
    """The task and its data, the model as the runtime prepares it (on the device, in DDP when
    the world is larger than one), optimizer, LR schedule and grad scaler: what every step
    needs. The attempt, the torchrun baseline and the unit tests build theirs here.
    ``initialise=False`` leaves a sharded (fsdp) model's values unset, for a checkpoint to set."""
    task = tasks.build(cfg.task.name, cfg.task.options, tasks.data_source(cfg))
    loaded = tasks.load(task)
    plan = Plan.for_run(cfg, len(loaded.train))
    if cfg.training.parallelism == "fsdp":  # sharded over the ranks, FSDP2 (worker/sharded.py)
        model = sharded_checkpointer.build_model(cfg, task, loaded.info, runtime.device)
        if initialise:
            sharded_checkpointer.initialise(model, cfg, task, loaded.info)
    else:
        model = runtime.prepare_model(initial_model(cfg, task, loaded.info))
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
        train=loaded.train,
        val=loaded.val,
        info=loaded.info,
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
    every other rank reads it once. Sharded (fsdp): ``sharded_checkpointer.resume``."""
    if worker.cfg.training.parallelism == "fsdp":
        return sharded_checkpointer.resume(worker)
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
        layout=data.layout_record(worker.task.shard_layout(worker.train)),
        task=worker.cfg.task.name,
        pid=os.getpid(),  # rank 0's process: tells a failure of rank 0 from one of a peer
        threads=torch.get_num_threads(),  # torch's pool in each worker (match_threads_to_cpus)
        nice=os.getpriority(
            os.PRIO_PROCESS, 0
        ),  # the training thread's (training/ray_internals/priority.py)
        # Before the failure: the attempt runs in a warm spare (training/ray_internals/spares.py).
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
    # budget and its bookkeeping (check-task still checks such a task). Not under fsdp either:
    # a forward on rank 0 alone would wait for its peers' shards forever.
    streamed = worker.task.shard_layout(worker.train) is not None
    sharded_model = worker.cfg.training.parallelism == "fsdp"
    if progress.global_step == 0 and worker.rank == 0 and not streamed and not sharded_model:
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
        due = Due.at(cfg, global_step, last_step)
        step_metrics: dict[str, Any] = {}
        draining = (
            False  # a node drain (ray_internals/drain.py): checkpoint now, then no more steps
        )
        if due.closes_interval:
            # Raises on a non-finite loss; the ranks agree on a drain in the same reduction.
            step_metrics, draining = close_interval(worker, global_step, lr)
        if worker.runlog is not None:
            record_step(worker, global_step, step_s, step_metrics)
            worker.saves.recorded_step = global_step  # the training thread's own fields
        if due.evaluate:
            step_metrics.update(evaluate(worker, global_step))
        if due.checkpoint or draining:
            save_checkpoint(worker, global_step, step_metrics)
            if draining and global_step < last_step:
                worker.reporter.wait()  # the drain checkpoint is Ray's before this rank stops
                drain.hold(global_step)
        elif due.report:  # Ray: a barrier, hence only every N steps, and off this thread
            worker.reporter.submit(
                functools.partial(worker.runtime.report_metrics, dict(step_metrics))
            )
    worker.reporter.wait()  # the last checkpoint is handed to Ray before the attempt ends
    if worker.runlog is not None:
        worker.runlog.write("end", global_step=last_step)
        worker.runtime.metrics.run_ended(cfg.run.name)


def save_checkpoint(worker: Worker, global_step: int, step_metrics: dict[str, Any]) -> None:
    if worker.cfg.training.parallelism == "fsdp":  # every rank writes its shards
        sharded_checkpointer.save_and_report(worker, global_step, step_metrics)
    else:  # rank 0 stages the whole state
        save_and_report(worker, global_step, step_metrics)


def check_task_at_start(worker: Worker) -> None:
    """``check-task``'s cheap checks on the real model and data before the first step: a
    ``batch`` that is not pure or totals that are means, not sums, would train to wrong metrics
    and break resume. A broken task stops the run (``stops.BrokenTask``), not retried."""
    failures = contract.batch_and_totals_failures(worker.task, unwrap(worker.model), worker.train)
    if failures:
        raise stops.BrokenTask(failures)


def make_deterministic(device: torch.device) -> None:
    """``training.deterministic``: deterministic kernels only. cuBLAS needs a fixed workspace
    for that (else torch raises at the first matmul on CUDA); it is read when cuBLAS starts, so
    set it before the first CUDA matmul, unless the user chose a setting."""
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
