"""Start a measured process, timestamp every line it prints, and SIGKILL its workers on a schedule.

Kills are aimed at world rank 1 of the run in progress: for Ray the PID comes from the run
log's newest ``group_started`` event (Ray Train's controller writes it), for torchrun from
``<run dir>/pids/rank1``. Only descendants of the process started here are ever signalled.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

BEGIN = re.compile(r"^BENCH-RUN begin (\S+) ([\d.]+)")
END = re.compile(r"^BENCH-RUN end (\S+) ([\d.]+) (\S+)")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
RAY_FILES = "ray-"  # the run log's files from Ray Train's controller (ray_internals/group_events)


@dataclass
class KillPlan:
    """Kills due at fixed times: slot k at ``first_after_s + k * every_s`` after the run's first
    step, so recovery time does not stretch the schedule. A slot that falls while the run is
    still recovering from the previous kill is skipped (its worker is already down; killing the
    next attempt at its first step would only stop all progress): such a run reports fewer
    kills fired than due."""

    first_after_s: float  # after the run's first step
    every_s: float | None = None  # None: kill once

    def slot_time(self, first_step: float, slot: int) -> float:
        return first_step + self.first_after_s + slot * (self.every_s or 0.0)

    def next_slot(self, first_step: float, training_since: float, after: int) -> int | None:
        """The first slot after slot ``after`` (-1: none yet) that is due once the current
        attempt trains; None when the plan has no more kills."""
        if self.every_s is None:
            return 0 if after < 0 else None
        waited = training_since - first_step - self.first_after_s
        return max(after + 1, math.ceil(waited / self.every_s))

    def expected(self, first_step: float | None, end: float | None) -> int:
        """Slots the schedule holds between the first step and the end of the run."""
        if first_step is None or end is None or end - first_step < self.first_after_s:
            return 0
        if self.every_s is None:
            return 1
        return 1 + int((end - first_step - self.first_after_s) // self.every_s)


@dataclass
class Watch:
    """One run inside a launched process: where its run log is and when to kill its workers."""

    name: str
    run_dir: Path
    kind: str  # "ray" or "torchrun"
    kill: KillPlan | None = None
    begin: float | None = None
    end: float | None = None
    status: str | None = None
    first_step: float | None = None
    kills: list[dict] = field(default_factory=list)
    _killed_attempt: str | None = None
    _training_attempt: str | None = None  # the attempt seen training last, and since when
    _training_since: float = 0.0


class Launched:
    def __init__(self, cmd: list[str], env: dict[str, str], log_path: Path, cwd: Path):
        self.cmd = cmd
        self.lines: list[tuple[float, str]] = []
        self.log_path = log_path
        self.launched_at = time.time()
        self.proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,  # its own process group, ended as one on timeout
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        with self.log_path.open("w") as log:
            for raw in self.proc.stdout:
                now = time.time()
                text = ANSI.sub("", raw.rstrip("\n"))
                self.lines.append((now, text))
                log.write(f"{now:.3f} {text}\n")
                log.flush()

    def lines_after(self, since: float) -> list[tuple[float, str]]:
        return [(t, s) for t, s in list(self.lines) if t >= since]

    def stop(self) -> None:
        """End what was started here: the process group, then any descendant left over."""
        pids = descendants(self.proc.pid)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                continue
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def run(launched: Launched, watches: list[Watch], timeout_s: float, markers: bool = False) -> int:
    """Supervise until the process exits; returns its exit code (124 on timeout). With
    ``markers`` the process runs several watches one after another and prints when each
    begins and ends (``benchmarks.ray_session``); without, its one watch spans the process."""
    deadline = time.time() + timeout_s
    single = not markers
    if single:
        watches[0].begin = launched.launched_at
    while launched.proc.poll() is None:
        if time.time() > deadline:
            launched.stop()
            return 124
        _track_markers(launched, watches)
        current = next((w for w in watches if w.begin and w.end is None), None)
        if current is not None:
            _progress(launched, current)
        time.sleep(0.1)
    launched._reader.join(timeout=10)
    _track_markers(launched, watches)
    if single:
        watches[0].end = time.time()
        watches[0].status = "ok" if launched.proc.returncode == 0 else "failed"
    return launched.proc.returncode


def _track_markers(launched: Launched, watches: list[Watch]) -> None:
    by_name = {w.name: w for w in watches}
    for _, text in list(launched.lines):
        if match := BEGIN.match(text):
            watch = by_name.get(match.group(1))
            if watch and watch.begin is None:
                watch.begin = float(match.group(2))
        elif match := END.match(text):
            watch = by_name.get(match.group(1))
            if watch and watch.end is None:
                watch.end, watch.status = float(match.group(2)), match.group(3)


def _newest_attempt(run_dir: Path) -> tuple[str | None, dict | None]:
    """(attempt id, its last step event) of the attempt log written last. By modification
    time: Ray attempt ids are random, so the newest log is not the last by name (sorting by
    name made the harness wait, for minutes, for a "new" attempt after a kill)."""
    logs = [p for p in (run_dir / "runlog").glob("*.jsonl") if not p.name.startswith(RAY_FILES)]
    try:
        newest = max(logs, key=lambda p: p.stat().st_mtime_ns) if logs else None
        if newest is None:
            return None, None
        with newest.open("rb") as f:
            f.seek(max(0, newest.stat().st_size - 65536))
            tail = f.read().decode(errors="replace").splitlines()
    except OSError:
        return None, None
    for line in reversed(tail):
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == "step":
            return newest.stem, event
    return newest.stem, None


def _progress(launched: Launched, watch: Watch) -> None:
    attempt, last_step = _newest_attempt(watch.run_dir)
    if last_step is None:
        return
    now = time.time()
    if watch.first_step is None:
        watch.first_step = now
    if attempt != watch._training_attempt:
        watch._training_attempt, watch._training_since = attempt, now
    if watch.kill is None or attempt == watch._killed_attempt:
        return  # no kills, or the killed attempt has not been replaced by a training one
    after = watch.kills[-1]["slot"] if watch.kills else -1
    slot = watch.kill.next_slot(watch.first_step, watch._training_since, after)
    if slot is None or now < watch.kill.slot_time(watch.first_step, slot):
        return
    pid = _rank1_pid(watch)
    if pid is None or pid not in descendants(launched.proc.pid):
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    watch.kills.append(
        {
            "time": time.time(),
            "slot": slot,
            "due": watch.kill.slot_time(watch.first_step, slot),
            "pid": pid,
            "attempt": attempt,
            "last_step": last_step["global_step"],
        }
    )
    watch._killed_attempt = attempt


def _rank1_pid(watch: Watch) -> int | None:
    if watch.kind == "torchrun":
        try:
            return int((watch.run_dir / "pids" / "rank1").read_text())
        except (OSError, ValueError):
            return None
    groups = []
    for path in (watch.run_dir / "runlog").glob(f"{RAY_FILES}*-group_started.jsonl"):
        with contextlib.suppress(OSError, ValueError):
            groups.append(json.loads(path.read_text()))
    newest = max(groups, key=lambda g: g["time"], default=None)
    return newest["pids"][1] if newest and len(newest["pids"]) > 1 else None
