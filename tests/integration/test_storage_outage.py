"""Storage briefly unavailable: the S3 server (a real SeaweedFS) crashes (SIGKILL) in the middle
of a run and is started again on the same data a few seconds later. The run either survives
(Ray Train restarts its workers from the newest valid checkpoint) or fails and is resumed by
running the same command again; either way the final ledger is exact and nothing is lost.

    .venv/bin/python -m pytest tests/integration/test_storage_outage.py -s
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from support.cli import finish, start_cli
from support.runs import write_config
from support.s3 import CREDENTIALS, S3Server, s3

from training.core import checkpoint, runlog

OUTAGE_S = 6.0
RUN = "s3-outage"
RUN_DIR = f"training/runs/{RUN}"


@pytest.fixture
def weed(tmp_path_factory):
    """Its own server (the session's stays up): this test stops and restarts it."""
    server = S3Server(tmp_path_factory.mktemp("s3-outage"))
    server.start()
    yield server
    server.stop()


def start_training(config: Path, log: Path) -> subprocess.Popen:
    return start_cli(config, log, address=None, env=CREDENTIALS)


def newest_checkpoint_step(endpoint: str) -> int:
    try:
        newest = checkpoint.newest_valid(s3(endpoint), RUN_DIR)
    except OSError:
        return 0
    return newest.step if newest else 0


def test_s3_outage_mid_run_loses_nothing(tmp_path, weed):
    storage = {"path": "s3://training/runs", "endpoint_override": weed.endpoint, "scheme": "http"}
    config = write_config(
        tmp_path / "outage.yaml",
        tmp_path,
        run={"name": RUN},
        storage=storage,
        data={"path": "s3://training/data/demo.parquet"},
        training={"epochs": 4},  # 228 steps: the outage starts after checkpoint 30
        checkpoint={"every_n_steps": 10, "num_to_keep": 2},
        failure={"max_failures": 10},
    )
    started = time.monotonic()
    log = tmp_path / "outage.log"
    driver = start_training(config, log)
    deadline = time.monotonic() + 300
    while newest_checkpoint_step(weed.endpoint) < 30:
        assert driver.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint at step 30 within 300 s"
        time.sleep(0.5)
    before = newest_checkpoint_step(weed.endpoint)
    assert driver.poll() is None, f"the run ended before the outage: {log.read_text()[-5000:]}"
    weed.stop()
    stopped = time.monotonic()
    time.sleep(OUTAGE_S)  # the outage itself: S3 stays down this long
    weed.start()
    weed.wait_readable("training/data/demo.parquet")
    print(f"S3 down {time.monotonic() - stopped:.1f}s at checkpoint step {before} "
          f"(t+{stopped - started:.1f}s)", flush=True)  # fmt: skip

    code = finish(driver, log, timeout=600)
    outcome = "survived" if code == 0 else f"failed (exit {code}), resumed by a second run"
    if code != 0:
        assert finish(start_training(config, log), log, timeout=600) == 0, log.read_text()[-4000:]
    output = log.read_text()
    report = runlog.check_ledger(runlog.read_events(s3(weed.endpoint), RUN_DIR))
    print(f"outcome: {outcome}; verify: {json.dumps(report.__dict__)}", flush=True)
    assert report.ok, (report.errors, output[-4000:])
    assert report.completed and report.final_step == 228, report
