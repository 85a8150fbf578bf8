"""benchmarks/cpu.py: where the CPU went while a run trained, from a /proc-like tree."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from benchmarks import cpu

TICKS = os.sysconf("SC_CLK_TCK")


def write_proc(root: Path, pid: int, parent: int, cmdline: str, cpu_s: float) -> None:
    entry = root / str(pid)
    entry.mkdir(parents=True, exist_ok=True)
    ticks = int(cpu_s * TICKS)
    # state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime ...
    rest = ["S", str(parent), *["0"] * 9, str(ticks), "0", *["0"] * 8]
    (entry / "stat").write_text(f"{pid} (a name) with) {' '.join(rest)}\n")
    (entry / "cmdline").write_bytes(cmdline.replace(" ", "\0").encode())


def machine(root: Path, seconds_in: float) -> None:
    """A Ray run (CLI 100 -> raylet 102 -> a worker and a spare) beside another process."""
    write_proc(root, 1, 0, "/sbin/init", 1.0)
    write_proc(root, 100, 1, "python -m training train", 5.0 + 0.1 * seconds_in)
    write_proc(root, 102, 100, "raylet", 2.0 + 0.2 * seconds_in)
    write_proc(root, 103, 102, "ray::RayTrainWorker", 10.0 + 0.9 * seconds_in)
    write_proc(root, 104, 102, "ray::IDLE", 3.0 + 0.3 * seconds_in)
    write_proc(root, 200, 1, "stress --cpu 1", 50.0 + 0.5 * seconds_in)
    (root / "self").mkdir(exist_ok=True)  # not a pid: skipped


def test_cores_used_per_group_over_a_window(tmp_path):
    machine(tmp_path / "a", 0.0)
    machine(tmp_path / "b", 10.0)
    before, after = cpu.read_procs(tmp_path / "a"), cpu.read_procs(tmp_path / "b")
    used = cpu.shares(before, after, 10.0, run_root=100)
    expected = {"training": 0.9, "spares": 0.3, "rest of the run": 0.3, "outside the run": 0.5}
    assert used == pytest.approx(expected)


def test_torchruns_agent_is_not_counted_as_training():
    procs = {
        50: cpu.Proc(1, b"python -m torch.distributed.run benchmarks/torchrun_baseline.py", 1.0),
        51: cpu.Proc(50, b"python -u benchmarks/torchrun_baseline.py --config x", 1.0),
    }
    assert cpu.group_of(50, procs, run_root=50) == "rest of the run"
    assert cpu.group_of(51, procs, run_root=50) == "training"


def test_a_process_started_inside_the_window_counts_from_zero():
    before = {7: cpu.Proc(1, b"old", 40.0)}
    after = {7: cpu.Proc(1, b"reused pid", 2.0), 8: cpu.Proc(1, b"new", 1.0)}
    assert cpu.shares(before, after, 1.0, run_root=99)["outside the run"] == 3.0


def test_a_window_with_fewer_than_two_samples_has_no_figure():
    sampler = cpu.Sampler()
    sampler.samples = [(10.0, {}), (20.0, {})]
    assert sampler.window(11.0, 30.0, run_root=1) is None
    assert sampler.window(10.0, 20.0, run_root=1) == dict.fromkeys(cpu.GROUPS, 0.0)
