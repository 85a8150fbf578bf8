"""One writer per run, through the real CLI and a real (embedded) Ray: a second `train` of a run
that is training is refused with exit 2 before it starts Ray; after the first driver is
SIGKILLed (with its whole Ray), running the same command again resumes at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pyarrow.fs as pafs
from ray_runs import REPO, run_dir, write_config

from training.core import checkpoint, runlog
from training.driver import lease

NAME = "leased"


def train(config, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)  # each driver starts its own embedded Ray
    cmd = [sys.executable, "-m", "training", "train", "--config", str(config)]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)  # fmt: skip


def test_second_writer_refused_and_resume_after_sigkilled_driver(tmp_path):
    # The first driver holds at step 50 (after its step-40 checkpoint) until it is killed: on a
    # slow host the refused second driver can take longer than the whole run would. The stall
    # fires once per run, so the resumed third driver passes through.
    stall = {"kind": "stall", "step": 50, "seconds": 900}
    config = write_config(tmp_path / "lease.yaml", tmp_path, run={"name": NAME},
                          training={"epochs": 30}, checkpoint={"every_n_steps": 20},
                          chaos={"faults": [stall]})  # fmt: skip
    fs, directory = pafs.LocalFileSystem(), run_dir(tmp_path, NAME)
    # Its own session, so that the kill below takes the driver and its Ray, as a crash would.
    first = train(config, start_new_session=True)
    deadline = time.monotonic() + 240
    while (newest := checkpoint.newest_valid(fs, directory)) is None or newest.step < 40:
        assert first.poll() is None, first.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint at step 40 within 240 s"
        time.sleep(0.5)
    holder = lease.read(fs, directory)
    assert holder is not None and holder.pid == first.pid, holder

    started = time.monotonic()
    second = train(config)
    out = second.communicate(timeout=120)[0]
    print(f"second train: exit {second.returncode} after {time.monotonic() - started:.1f}s: "
          f"{out.strip().splitlines()[-1]}")  # fmt: skip
    assert second.returncode == 2, out
    assert f"error: run '{NAME}' is already training (host " in out, out
    assert f" pid {first.pid}, since " in out, out
    assert "Ray" not in out and "Resuming" not in out, "refused only after starting something"

    assert first.poll() is None, "the first driver ended before it was killed"
    os.killpg(first.pid, signal.SIGKILL)  # the driver and its embedded Ray, no cleanup
    first.wait(timeout=30)
    assert lease.read(fs, directory).pid == first.pid  # the dead driver's lease is still there
    third = train(config)
    out = third.communicate(timeout=600)[0]
    assert third.returncode == 0, out[-4000:]
    assert "Waiting for the run's lease" not in out, "a dead driver's lease blocked the resume"
    assert f"Resuming run '{NAME}' from step " in out, out[-4000:]
    report = runlog.check_ledger(runlog.read_events(fs, directory))
    assert report.ok and report.completed, report
    assert lease.read(fs, directory) is None  # released at the end
