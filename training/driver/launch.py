"""The driver: check the run, connect to Ray, build the TorchTrainer, run it, summarise.

Everything that can be wrong with the user's input (config, data path, a resumed run's
identity) is checked before Ray is started or joined.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import posixpath
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from training import tasks
from training.core import checkpoint, runlog, stops, storage
from training.core.config import Config, ConfigError, identity_diff
from training.driver import lease

RUN_CONFIG_FILE = runlog.RUN_CONFIG_FILE
# The data fingerprint the run started with (task.check()): part of the run's identity.
FINGERPRINT_FILE = "data_fingerprint.json"


class RunStopped(RuntimeError):
    """The run was stopped for good (a non-finite loss); the message says why and what to do."""


@dataclass(frozen=True)
class RunState:
    """What storage says about a run before it starts."""

    fs: pafs.FileSystem
    run_dir: str
    resume_from: checkpoint.CheckpointInfo | None
    existed: bool
    finished: bool = False

    def describe(self, name: str) -> str:
        if self.finished:
            return f"Run '{name}' already finished at step {self.resume_from.step}; nothing to do"
        if self.resume_from is not None:
            return (
                f"Resuming run '{name}' from step {self.resume_from.step} ({self.resume_from.path})"
            )
        if self.existed:
            return f"Restarting run '{name}' from step 0: it has no valid checkpoint yet"
        return f"Starting fresh run '{name}' at {storage.display(self.fs, self.run_dir)}"


def with_absolute_paths(cfg: Config) -> Config:
    """Local paths resolved against the driver's directory, as every worker must see them."""
    return cfg.model_copy(
        update={
            "data": cfg.data.model_copy(update={"path": storage.absolute(cfg.data.path)}),
            "storage": cfg.storage.model_copy(update={"path": storage.absolute(cfg.storage.path)}),
        }
    )


def prepare_run(cfg: Config) -> RunState:
    """Validate the run against its data and what storage holds, before Ray starts; record its
    config and data fingerprint on first start."""
    fingerprint = check_data(cfg)
    storage.check_reachable(cfg.storage.path, cfg.storage)
    fs, run_dir = storage.run_location(cfg.storage, cfg.run.name)
    with storage.named_errors(fs, cfg.storage.path):
        return _prepare_run_dir(cfg, fs, run_dir, fingerprint)


def _prepare_run_dir(
    cfg: Config, fs: pafs.FileSystem, run_dir: str, fingerprint: dict[str, Any]
) -> RunState:
    check_storage_root(fs, posixpath.dirname(run_dir), cfg.storage.path)
    stops.clear_for_resubmission(fs, run_dir)  # a broken task is checked again at step 1
    stopped = stops.read(fs, run_dir)
    if stopped:
        raise RunStopped(f"run '{cfg.run.name}' {stopped}")
    config_path = posixpath.join(run_dir, RUN_CONFIG_FILE)
    existed = storage.exists(fs, config_path)
    if existed:
        check_identity(cfg, fs, run_dir, fingerprint)
    else:
        storage.write_bytes(fs, config_path, cfg.model_dump_json(indent=1).encode())
    fingerprint_path = posixpath.join(run_dir, FINGERPRINT_FILE)
    if not storage.exists(fs, fingerprint_path):
        storage.write_bytes(fs, fingerprint_path, json.dumps(fingerprint, indent=1).encode())
    newest = checkpoint.newest_valid(fs, run_dir)
    return RunState(fs, run_dir, newest, existed, finished=_finished_at(fs, run_dir, newest))


def check_identity(
    cfg: Config, fs: pafs.FileSystem, run_dir: str, fingerprint: dict[str, Any]
) -> None:
    """Refuse to resume with a changed config or changed data: it would not reproduce the run."""
    saved = json.loads(storage.read_bytes(fs, posixpath.join(run_dir, RUN_CONFIG_FILE)))
    diffs = identity_diff(saved, cfg.model_dump())
    fingerprint_path = posixpath.join(run_dir, FINGERPRINT_FILE)
    if storage.exists(fs, fingerprint_path):
        old = json.loads(storage.read_bytes(fs, fingerprint_path))
        diffs += [f"data {d}" for d in identity_diff(old, fingerprint, tuple(old | fingerprint))]
    if diffs:
        raise ConfigError(
            f"run '{cfg.run.name}' already exists at {storage.display(fs, run_dir)} with a "
            f"different config or data; resuming it would not reproduce it ({'; '.join(diffs)}). "
            "Use a new run.name, or the original values and data."
        )


def check_storage_root(fs: pafs.FileSystem, root: str, written: str) -> None:
    info = fs.get_file_info(root)
    if info.type not in (pafs.FileType.NotFound, pafs.FileType.Directory):
        raise ConfigError(
            f"storage.path '{written}' exists but is not a directory; runs are stored in "
            "directories under it: choose a directory (or a path that does not exist yet)"
        )


def check_data(cfg: Config) -> dict[str, Any]:
    """Build the task, write its demo data if asked, and check the data from metadata: a bad
    column, type or size fails here (exit 2), not in the workers after retries."""
    storage.check_reachable(cfg.data.path, cfg.storage)
    source = tasks.data_source(cfg)
    try:
        with storage.named_errors(source.fs, cfg.data.path):
            task = tasks.build(cfg.task.name, cfg.task.options, source)
            ensure_data(cfg, task, source)
            fingerprint = task.check()
    except tasks.TaskError as exc:
        raise ConfigError(str(exc)) from None
    train = fingerprint.get("train_samples", 0)
    batch = cfg.training.global_batch_size
    if train < batch:
        raise ConfigError(
            f"data.path '{cfg.data.path}' has {train} training samples (after holding out "
            f"data.val_fraction {cfg.data.val_fraction}), fewer than one global batch "
            f"(training.global_batch_size {batch}); use more data or a smaller batch"
        )
    return fingerprint


def current_state(run: RunState) -> RunState:
    """The run's newest valid checkpoint and whether it finished, read again (after a wait for
    the lease, another driver may have moved it on)."""
    newest = checkpoint.newest_valid(run.fs, run.run_dir)
    finished = _finished_at(run.fs, run.run_dir, newest)
    return dataclasses.replace(run, resume_from=newest, finished=finished)


def _finished_at(fs: pafs.FileSystem, run_dir: str, newest: checkpoint.CheckpointInfo | None):
    """True when an attempt ended the run at the step of the newest valid checkpoint."""
    if newest is None:
        return False
    ends = [e for e in runlog.read_events(fs, run_dir) if e["event"] == "end"]
    return any(e["global_step"] == newest.step for e in ends)


def ensure_data(cfg: Config, task: tasks.Task, source: tasks.DataSource) -> None:
    if storage.exists(source.fs, source.path):
        return
    if not cfg.data.create_demo_if_missing:
        raise ConfigError(
            f"data.path: '{cfg.data.path}' does not exist; write the task's demo data with "
            "`python -m training demo-data --task NAME --out PATH` or set "
            "data.create_demo_if_missing: true"
        )
    print(f"Writing the {cfg.task.name} demo dataset to {cfg.data.path}", flush=True)
    task.write_demo()


# worker_resources: one GPU per worker when scaling.use_gpu.
GPUS_PER_WORKER = 1


def gpu_shortfall(cfg: Config, available: float, where: str) -> str | None:
    """Why ``available`` GPUs cannot run even the smallest allowed group; None if they can.
    Without this, Ray Train waits for GPUs that never come instead of failing."""
    needed = cfg.scaling.min_workers * GPUS_PER_WORKER
    if not cfg.scaling.use_gpu or available >= needed:
        return None
    return (
        f"scaling.use_gpu is true but {where} has {available:g} GPU(s); scaling.min_workers "
        f"({cfg.scaling.min_workers}) x {GPUS_PER_WORKER} GPU per worker needs {needed}: run "
        "where the GPUs are, lower scaling.min_workers, or set scaling.use_gpu: false"
    )


def check_local_gpus(cfg: Config) -> None:
    """An embedded local Ray gets this machine's GPUs: count them before anything starts."""
    if cfg.scaling.use_gpu and not os.environ.get("RAY_ADDRESS"):
        import torch

        shortfall = gpu_shortfall(cfg, torch.cuda.device_count(), "this machine (local Ray)")
        if shortfall:
            raise ConfigError(shortfall)


def connect_ray(cfg: Config) -> None:
    """Join the cluster under `ray job submit` or RAY_ADDRESS; otherwise start a local Ray
    (check_local_gpus has counted its GPUs already)."""
    import ray

    from training.ray_internals import console

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
        where = f"the Ray cluster at {os.environ['RAY_ADDRESS']}"
        shortfall = gpu_shortfall(cfg, ray.cluster_resources().get("GPU", 0), where)
        if shortfall:
            raise ConfigError(shortfall)
        return
    console.quiet_token_auth_notice()
    needed = cfg.scaling.max_workers * cfg.scaling.cpus_per_worker
    # A laptop with fewer cores than workers still runs the demo: CPUs here are a scheduling
    # unit, not a reservation of physical cores.
    # address="local": never join a cluster that `ray start` left running on this machine.
    ray.init(
        address="local",
        num_cpus=max(os.cpu_count() or 1, int(needed + 0.999)),
        include_dashboard=True,
        # Ray starts one idle worker per CPU for the first driver; nothing of a training run
        # can use them (every actor it starts has a runtime env of its own), and on a small
        # machine they take CPU from the start-up.
        _system_config={"prestart_worker_first_driver": False},
    )


def ray_train_environment(cfg: Config) -> dict[str, str]:
    """Ray Train's settings that only environment variables reach: it reads them when the
    trainer is built and passes them on to its controller and workers."""
    return {
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": str(cfg.failure.health_check_interval_s),
        "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": str(cfg.failure.group_start_timeout_s),
        # How soon Ray Train notices a node being drained (Ray's default: 5 s of a ~30 s window).
        "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "1",
    }


def build_trainer(cfg: Config, run: RunState, verbose: bool = False):
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from training.observability import failures
    from training.ray_internals.group_events import GroupEvents
    from training.ray_internals.shutdown_grace import WaitForFailureSave
    from training.worker.attempt import train_func

    scaling = cfg.scaling
    workers: int | tuple[int, int] = (
        scaling.min_workers
        if scaling.min_workers == scaling.max_workers
        else (scaling.min_workers, scaling.max_workers)
    )
    for name, value in ray_train_environment(cfg).items():
        os.environ.setdefault(name, value)  # a value the user exported wins
    return TorchTrainer(
        train_loop_per_worker=train_func,
        train_loop_config=cfg.model_dump(),
        # A peer that stops answering inside a collective becomes a failure within this time,
        # not after the 30-minute default.
        torch_config=TorchConfig(timeout_s=int(cfg.training.collective_timeout_s)),
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker=worker_resources(cfg),
            elastic_resize_monitor_interval_s=scaling.resize_check_interval_s,
        ),
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=posixpath.dirname(run.run_dir),
            storage_filesystem=run.fs,
            failure_config=FailureConfig(max_failures=cfg.failure.max_failures),
            # Ray deletes the checkpoints it registered beyond num_to_keep; checkpoint.prune
            # deletes what Ray does not know about (lost from its registry, partial uploads).
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
            # Rank 0's save on failure finishes before Ray kills the group (up to 4.5 s); a
            # failed attempt is one line on the console; each group's start and each failure
            # decision go into the run log (what the recovery timeline is measured from).
            callbacks=[
                *([WaitForFailureSave()] if cfg.checkpoint.on_failure else []),
                failures.FailureLines(),
                GroupEvents(run.fs, run.run_dir),
            ],
            # Ray Train logs each worker group's start and each failure as several tracebacks:
            # on the console only with --verbose, always in its log files.
            logging_config=LoggingConfig(
                log_level=failures.VERBOSE_LOG_LEVEL if verbose else failures.QUIET_LOG_LEVEL
            ),
            # Warm spare processes for restarts (training/ray_internals/spares.py).
            worker_runtime_env=worker_runtime_env(cfg),
        ),
    )


def worker_resources(cfg: Config) -> dict[str, float]:
    gpus = {"GPU": GPUS_PER_WORKER} if cfg.scaling.use_gpu else {}
    return {"CPU": cfg.scaling.cpus_per_worker, **gpus}


def worker_runtime_env(cfg: Config) -> dict:
    """The train workers' runtime env: normal CPU priority (training/ray_internals/priority.py),
    and the
    warm-process preload (training/ray_internals/spares.py) unless spares are off."""
    import ray

    from training.ray_internals import priority, spares

    env = {"env_vars": dict(priority.TRAINING)}
    if not cfg.failure.spare_workers:
        return env
    job_id = ray.get_runtime_context().get_job_id()
    return spares.merge_runtime_envs(env, spares.runtime_env(job_id))


def start_workers_ahead(cfg: Config) -> None:
    """The first group's processes start importing now, while Ray Train starts its controller
    (after build_trainer: the env vars Ray Train passes on must be set)."""
    from training.ray_internals import spares

    if not cfg.failure.spare_workers:
        return
    started = spares.start_first_group(
        worker_runtime_env(cfg), cfg.scaling.max_workers, worker_resources(cfg)
    )
    if started:
        print(f"Started {started} train worker process(es) ahead of Ray Train", flush=True)


def train(
    cfg: Config,
    on_connected: Callable[[], None] = lambda: None,
    wait_for_lease: bool = False,
    dead_jobs: tuple[str, ...] = (),
    verbose: bool = False,
) -> dict[str, Any]:
    """Run (or resume) training to the end; returns the run summary. ``verbose``: Ray Train's
    own logging (worker groups, tracebacks of failed attempts) on the console too.

    Raises lease.LeaseHeld when another driver trains the same run, unless ``wait_for_lease``:
    before Ray is touched, or, for the loser of two drivers starting within the lease's settle
    window, after it connected to Ray and before it started anything there."""
    cfg = with_absolute_paths(cfg)
    check_local_gpus(cfg)
    run = prepare_run(cfg)  # every check of the input first: a run that cannot start writes nothing
    # Ray starts during the lease's settle wait (it writes nothing to the run); a run that
    # storage already shows finished needs no Ray.
    start_ray = (lambda: None) if run.finished else (lambda: connect_ray(cfg))
    with contextlib.ExitStack() as held:
        # Taking the lease is a resumed run's first write: storage errors still name the store.
        with storage.named_errors(run.fs, cfg.storage.path):
            held.enter_context(
                lease.hold(
                    run.fs,
                    run.run_dir,
                    wait=wait_for_lease,
                    dead_jobs=dead_jobs,
                    while_settling=start_ray,
                )
            )  # one writer
            run = current_state(run)  # as storage says now that no other driver writes the run
        print(run.describe(cfg.run.name), flush=True)
        if run.finished:
            return run_summary(run.fs, run.run_dir)
        connect_ray(cfg)  # returns at once if it started while settling
        on_connected()
        try:
            trainer = build_trainer(cfg, run, verbose)
            start_workers_ahead(cfg)
            trainer.fit()
        except Exception:
            stopped = stop_marker_after_failure(cfg, run)
            if stopped:  # the workers' traceback says less than the marker
                raise RunStopped(f"run '{cfg.run.name}' {stopped}") from None
            raise
    return run_summary(run.fs, run.run_dir)


def stop_marker_after_failure(cfg: Config, run: RunState) -> str | None:
    """The run's stop marker, read after training failed. A store that is down (often the
    very cause of the failure) must not replace Ray's error with its own: one line, then None."""
    try:
        storage.check_reachable(cfg.storage.path, cfg.storage)  # fast, not the full back-off
        with storage.named_errors(run.fs, cfg.storage.path):
            return stops.read(run.fs, run.run_dir)
    except OSError as exc:
        print(f"warning: cannot read the run's stop marker: {exc}", file=sys.stderr, flush=True)
        return None


def storage_cause(cfg: Config, error: Exception) -> str | None:
    """One line naming a storage failure that Ray's error text carries (a worker's pyarrow
    error, several frames down a traceback), so the user reads it as an outage."""
    # pyarrow names the object: "... key 'runs/x/log' in bucket 'training' ..."
    where = re.search(r"(?:key '([^']*)' in )?bucket '([^']*)'", str(error))
    if where is None or isinstance(error, storage.StorageError):
        return None
    uri = f"s3://{where.group(2)}/{where.group(1) or ''}".rstrip("/")
    cause = storage.classify(OSError(str(error)), storage.resolve(uri, cfg.storage)[0], uri)
    if cause is None:
        return None
    kind = "a transient storage error (outage)" if cause.transient else "a storage error"
    return f"The cause was {kind}: {cause}"


def resume_hint(cfg: Config) -> str:
    """What to tell the user after a failed or interrupted run: to run the same command again
    only when storage holds a checkpoint to resume from; otherwise what to do."""
    name = cfg.run.name
    try:
        storage.check_reachable(cfg.storage.path, cfg.storage)
        fs, run_dir = storage.run_location(cfg.storage, name)
        with storage.named_errors(fs, cfg.storage.path):
            # Sizes against the manifest only: reading every checkpoint back is not worth a hint.
            kept = checkpoint.scan(fs, run_dir, full=False)
    except OSError as exc:
        return (
            f"Cannot look for a checkpoint to resume from: {str(exc).rstrip('.')}. When storage "
            "is back, run the same command again: it resumes from the newest valid checkpoint, "
            "if there is one."
        )
    newest = next((c for c in kept if c.valid), None)
    if newest is None:
        return (
            f"Nothing to resume: run '{name}' has no valid checkpoint. Fix the cause above, then "
            "run the same command again (it starts from step 0)."
        )
    return (
        f"Run the same command again to resume run '{name}' from its newest checkpoint "
        f"(step {newest.step})."
    )


def run_summary(fs: pafs.FileSystem, run_dir: str) -> dict[str, Any]:
    summary = runlog.summarize(runlog.read_events(fs, run_dir))
    kept = checkpoint.scan(fs, run_dir)
    summary["checkpoints"] = [{"step": c.step, "valid": c.valid, "path": c.path} for c in kept]
    summary["run_dir"] = storage.display(fs, run_dir)
    return summary
