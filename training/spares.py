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

import contextlib
import importlib
import logging
import os
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

# Imported by every train worker process as it starts (Ray's process setup hook).
PRELOAD = (
    "torch",
    "torch._dynamo",  # DDP's constructor imports it: ~1.8 s on the 2-core VM
    "ray.train.v2._internal.execution.worker_group.worker",  # Ray Train's worker actor
    "training.loop",
    "training.tasks",
)
HOOK = f"{__name__}.preload"
# Marks this job's spares among the node's processes (a spare serves one job only).
JOB_MARKER = "ELASTIC_TRAINER_SPARES_JOB"
KEEP_ALIVE_S = 3600  # Ray may reap an idle spare after this; the keeper then starts another
CHECK_EVERY_S = 60.0
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
        importer = threading.Thread(target=_import_all, kwargs={"nice": 19}, name="spare-preload")
        importer.start()
        importer.join()
    else:
        _import_all()
    preloaded_at = time.time()


def _import_all(nice: int = 0) -> None:
    if nice:
        with contextlib.suppress(OSError):  # not allowed here: import at normal priority
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
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
    preload, no marker, so they neither import torch nor take a spare meant for a restart."""
    return {"env_vars": {_hook_variable(): "", JOB_MARKER: ""}}


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


def process_started_at(proc: Path = Path("/proc")) -> float | None:
    """Wall-clock start of this process (Linux), to tell a spare from a process started late."""
    try:
        ticks = int((proc / "self/stat").read_text().rpartition(")")[2].split()[19])
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
    from ray._private.grpc_utils import init_grpc_channel
    from ray._private.utils import get_runtime_env_info
    from ray.core.generated import common_pb2, node_manager_pb2, node_manager_pb2_grpc

    context = ray.get_runtime_context()
    node = next(n for n in ray.nodes() if n["NodeID"] == context.get_node_id())
    address = f"{node['NodeManagerAddress']}:{node['NodeManagerPort']}"
    # Ray reuses a process only for the same runtime env, compared by a hash of its serialized
    # text: use this actor's text as Ray holds it, not a re-serialisation (spacing differs).
    runtime_env_info = get_runtime_env_info(context.runtime_env, serialize=False)
    runtime_env_info.serialized_runtime_env = context.get_runtime_env_string()
    request = node_manager_pb2.PrestartWorkersRequest(
        language=common_pb2.Language.PYTHON,
        job_id=bytes.fromhex(context.get_job_id()),
        runtime_env_info=runtime_env_info,
        keep_alive_duration_secs=KEEP_ALIVE_S,
        num_workers=count,
    )
    stub = node_manager_pb2_grpc.NodeManagerServiceStub(init_grpc_channel(address))
    stub.PrestartWorkers(request, timeout=10)


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
