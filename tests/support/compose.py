"""The Compose cluster of cluster/compose.yaml driven from the host (its own project, token and
host ports, so it neither reads the user's cluster/.env nor collides with a running cluster),
the job API, and a run's progress read back with the CLI inside the head container. The e2e
tier shares one such cluster for the session (tests/e2e/conftest.py)."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from support.cli import wait_for
from support.ports import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO_ROOT / "cluster" / "compose.yaml"
CONFIG_IN_IMAGE = "/app/cluster/train.yaml"  # cluster/train.yaml, baked into the image
STORAGE = "/mnt/storage/runs"
# Small and quick on a 2-core machine: 4096 demo rows, global batch 48 -> 76 steps per epoch;
# a checkpoint (and a Ray report barrier, ~1.5 s) every 10 steps. After a worker is lost Ray
# Train first asks for the old group size again and gives it up only after the group start
# timeout (Ray's default 60 s; a worker killed -> training again took 88 s with it).
FAST_RUN = {
    "checkpoint.every_n_steps": 10,
    "training.report_every_n_steps": 10,
    "training.log_every_n_steps": 10,
    "scaling.resize_check_interval_s": 3,
    "failure.group_start_timeout_s": 20,
}

CLUSTER_UP_TIMEOUT_S = 240
JOB_TIMEOUT_S = 420
PROGRESS_TIMEOUT_S = 240


def train_command(config: str, name: str, **overrides: Any) -> str:
    """The job's entrypoint: `python -m training train` with FAST_RUN and `overrides`."""
    settings = {**FAST_RUN, **{k.replace("__", "."): v for k, v in overrides.items()}}
    sets = " ".join(f"--set {key}={value}" for key, value in settings.items())
    return f"python -m training train --config {config} --name {name} {sets}"


@dataclass
class ComposeCluster:
    """One Compose project of cluster/compose.yaml (plus ``overrides`` files layered over it and
    the ``monitoring`` profile when ``prometheus_port`` is set)."""

    project: str
    env_file: Path
    token: str
    dashboard_port: int
    prometheus_port: int = 0
    overrides: list[Path] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    timeline: list[str] = field(default_factory=list)

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def prometheus(self) -> str:
        return f"http://127.0.0.1:{self.prometheus_port}"

    def mark(self, event: str) -> None:
        line = f"t+{time.monotonic() - self.started:6.1f}s  {event}"
        self.timeline.append(line)
        print(line, flush=True)

    def compose(self, *args: str, timeout: float = 120, check: bool = True):
        # Only the temp env file and these variables feed the interpolation: the user's shell
        # (RAY_AUTH_TOKEN, port overrides) and cluster/.env must not leak into the test cluster.
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("RAY_", "DASHBOARD_", "METRICS_", "HEAD_", "WORKER_", "TRAIN_"))
        }
        cmd = ["docker", "compose", "--project-name", self.project, "--file", str(COMPOSE_FILE)]
        cmd += [a for f in self.overrides for a in ("--file", str(f))]
        if self.prometheus_port:
            cmd += ["--profile", "monitoring"]
        cmd += ["--env-file", str(self.env_file), *args]
        return run(cmd, timeout=timeout, check=check, env=env)

    def query(self, promql: str) -> list[dict]:
        """Prometheus's HTTP API (published on 127.0.0.1): the instant vector for ``promql``."""
        url = f"{self.prometheus}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
        with urllib.request.urlopen(url, timeout=30) as response:
            return json.load(response)["data"]["result"]

    def workers(self, status: str = "running") -> list[str]:
        out = self.compose("ps", "--quiet", "--status", status, "worker").stdout
        return out.split()

    def training(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`python -m training ...` inside the head container (reads the shared volume)."""
        return self.compose("exec", "-T", "head", "python", "-m", "training", *args, check=check)

    def status(self, name: str) -> dict[str, Any] | None:
        proc = self.training("status", "--storage", STORAGE, "--name", name, "--json", check=False)
        if proc.returncode != 0:
            return None
        runs = json.loads(proc.stdout or "[]")
        return next((r for r in runs if r.get("name") == name), None)

    def up(self, workers: int) -> None:
        """Head plus ``workers`` workers (and Prometheus with the monitoring profile), every
        stopped or killed one started again; returns once every healthcheck passes."""
        services = ["head", "worker", *(["prometheus"] if self.prometheus_port else [])]
        self.compose(
            "up", "--detach", "--no-build", "--scale", f"worker={workers}", "--wait",
            "--wait-timeout", str(CLUSTER_UP_TIMEOUT_S), *services,
            timeout=CLUSTER_UP_TIMEOUT_S + 60,
        )  # fmt: skip

    def verify(self, name: str) -> dict[str, Any]:
        proc = self.training("verify", "--storage", STORAGE, "--name", name, "--json", check=False)
        assert proc.stdout.strip(), f"verify printed nothing: {proc.stderr[-2000:]}"
        return json.loads(proc.stdout)


def dump_logs(cluster: ComposeCluster) -> None:
    proc = cluster.compose("logs", "--no-color", "--timestamps", "--tail", "400", check=False)
    print("\n===== docker compose logs (last 400 lines per container) =====")
    print(proc.stdout[-60000:], proc.stderr[-4000:])
    print("===== docker compose ps =====")
    print(cluster.compose("ps", "--all", check=False).stdout)


def project_containers(c: ComposeCluster, *labels: str) -> list[str]:
    filters = [f"label=com.docker.compose.project={c.project}", *labels]
    cmd = ["docker", "ps", "--all", "--quiet", *[a for f in filters for a in ("--filter", f)]]
    return run(cmd).stdout.split()


@contextmanager
def compose_cluster(
    request: pytest.FixtureRequest, tmp: Path, prefix: str, workers: int = 2,
    prometheus_image: str | None = None, overrides: tuple[Path, ...] = (),
) -> Iterator[ComposeCluster]:  # fmt: skip
    """A new project: head + ``workers`` workers (+ Prometheus given its image), healthy;
    ``down -v`` afterwards, with every container's logs first if a test failed meanwhile."""
    c = ComposeCluster(
        project=f"{prefix}-{uuid.uuid4().hex[:8]}",
        env_file=tmp / "e2e.env",
        token=secrets.token_hex(32),
        dashboard_port=free_port(),
        prometheus_port=free_port() if prometheus_image else 0,
        overrides=list(overrides),
    )
    monitoring = (
        f"PROMETHEUS_HOST_PORT={c.prometheus_port}\nPROMETHEUS_IMAGE={prometheus_image}\n"
        if prometheus_image
        else ""
    )
    c.env_file.write_text(
        f"RAY_AUTH_TOKEN={c.token}\nDASHBOARD_HOST_PORT={c.dashboard_port}\n"
        f"METRICS_HOST_PORT={free_port()}\n{monitoring}"
        # Room for head + 3 workers on a small CI machine.
        "HEAD_MEMORY=3g\nWORKER_MEMORY=2g\n"
    )
    c.env_file.chmod(0o600)
    failed_before = request.session.testsfailed
    try:
        c.up(workers=workers)
        extra = f" with {', '.join(o.name for o in overrides)}" if overrides else ""
        monitored = " + prometheus" if prometheus_image else ""
        c.mark(
            f"cluster up{extra}: head + {len(c.workers())} workers{monitored} healthy ({c.project})"
        )
        yield c
    finally:
        if request.session.testsfailed > failed_before:
            dump_logs(c)
            for sup in project_containers(c, "label=com.docker.compose.service=submit"):
                print(run(["docker", "logs", "--tail", "200", sup], check=False).stdout[-20000:])
        print("\n".join(["", "timeline:", *c.timeline]))
        for leftover in project_containers(c):  # e.g. a supervisor: a one-off `run` container
            run(["docker", "rm", "--force", leftover], check=False)
        c.compose("down", "--volumes", "--remove-orphans", "--timeout", "10", timeout=180)


def job_client(c: ComposeCluster):
    from ray.job_submission import JobSubmissionClient

    # An explicit Authorization header: the same token the nodes got, no global state.
    return JobSubmissionClient(c.dashboard, headers={"Authorization": f"Bearer {c.token}"})


def wait_for_job(c: ComposeCluster, job_id: str, timeout_s: float = JOB_TIMEOUT_S) -> str:
    from ray.job_submission import JobStatus

    client = job_client(c)

    def finished() -> str | None:
        status = client.get_job_status(job_id)
        return status.value if status.is_terminal() else None

    status = wait_for(finished, timeout_s, f"job {job_id} to finish", every=3)
    if status != JobStatus.SUCCEEDED.value:
        print(client.get_job_logs(job_id)[-20000:])
    return status


def wait_for_step(c: ComposeCluster, name: str, step: int, with_checkpoint: bool) -> dict:
    """The run's status once it reached `step` (and, optionally, holds a valid checkpoint)."""

    def reached() -> dict | None:
        status = c.status(name)
        if not status or (status.get("final_step") or 0) < step:
            return None
        valid = [ck["step"] for ck in status.get("checkpoints", []) if ck.get("valid")]
        if with_checkpoint and not [s for s in valid if s > 0]:
            return None
        return status

    return wait_for(reached, PROGRESS_TIMEOUT_S, f"run {name} to reach step {step}", every=2)


def run(
    cmd: list[str], *, timeout: float = 120, check: bool = True, **kwargs
) -> subprocess.CompletedProcess[str]:
    """Run a command, capture its output as text, and fail the test with that output on error."""
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, check=False, **kwargs
    )
    if check and proc.returncode != 0:
        pytest.fail(
            f"command failed (exit {proc.returncode}): {' '.join(cmd)}\n"
            f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"
        )
    return proc
