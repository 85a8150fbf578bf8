"""Warm spare processes, so a worker-group restart starts in processes that are already imported.

After a failure Ray Train replaces the whole worker group. Measured on 2 CPU workers, ~6 of the
~8.5 s from the kill to the next step went to new actor processes (Python, Ray's core worker),
their imports (torch, Ray Train, this project) and the ``torch._dynamo`` import inside DDP's
constructor. ``torchrun`` pays the imports too, but starts its processes at once.

Ray places a new actor in an idle worker process that was started for the same job and runtime
environment and has run nothing yet. This module makes such processes exist before the failure:

- every train worker's runtime environment names :func:`preload` as the process setup hook, so
  a process imports the heavy modules as it starts, before any actor lands on it;
- once an attempt has taken its first step, the lowest local rank on each node asks its raylet to
  keep as many idle spares as the node runs train workers (Ray's ``PrestartWorkers``, with a
  keep-alive so Ray does not reap them as idle), and checks again every minute.

A spare imports at the lowest CPU priority (nice 19, in a thread of its own), so it takes only
the CPU training leaves idle; a failure that comes before it is done gets a partly warm process.
The spares cost memory (one interpreter with torch imported each, ~0.4 GB on CPU);
``failure.spare_workers: false`` turns them off. Anything that goes wrong here is logged and
training goes on, as it would without spares.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import threading
import time
from pathlib import Path

from training.ray_internals import priority

log = logging.getLogger(__name__)

# Imported by every train worker process as it starts (Ray's process setup hook).
PRELOAD = (
    "torch",
    "torch._dynamo",  # DDP's constructor imports it: ~1.8 s on the 2-core VM
    "ray.train.v2._internal.execution.worker_group.worker",  # Ray Train's worker actor
    "training.worker.attempt",
    "training.tasks",
)
HOOK = f"{__name__}.preload"
# Marks this job's spares among the node's processes (a spare serves one job only).
JOB_MARKER = "ELASTIC_TRAINER_SPARES_JOB"
KEEP_ALIVE_S = 3600  # Ray may reap an idle spare after this; the keeper then starts another
CHECK_EVERY_S = 60.0
FIRST_GROUP_KEEP_ALIVE_S = 120  # processes the driver starts before Ray Train's first group
# When this process finished its preload (None: it did not run): a spare's is before the failure.
preloaded_at: float | None = None


def preload() -> None:
    """Ray runs this as each train worker process starts, before any actor lands on it.

    A spare (a process started while this job's workers train on the node) imports at the
    lowest CPU priority, so it takes only what training leaves idle; the imports run in a
    thread of their own (Linux keeps a nice value per thread) that this one waits for, so the
    process's main thread, which later trains, keeps its priority."""
    global preloaded_at
    if _training_here(os.environ.get(JOB_MARKER, "")):
        importer = threading.Thread(
            target=_import_all, kwargs={"nice": priority.BACKGROUND_NICE}, name="spare-preload"
        )
        importer.start()
        importer.join()
    else:
        _import_all()
    preloaded_at = time.time()


def _import_all(nice: int = 0) -> None:
    if nice:
        priority.lower_this_thread(nice)
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception:  # a missing module only loses the warm start, never the worker
            log.warning("spare worker: could not preload %s", name, exc_info=True)


def _training_here(job_id: str, proc: Path = Path("/proc")) -> bool:
    """A train worker of ``job_id`` runs on this node (then this new process is a spare)."""
    return bool(job_id) and any(
        b"RayTrainWorker" in title for _, title in marked_processes(job_id, proc)
    )


def runtime_env(job_id: str) -> dict:
    """The train workers' runtime environment (RunConfig.worker_runtime_env)."""
    return {"env_vars": {_hook_variable(): HOOK, JOB_MARKER: job_id}}


def without_spares() -> dict:
    """Runtime env for helper actors a train worker starts (they inherit the worker's): no
    preload, no marker, so they neither import torch nor take a spare meant for a restart; and
    Ray's default CPU priority, below training's (training/ray_internals/priority.py)."""
    return {"env_vars": {_hook_variable(): "", JOB_MARKER: "", **priority.HELPER}}


def _hook_variable() -> str:
    # Ray's worker_process_setup_hook field is job-level only; the variable it sets (read by
    # every worker process as it starts) works for any actor's runtime env.
    from ray._private import ray_constants

    return ray_constants.WORKER_PROCESS_SETUP_HOOK_ENV_VAR


def spare_pids(job_id: str | None = None, proc: Path = Path("/proc")) -> list[int]:
    """Spare processes on this node (of ``job_id``, or of any job): started with the marker,
    not (yet) holding a train worker."""
    return [pid for pid, title in marked_processes(job_id, proc) if b"RayTrainWorker" not in title]


def marked_processes(
    job_id: str | None = None, proc: Path = Path("/proc")
) -> list[tuple[int, bytes]]:
    """(pid, command line) of this node's processes that carry the marker (of ``job_id``, or
    of any job): train workers and spares."""
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            title = (entry / "cmdline").read_bytes()
        except OSError:  # gone, or not ours to read
            continue
        marker = next((v for v in environ if v.startswith(f"{JOB_MARKER}=".encode())), b"")
        job = marker.partition(b"=")[2].decode()
        if job and job_id in (None, job):
            found.append((int(entry.name), title))
    return found


def process_started_at(proc: Path = Path("/proc"), pid: int | str = "self") -> float | None:
    """Wall-clock start of a process (Linux; this one by default), to tell a spare from a
    process started late."""
    try:
        ticks = int((proc / str(pid) / "stat").read_text().rpartition(")")[2].split()[19])
        boot = next(
            float(line.split()[1])
            for line in (proc / "stat").read_text().splitlines()
            if line.startswith("btime ")
        )
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def prestart(count: int) -> None:
    """Ask this node's raylet for ``count`` idle processes with this worker's runtime env."""
    import ray

    context = ray.get_runtime_context()
    # Ray reuses a process only for the same runtime env, compared by a hash of its serialized
    # text: use this actor's text as Ray holds it, not a re-serialisation (spacing differs).
    _prestart(_raylet_address(context.get_node_id()), count, context.get_runtime_env_string())


def _raylet_address(node_id: str) -> str:
    import ray

    return _address(next(n for n in ray.nodes() if n["NodeID"] == node_id))


def _address(node: dict) -> str:
    return f"{node['NodeManagerAddress']}:{node['NodeManagerPort']}"


def _prestart(address: str, count: int, env_text: str, keep_alive_s: int = KEEP_ALIVE_S) -> None:
    import ray
    from ray._private.grpc_utils import init_grpc_channel
    from ray._private.utils import get_runtime_env_info
    from ray.core.generated import common_pb2, node_manager_pb2, node_manager_pb2_grpc
    from ray.runtime_env import RuntimeEnv

    runtime_env_info = get_runtime_env_info(RuntimeEnv(**json.loads(env_text)), serialize=False)
    runtime_env_info.serialized_runtime_env = env_text
    request = node_manager_pb2.PrestartWorkersRequest(
        language=common_pb2.Language.PYTHON,
        job_id=bytes.fromhex(ray.get_runtime_context().get_job_id()),
        runtime_env_info=runtime_env_info,
        keep_alive_duration_secs=keep_alive_s,
        num_workers=count,
    )
    stub = node_manager_pb2_grpc.NodeManagerServiceStub(init_grpc_channel(address))
    stub.PrestartWorkers(request, timeout=10)


def train_worker_env_text(worker_env: dict) -> str:
    """The runtime env text Ray Train's workers will hold, computed in the driver.

    Ray Train starts its controller with its own env vars on top of the job's runtime env, and
    the workers with ``RunConfig.worker_runtime_env`` on top of the controller's. Ray merges
    ``env_vars`` (the child's value wins), takes any other field from the child, and holds the
    result as compact JSON with sorted keys. Compared by hand with a worker's
    ``get_runtime_env_string()``; a mismatch would leave the processes unused, which the spares
    integration test catches (the first group must run in processes older than the controller)."""
    import ray
    from ray._common.constants import RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR
    from ray.train.v2._internal.constants import (
        DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE,
        get_env_vars_to_propagate,
    )
    from ray.train.v2._internal.execution.worker_group.worker_group import WorkerGroup

    job = json.loads(ray.get_runtime_context().get_runtime_env_string() or "{}")
    controller_vars = get_env_vars_to_propagate()
    controller_vars.setdefault(
        RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR, DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE
    )
    merged = merge_runtime_envs(job, {"env_vars": controller_vars})
    merged = merge_runtime_envs(merged, WorkerGroup._get_worker_runtime_env(worker_env))
    return json.dumps(merged, sort_keys=True, separators=(",", ":"))


def merge_runtime_envs(parent: dict, child: dict) -> dict:
    merged = {**parent, **child}
    if "env_vars" in parent and "env_vars" in child:
        merged["env_vars"] = {**parent["env_vars"], **child["env_vars"]}
    return merged


def first_group_plan(nodes: list[dict], max_workers: int, resources: dict[str, float]) -> dict:
    """How many train workers each alive node can hold ({raylet address: count}), up to
    ``max_workers`` in all: where the first group's processes are started ahead of Ray Train."""
    plan: dict[str, int] = {}
    left = max_workers
    for node in nodes:
        if not node.get("Alive") or left <= 0:
            continue
        have = node.get("Resources", {})
        fits = min(int(have.get(k, 0) // v) for k, v in resources.items() if v > 0)
        if fits > 0:
            count = plan[_address(node)] = min(fits, left)
            left -= count
    return plan


def start_first_group(worker_env: dict, max_workers: int, resources: dict[str, float]) -> int:
    """Start the first worker group's processes now, from the driver, so they import torch and
    the project while Ray Train starts its controller (~5 s on 2 cores) and land its actors in
    them. Returns how many were asked for; any error is one warning and a normal start."""
    import ray

    try:
        env_text = train_worker_env_text(worker_env)
        plan = first_group_plan(ray.nodes(), max_workers, resources)
        for address, count in plan.items():
            # Unused ones (a placement that packs differently) go after a short keep-alive.
            _prestart(address, count, env_text, keep_alive_s=FIRST_GROUP_KEEP_ALIVE_S)
    except Exception:
        log.warning("Could not start the worker processes ahead; they start cold", exc_info=True)
        return 0
    return sum(plan.values())


class Keeper:
    """Keeps ``wanted`` idle spares on this node while the attempt runs (a daemon thread)."""

    def __init__(self, wanted: int) -> None:
        self.wanted = wanted
        self.job_id = os.environ.get(JOB_MARKER, "")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="spare-keeper", daemon=True)

    def start(self) -> None:
        if self.job_id:  # absent: the driver turned spares off
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def top_up(self) -> int:
        missing = self.wanted - len(spare_pids(self.job_id))
        if missing > 0:
            prestart(missing)
        return max(missing, 0)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                started = self.top_up()
                if started:
                    log.info("Started %d warm spare worker process(es) on this node", started)
            except Exception:
                log.warning("Could not keep warm spare workers; restarts start cold", exc_info=True)
                return
            self._stop.wait(CHECK_EVERY_S)
