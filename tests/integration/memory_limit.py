"""A memory limit the kernel enforces on a running process: memory cgroups (v1 or v2) created
under the test's own cgroup; a training worker moves itself into one when its task starts
loading data (``limited_tasks.py``).

A process moved into a cgroup keeps its earlier memory charged where it was (v1 without
``move_charge_at_immigrate``, always on v2), so the limit bounds what the worker allocates
*after* the move: its data, model and optimizer, not the Python, torch and Ray it had already
imported. Going over it makes the kernel reclaim page cache and then OOM-kill the worker.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


class MemoryCgroup:
    """A memory cgroup directory; ``limit_bytes`` None: no limit (a parent for others)."""

    def __init__(self, path: Path, limit_bytes: int | None = None, version: int | None = None):
        self.version = version or own_memory_cgroup()[0]
        self.path = path
        self.path.mkdir(exist_ok=True)
        if limit_bytes is not None:
            name = "memory.limit_in_bytes" if self.version == 1 else "memory.max"
            (self.path / name).write_text(str(limit_bytes))

    @classmethod
    def under_own(cls) -> MemoryCgroup:
        """A new cgroup below this process's own memory cgroup."""
        version, parent = own_memory_cgroup()
        return cls(parent / f"elastic-trainer-test-{uuid.uuid4().hex[:8]}", version=version)

    def children(self) -> list[MemoryCgroup]:
        return [
            MemoryCgroup(p, version=self.version) for p in sorted(self.path.iterdir()) if p.is_dir()
        ]

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def pids(self) -> list[int]:
        return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]

    def peak_bytes(self) -> int:
        """Most memory charged to the cgroup at once (page cache included)."""
        name = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
        return int((self.path / name).read_text())

    def oom_kills(self) -> int:
        name = "memory.oom_control" if self.version == 1 else "memory.events"
        for line in (self.path / name).read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def remove(self) -> None:
        """Delete the cgroup (and its children) once their processes are gone; any left go
        back to the parent first."""
        for child in self.children():
            child.remove()
        for pid in self.pids():
            with contextlib.suppress(OSError):  # exited meanwhile
                (self.path.parent / "cgroup.procs").write_text(str(pid))
        self.path.rmdir()


def join_new_cgroup(parent: Path, limit_bytes: int) -> MemoryCgroup:
    """Move this process into a new cgroup under ``parent`` limited to ``limit_bytes``."""
    cgroup = MemoryCgroup(parent / f"worker-{os.getpid()}", limit_bytes)
    cgroup.add(os.getpid())
    return cgroup


def own_memory_cgroup() -> tuple[int, Path]:
    """(cgroup version, directory) of this process's memory cgroup."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return 1, CGROUP_ROOT / "memory" / path.lstrip("/")
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            base = CGROUP_ROOT / "unified" if (CGROUP_ROOT / "unified").is_dir() else CGROUP_ROOT
            return 2, base / line[3:].lstrip("/")
    raise RuntimeError("no memory cgroup found in /proc/self/cgroup")
