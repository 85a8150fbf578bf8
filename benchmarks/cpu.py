"""Where the machine's CPU went while a run trained: read from /proc (Linux), per group.

The overhead rows compare two launchers on the same cores. What the training processes get
depends on what else runs beside them: Ray's own processes (GCS, raylet, dashboard, Ray Train's
controller and helper actors), the warm spares while they import, and whatever else the machine
runs. A `Sampler` reads every process's CPU time once a second while a run goes on; `shares`
turns two samples into cores used per group over the steady window the rates are taken from.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

GROUPS = ("training", "spares", "rest of the run", "outside the run")
# A process's command line marks what it is: a Ray Train worker or one of torchrun's.
TRAINING_MARKS = (b"ray::RayTrainWorker", b"torchrun_baseline.py")
SPARE_MARK = b"ray::IDLE"  # an idle Ray worker process: a warm spare (or a leftover)


@dataclass(frozen=True)
class Proc:
    parent: int
    cmdline: bytes
    cpu_s: float  # user + system time so far


def read_procs(proc: Path = Path("/proc")) -> dict[int, Proc]:
    ticks = os.sysconf("SC_CLK_TCK")
    found = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:  # exited while we read
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # the name may hold spaces and ")"
        cpu_s = (int(fields[11]) + int(fields[12])) / ticks
        found[int(entry.name)] = Proc(int(fields[1]), cmdline, cpu_s)
    return found


def group_of(pid: int, procs: dict[int, Proc], run_root: int) -> str:
    """Which group a process belongs to: the run's training processes, its spares, the rest of
    the run's process tree (under ``run_root``, the launched command), or outside the run."""
    cmdline = procs[pid].cmdline
    if pid != run_root and any(mark in cmdline for mark in TRAINING_MARKS):  # not torchrun's agent
        return "training"
    ancestor, seen = pid, set()
    while ancestor in procs and ancestor not in seen:
        if ancestor == run_root:
            return "spares" if SPARE_MARK in cmdline else "rest of the run"
        seen.add(ancestor)
        ancestor = procs[ancestor].parent
    return "outside the run"


def shares(
    before: dict[int, Proc], after: dict[int, Proc], seconds: float, run_root: int
) -> dict[str, float]:
    """Cores each group used between two samples (a process that started in between counts
    from zero; one that ended in between is not seen)."""
    used = dict.fromkeys(GROUPS, 0.0)
    for pid, now in after.items():
        earlier = before.get(pid)
        start = earlier.cpu_s if earlier and earlier.cpu_s <= now.cpu_s else 0.0  # else reused
        used[group_of(pid, after, run_root)] += max(0.0, now.cpu_s - start)
    return {group: cpu_s / seconds for group, cpu_s in used.items()}


class Sampler:
    """Samples every process's CPU time every ``every_s`` in a thread, while in a ``with``."""

    def __init__(self, every_s: float = 1.0) -> None:
        self.every_s = every_s
        self.samples: list[tuple[float, dict[int, Proc]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    def __enter__(self) -> Sampler:
        if Path("/proc/self/stat").exists():  # Linux; elsewhere no samples, no figure
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), read_procs()))
            self._stop.wait(self.every_s)

    def window(self, t0: float, t1: float, run_root: int) -> dict[str, float] | None:
        """Cores used per group between the first sample at or after ``t0`` and the last at or
        before ``t1``; None when fewer than two samples fall inside."""
        inside = [s for s in self.samples if t0 <= s[0] <= t1]
        if len(inside) < 2:
            return None
        (start, before), (end, after) = inside[0], inside[-1]
        return shares(before, after, end - start, run_root)
