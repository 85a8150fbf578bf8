"""Storage briefly unavailable: the S3 server (a real SeaweedFS) is stopped for a few seconds in
the middle of a run and started again on the same data. The run either survives (Ray Train
restarts its workers from the newest valid checkpoint) or fails and is resumed by running the
same command again; either way the final ledger is exact and nothing is lost.

    .venv/bin/python -m pytest tests/integration/test_storage_outage.py -s
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from ray_runs import REPO, write_config
from test_s3_storage import KEY, SECRET, s3, weed_port

from training.core import checkpoint, runlog

OUTAGE_S = 6.0
RUN = "s3-outage"
RUN_DIR = f"training/runs/{RUN}"


class WeedServer:
    """`weed server -s3` that can be stopped and started again on the same data and ports."""

    def __init__(self, root: Path):
        self.root = root
        (root / "data").mkdir()
        credentials = [{"accessKey": KEY, "secretKey": SECRET}]
        actions = ["Admin", "Read", "Write", "List"]
        identity = {
            "identities": [{"name": "trainer", "credentials": credentials, "actions": actions}]
        }
        (root / "s3.json").write_text(json.dumps(identity))
        self.port, *others = (weed_port() for _ in range(4))
        names = ("master", "volume", "filer")
        self.ports = [f"-{n}.port={p}" for n, p in zip(names, others, strict=True)]
        self.endpoint = f"127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        weed = shutil.which("weed") or os.path.join(os.path.dirname(sys.executable), "weed")
        self.proc = subprocess.Popen(
            [
                weed,
                "server",
                f"-dir={self.root / 'data'}",
                "-s3",
                f"-s3.port={self.port}",
                f"-s3.config={self.root / 's3.json'}",
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                # Catalog listeners on fixed ports (8181, 9101) would collide with any other
                # SeaweedFS on the machine; this test needs plain S3 only.
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                *self.ports,
            ],
            stdout=(self.root / "weed.log").open("a"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 90
        while True:  # ready = a bucket can be made (and its objects listed)
            try:
                s3(self.endpoint).create_dir("training")
                s3(self.endpoint).get_file_info(pafs.FileSelector("training", recursive=False))
                return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    pytest.fail(f"S3 not ready: {(self.root / 'weed.log').read_text()[-2000:]}")
                time.sleep(0.5)

    def wait_readable(self, path: str) -> None:
        """After a restart S3 answers listings before it serves the objects written earlier
        (GetObject: INTERNAL_FAILURE): ready for a resumed run = ``path`` reads back."""
        deadline = time.monotonic() + 90
        while True:
            try:
                with s3(self.endpoint).open_input_file(path) as f:
                    f.read()
                return
            except OSError:
                if time.monotonic() > deadline:
                    log = (self.root / "weed.log").read_text()[-2000:]
                    pytest.fail(f"{path} still unreadable after a restart: {log}")
                time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=60)


@pytest.fixture
def weed(tmp_path_factory):
    server = WeedServer(tmp_path_factory.mktemp("s3-outage"))
    server.start()
    yield server
    server.stop()


def start_training(config: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "AWS_ACCESS_KEY_ID": KEY,
           "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_EC2_METADATA_DISABLED": "true"}  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "training", "train", "--config", str(config)]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip


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
        training={"epochs": 6},  # 342 steps
        checkpoint={"every_n_steps": 10, "num_to_keep": 2},
        failure={"max_failures": 10},
    )
    started = time.monotonic()
    driver = start_training(config)
    deadline = time.monotonic() + 300
    while newest_checkpoint_step(weed.endpoint) < 30:
        assert driver.poll() is None, driver.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint at step 30 within 300 s"
        time.sleep(0.5)
    before = newest_checkpoint_step(weed.endpoint)
    assert driver.poll() is None, f"the run ended before the outage: {driver.stdout.read()[-5000:]}"
    weed.stop()
    stopped = time.monotonic()
    time.sleep(OUTAGE_S)  # the outage itself: S3 stays down this long
    weed.start()
    weed.wait_readable("training/data/demo.parquet")
    print(f"S3 down {time.monotonic() - stopped:.1f}s at checkpoint step {before} "
          f"(t+{stopped - started:.1f}s)", flush=True)  # fmt: skip

    output, code = driver.communicate(timeout=600)[0], driver.returncode
    outcome = "survived" if code == 0 else f"failed (exit {code}), resumed by a second run"
    if code != 0:
        again = start_training(config)
        output += again.communicate(timeout=600)[0]
        assert again.returncode == 0, output[-4000:]
    report = runlog.check_ledger(runlog.read_events(s3(weed.endpoint), RUN_DIR))
    print(f"outcome: {outcome}; verify: {json.dumps(report.__dict__)}", flush=True)
    assert report.ok, (report.errors, output[-4000:])
    assert report.completed and report.final_step == 342, report
