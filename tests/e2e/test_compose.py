"""End to end on a real Docker engine: the Compose head/worker cluster in cluster/compose.yaml.

    make e2e        # or: .venv/bin/python -m pytest tests/e2e/test_compose.py -s

One cluster for the module (its own Compose project, token and host ports, so it neither reads
the user's cluster/.env nor collides with a running cluster), torn down with `down -v` even when
a test fails; the containers' logs are printed first when one did. The tests run in file order:
  1. the job API refuses a submission without a token (401) or with a wrong one (403);
  2. a run on 2 workers loses one to `docker kill` mid-run, restarts from a checkpoint on the
     shared volume, finishes SUCCEEDED, and the exactly-once ledger holds;
  3. a second run (submitted with the host's working dir, as the README shows) grows to 3
     workers when `docker compose up --scale worker=3` adds nodes while it trains.
Every wait polls a real signal with a deadline; none is a fixed sleep.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from e2e_support import run

REPO_ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.e2e, pytest.mark.slow]

COMPOSE_FILE = REPO_ROOT / "cluster" / "compose.yaml"
CONFIG_IN_IMAGE = "/app/cluster/train.yaml"  # cluster/train.yaml, baked into the image
STORAGE = "/mnt/storage/runs"
# Small and quick on a 2-core machine: 4096 demo rows, global batch 48 -> 76 steps per epoch;
# a checkpoint (and a Ray report barrier, ~1.5 s) every 10 steps.
FAST_RUN = {
    "checkpoint.every_n_steps": 10,
    "training.report_every_n_steps": 10,
    "training.log_every_n_steps": 10,
    "scaling.resize_check_interval_s": 3,
}

CLUSTER_UP_TIMEOUT_S = 240
JOB_TIMEOUT_S = 420
PROGRESS_TIMEOUT_S = 240


def train_command(config: str, name: str, **overrides: Any) -> str:
    """The job's entrypoint: `python -m training train` with FAST_RUN and `overrides`."""
    settings = {**FAST_RUN, **{k.replace("__", "."): v for k, v in overrides.items()}}
    sets = " ".join(f"--set {key}={value}" for key, value in settings.items())
    return f"python -m training train --config {config} --name {name} {sets}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(what: str, probe: Callable[[], Any], timeout_s: float, every_s: float = 2.0) -> Any:
    """Poll `probe` until it returns something truthy; fail with `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(every_s)
    pytest.fail(f"timed out after {timeout_s:.0f}s waiting for {what} (last: {last!r})")


@dataclass
class ComposeCluster:
    project: str
    env_file: Path
    token: str
    dashboard_port: int
    started: float = field(default_factory=time.monotonic)
    timeline: list[str] = field(default_factory=list)

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

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
        cmd += ["--env-file", str(self.env_file), *args]
        return run(cmd, timeout=timeout, check=check, env=env)

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
        """Head plus ``workers`` workers; returns once every healthcheck passes (Ray is ready)."""
        self.compose(
            "up", "--detach", "--no-build", "--scale", f"worker={workers}", "--wait",
            "--wait-timeout", str(CLUSTER_UP_TIMEOUT_S), "head", "worker",
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


@pytest.fixture(scope="module")
def cluster(
    project_image: str, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[ComposeCluster]:
    """Head + 2 workers, healthy; `down -v` afterwards, with logs first if a test failed."""
    token = secrets.token_hex(32)
    dashboard_port = free_port()
    env_file = tmp_path_factory.mktemp("compose") / "e2e.env"
    env_file.write_text(
        f"RAY_AUTH_TOKEN={token}\n"
        f"DASHBOARD_HOST_PORT={dashboard_port}\n"
        f"METRICS_HOST_PORT={free_port()}\n"
        # Room for head + 3 workers on a small CI machine.
        "HEAD_MEMORY=3g\nWORKER_MEMORY=2g\n"
    )
    env_file.chmod(0o600)
    c = ComposeCluster(
        project=f"et-e2e-{uuid.uuid4().hex[:8]}",
        env_file=env_file,
        token=token,
        dashboard_port=dashboard_port,
    )
    failed_before = request.session.testsfailed
    try:
        # --wait: returns once every started container's healthcheck passes (Ray is ready).
        c.up(workers=2)
        c.mark(f"cluster up: head + {len(c.workers())} workers healthy ({c.project})")
        yield c
    finally:
        if request.session.testsfailed > failed_before:
            dump_logs(c)
        print("\n".join(["", "timeline:", *c.timeline]))
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

    status = wait_for(f"job {job_id} to finish", finished, timeout_s, every_s=3)
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

    return wait_for(f"run {name} to reach step {step}", reached, PROGRESS_TIMEOUT_S)


def test_job_api_refuses_submission_without_token(cluster: ComposeCluster) -> None:
    body = json.dumps({"entrypoint": "echo should-never-run"}).encode()
    # No token: 401 (authenticate first); a wrong token: 403 (authenticated as nobody).
    expected = [({}, 401), ({"Authorization": f"Bearer {secrets.token_hex(32)}"}, 403)]
    for headers, code in expected:
        request = urllib.request.Request(
            f"{cluster.dashboard}/api/jobs/",
            data=body,
            headers={"Content-Type": "application/json", **headers},
            method="POST",
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == code, f"expected {code} with headers {list(headers)}"
    # The same endpoint with the cluster's token answers: the refusal was about the token.
    assert job_client(cluster).list_jobs() == []
    cluster.mark("job API: 401 without a token, 403 with a wrong one, 200 with the token")


def test_worker_killed_mid_run_resumes_from_checkpoint(cluster: ComposeCluster) -> None:
    name = "e2e-kill"
    workers = cluster.workers()
    assert len(workers) == 2, f"expected 2 running workers, got {workers}"
    job_id = job_client(cluster).submit_job(
        entrypoint=train_command(CONFIG_IN_IMAGE, name, training__epochs=4)  # 304 steps
    )
    cluster.mark(f"submitted {name} ({job_id}) on 2 workers")

    status = wait_for_step(cluster, name, step=30, with_checkpoint=True)
    assert status["world_sizes"] == [2], status
    run(["docker", "kill", workers[-1]])
    cluster.mark(f"docker kill worker {workers[-1][:12]} at step {status['final_step']}")

    assert wait_for_job(cluster, job_id) == "SUCCEEDED"
    result = cluster.verify(name)
    cluster.mark(f"{name} SUCCEEDED; verify: {json.dumps(result)}")
    assert result["ok"] is True, result
    assert result["errors"] == [], result
    assert result["attempts"] >= 2, result
    assert result["world_sizes"][0] == 2, result
    resumed = [s for s in result["resumed_from_steps"][1:] if s]
    assert resumed, f"no attempt resumed from a checkpoint: {result}"
    assert result["final_step"] == 304, result


def test_running_job_grows_when_workers_are_added(cluster: ComposeCluster) -> None:
    name = "e2e-scale"
    before = len(cluster.workers())
    # The README's way: the host's working dir (its training/ package) uploaded with the job.
    job_id = job_client(cluster).submit_job(
        entrypoint=train_command(
            "cluster/train.yaml",
            name,
            training__epochs=8,  # 608 steps
            checkpoint__every_n_steps=20,
            training__report_every_n_steps=20,
        ),
        runtime_env={"working_dir": str(REPO_ROOT)},
    )
    cluster.mark(f"submitted {name} ({job_id}) with --working-dir on {before} worker(s)")
    wait_for_step(cluster, name, step=10, with_checkpoint=False)

    cluster.up(workers=3)
    cluster.mark(f"scaled to {len(cluster.workers())} healthy workers")

    def grown() -> dict | None:
        status = cluster.status(name)
        return status if status and 3 in status.get("world_sizes", []) else None

    status = wait_for(f"run {name} to use 3 workers", grown, PROGRESS_TIMEOUT_S)
    cluster.mark(f"{name} world sizes {status['world_sizes']} at step {status['final_step']}")

    assert wait_for_job(cluster, job_id) == "SUCCEEDED"
    result = cluster.verify(name)
    cluster.mark(f"{name} SUCCEEDED; verify: {json.dumps(result)}")
    assert result["ok"] is True, result
    assert result["world_sizes"][-1] == 3, result
    assert result["final_step"] == 608, result
