"""One writer per run, through the real CLI and a real (embedded) Ray: a second `train` of a run
that is training is refused with exit 2 before it starts Ray; after the first driver is
SIGKILLed (with its whole Ray), running the same command again resumes at once."""

from __future__ import annotations

import os
import signal
import time

import pyarrow.fs as pafs
from support.cli import finish, start_cli, wait_for
from support.runs import newest_valid_step, run_dir, write_config

from training.core import runlog
from training.driver import lease

NAME = "leased"


def test_second_writer_refused_and_resume_after_sigkilled_driver(tmp_path):
    # The first driver holds at step 50 (after its step-40 checkpoint) until it is killed: on a
    # slow host the refused second driver can take longer than the whole run would. The stall
    # fires once per run, so the resumed third driver passes through (114 steps in all).
    stall = {"kind": "stall", "step": 50, "seconds": 900}
    config = write_config(tmp_path / "lease.yaml", tmp_path, run={"name": NAME},
                          checkpoint={"every_n_steps": 20}, chaos={"faults": [stall]})  # fmt: skip
    fs, directory = pafs.LocalFileSystem(), run_dir(tmp_path, NAME)
    # Its own session, so that the kill below takes the driver and its Ray, as a crash would.
    # address=None: each driver starts its own embedded Ray.
    first = start_cli(config, tmp_path / "first.log", address=None, start_new_session=True)
    wait_for(lambda: (newest_valid_step(tmp_path, NAME) or 0) >= 40, 240, "checkpoint 40", first)
    holder = lease.read(fs, directory)
    assert holder is not None and holder.pid == first.pid, holder

    started = time.monotonic()
    second = start_cli(config, tmp_path / "second.log", address=None)
    code = finish(second, tmp_path / "second.log", timeout=120)
    out = (tmp_path / "second.log").read_text()
    print(f"second train: exit {code} after {time.monotonic() - started:.1f}s: "
          f"{out.strip().splitlines()[-1]}")  # fmt: skip
    assert code == 2, out
    assert f"error: run '{NAME}' is already training (host " in out, out
    assert f" pid {first.pid}, since " in out, out
    assert "Ray" not in out and "Resuming" not in out, "refused only after starting something"

    assert first.poll() is None, "the first driver ended before it was killed"
    os.killpg(first.pid, signal.SIGKILL)  # the driver and its embedded Ray, no cleanup
    first.wait(timeout=30)
    assert lease.read(fs, directory).pid == first.pid  # the dead driver's lease is still there
    third = start_cli(config, tmp_path / "third.log", address=None)
    code = finish(third, tmp_path / "third.log", timeout=600)
    out = (tmp_path / "third.log").read_text()
    assert code == 0, out[-4000:]
    assert "Waiting for the run's lease" not in out, "a dead driver's lease blocked the resume"
    assert f"Resuming run '{NAME}' from step " in out, out[-4000:]
    report = runlog.check_ledger(runlog.read_events(fs, directory))
    assert report.ok and report.completed, report
    assert lease.read(fs, directory) is None  # released at the end
