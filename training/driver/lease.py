"""One writer per run: a lease file with a heartbeat, next to the run's checkpoints.

    with lease.hold(fs, run_dir, wait=False):   # raises LeaseHeld if another driver trains it
        ...train...

`<run dir>/lease.json` names its holder (host, pid, Ray job, since when) and is rewritten every
`ttl/6` seconds; a lease whose heartbeat is older than `ttl` belongs to a dead driver and is
taken over, so a crash never blocks the resume. A driver that dies on this very machine (same
kernel boot, same PID namespace) is noticed at once from /proc, without waiting for the TTL.

Object stores have no atomic create-if-absent, so acquiring is: read (absent or stale), write our
record with a random token, wait `settle_s`, read back. Of two drivers racing, the one whose
write landed last reads its own token and wins; the other reads a foreign token and backs off.
That holds while a competitor's read -> write gap is shorter than `settle_s` (a few ms of work
against a 1 s settle). The heartbeat reads before it writes: a driver that finds another token
there has lost the lease (its storage was unreachable for a whole TTL) and stops training.
"""

from __future__ import annotations

import _thread
import contextlib
import json
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import pyarrow.fs as pafs

from training.core import storage

LEASE_FILE = "lease.json"
# Seconds without a heartbeat after which a lease is free; overridable for tests and for
# storage with long hiccups (an S3 outage longer than this lets a second writer in).
TTL_ENV = "ELASTIC_TRAINER_LEASE_TTL_S"
DEFAULT_TTL_S = 30.0
SETTLE_S = 1.0

log = logging.getLogger(__name__)


class LeaseHeld(Exception):
    """Another live driver holds the run's lease."""


@dataclass(frozen=True)
class Holder:
    token: str
    host: str
    pid: int
    job: str | None  # the Ray job submission id, when started by `ray job submit`
    since: float
    heartbeat: float
    boot_id: str
    pid_ns: str
    proc_start: str

    def describe(self, now: float) -> str:
        job = f", job {self.job}" if self.job else ""
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.since))
        return (
            f"host {self.host} pid {self.pid}{job}, since {started}, "
            f"last heartbeat {now - self.heartbeat:.0f}s ago"
        )


def ttl_s() -> float:
    return float(os.environ.get(TTL_ENV, DEFAULT_TTL_S))


def me(token: str, since: float) -> Holder:
    return Holder(
        token=token,
        host=socket.gethostname(),
        pid=os.getpid(),
        job=_ray_job_submission_id(),
        since=since,
        heartbeat=time.time(),
        boot_id=_read("/proc/sys/kernel/random/boot_id"),
        pid_ns=_pid_namespace(),
        proc_start=_proc_start(os.getpid()),
    )


def read(fs: pafs.FileSystem, run_dir: str) -> Holder | None:
    """The recorded holder, or None when there is none (or the record is unreadable)."""
    path = posixpath.join(run_dir, LEASE_FILE)
    try:
        return Holder(**json.loads(storage.read_bytes(fs, path)))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as exc:  # a foreign or truncated file: treat as free
        log.warning("ignoring unreadable lease file %s: %s", path, exc)
        return None


def is_alive(holder: Holder, now: float, ttl: float, dead_jobs: tuple[str, ...] = ()) -> bool:
    """Fresh heartbeat, unless the holder provably died: on this machine, or as a Ray job that
    the caller knows has ended (the supervisor after a head loss)."""
    if now - holder.heartbeat >= ttl or (holder.job is not None and holder.job in dead_jobs):
        return False
    same_namespace = holder.boot_id == _read("/proc/sys/kernel/random/boot_id") and (
        holder.pid_ns == _pid_namespace()
    )
    if same_namespace and holder.boot_id:
        return _proc_start(holder.pid) == holder.proc_start
    return True


class Lease:
    """A held lease and its heartbeat thread."""

    def __init__(self, fs: pafs.FileSystem, run_dir: str, holder: Holder, ttl: float):
        self.fs, self.holder, self.ttl = fs, holder, ttl
        self.path = posixpath.join(run_dir, LEASE_FILE)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 6):
            try:
                current = read(self.fs, posixpath.dirname(self.path))
                if current is not None and current.token != self.holder.token:
                    log.error(
                        "lease of %s lost to %s: stopping this driver",
                        self.path,
                        current.describe(time.time()),
                    )
                    _thread.interrupt_main()  # the second writer wins; we must stop writing
                    return
                self._write()
            except OSError as exc:  # storage briefly unavailable: keep training, retry
                log.warning("lease heartbeat failed (will retry): %s", exc)

    def _write(self) -> None:
        beat = Holder(**{**asdict(self.holder), "heartbeat": time.time()})
        storage.write_bytes(self.fs, self.path, json.dumps(asdict(beat)).encode())

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        _delete_if_ours(self.fs, self.path, self.holder.token)


def _delete_if_ours(fs: pafs.FileSystem, path: str, token: str) -> None:
    with contextlib.suppress(OSError):
        current = read(fs, posixpath.dirname(path))
        if current is not None and current.token == token:
            fs.delete_file(path)


def try_acquire(
    fs: pafs.FileSystem,
    run_dir: str,
    ttl: float,
    settle_s: float,
    dead_jobs: tuple[str, ...] = (),
    while_settling: Callable[[], None] = lambda: None,
) -> Lease:
    """Take the lease or raise LeaseHeld naming the live holder. ``while_settling`` runs during
    the settle wait (work that writes nothing to the run, such as starting Ray), which then
    only sleeps for what is left of ``settle_s``."""
    current = read(fs, run_dir)
    if current is not None and is_alive(current, time.time(), ttl, dead_jobs):
        raise LeaseHeld(current.describe(time.time()))
    holder = me(uuid.uuid4().hex, since=time.time())
    path = posixpath.join(run_dir, LEASE_FILE)
    storage.write_bytes(fs, path, json.dumps(asdict(holder)).encode())
    settle_until = time.monotonic() + settle_s
    try:
        while_settling()
    except BaseException:
        _delete_if_ours(fs, path, holder.token)  # a failed start leaves no lease to wait for
        raise
    # A racing writer's record lands within this window (see above).
    time.sleep(max(0.0, settle_until - time.monotonic()))
    winner = read(fs, run_dir)
    if winner is None or winner.token != holder.token:
        raise LeaseHeld(winner.describe(time.time()) if winner else "a racing driver")
    return Lease(fs, run_dir, holder, ttl)


@contextlib.contextmanager
def hold(
    fs: pafs.FileSystem,
    run_dir: str,
    wait: bool,
    settle_s: float = SETTLE_S,
    dead_jobs: tuple[str, ...] = (),
    while_settling: Callable[[], None] = lambda: None,
) -> Iterator[Lease]:
    """Hold the run's lease for the block; wait for it (polling) or raise LeaseHeld.
    A lease held by one of ``dead_jobs`` (Ray submission ids known to have ended) is free."""
    ttl = ttl_s()
    while True:
        try:
            lease = try_acquire(fs, run_dir, ttl, settle_s, dead_jobs, while_settling)
            break
        except LeaseHeld as held:
            if not wait:
                raise
            log.warning("waiting for the lease of %s (held by %s)", run_dir, held)
            print(f"Waiting for the run's lease: held by {held}", flush=True)
            time.sleep(min(5.0, ttl / 3))  # poll: the holder's heartbeat or its expiry
    try:
        yield lease
    finally:
        lease.release()


def _ray_job_submission_id() -> str | None:
    """The submission id when running as a `ray job submit` entrypoint (Ray sets this JSON)."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None
    with contextlib.suppress(ValueError, AttributeError):
        return json.loads(raw).get("metadata", {}).get("job_submission_id")
    return None


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _proc_start(pid: int) -> str:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat):
    with the pid it identifies one process, even after the pid is reused."""
    stat = _read(f"/proc/{pid}/stat")
    return stat.rsplit(")", 1)[-1].split()[19] if stat else ""
