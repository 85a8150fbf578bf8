"""End to end on a real Docker engine: the Compose head/worker cluster in cluster/compose.yaml.

    make e2e        # or: .venv/bin/python -m pytest tests/e2e/test_compose.py -s

On the session's shared cluster (tests/e2e/conftest.py: its own Compose project, token and host
ports, brought back to head + 2 healthy workers for this module). In file order:
  1. the job API refuses a submission without a token (401) or with a wrong one (403);
  2. one run (submitted with the host's working dir, as the README shows) on 2 workers loses
     one to `docker kill` mid-run and restarts from a checkpoint on the shared volume; then,
     while it trains, grows to 3 workers when `docker compose up --scale worker=3` adds
     nodes; it finishes SUCCEEDED and the exactly-once ledger holds.
Every wait polls a real signal with a deadline; none is a fixed sleep.
"""

from __future__ import annotations

import json
import secrets
import urllib.error
import urllib.request

import pytest
from support.cli import wait_for
from support.compose import (
    PROGRESS_TIMEOUT_S,
    REPO_ROOT,
    ComposeCluster,
    job_client,
    run,
    train_command,
    wait_for_job,
    wait_for_step,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


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
    # The same endpoint with the cluster's token answers: the refusal was about the token; and
    # neither refused submission became a job (the cluster is shared: others may be listed).
    jobs = job_client(cluster).list_jobs()
    assert [j for j in jobs if j.entrypoint == "echo should-never-run"] == [], jobs
    cluster.mark("job API: 401 without a token, 403 with a wrong one, 200 with the token")


def test_worker_killed_then_the_running_job_grows_when_workers_are_added(
    cluster: ComposeCluster,
) -> None:
    """One run, two scenarios in turn (each a job start less than two runs): it loses a worker
    to `docker kill` and resumes from a checkpoint on the survivor; then, while it trains,
    `docker compose up --scale worker=3` adds nodes and the same job grows to 3 workers."""
    name = "e2e-kill-grow"
    workers = cluster.workers()
    assert len(workers) == 2, f"expected 2 running workers, got {workers}"
    # The README's way: the host's working dir (its training/ package) uploaded with the job.
    # 608 steps: it grew to 3 at step 168-250 on a loaded VM; a quieter machine trains more
    # steps during the same container starts, and a run that ends first fails the test.
    job_id = job_client(cluster).submit_job(
        entrypoint=train_command("cluster/train.yaml", name, training__epochs=8),  # 608 steps
        runtime_env={"working_dir": str(REPO_ROOT)},
    )
    cluster.mark(f"submitted {name} ({job_id}) with --working-dir on 2 workers")

    status = wait_for_step(cluster, name, step=30, with_checkpoint=True)
    assert status["world_sizes"] == [2], status
    killed_at = status["final_step"]
    run(["docker", "kill", workers[-1]])
    cluster.mark(f"docker kill worker {workers[-1][:12]} at step {killed_at}")

    def resumed() -> dict | None:
        status = cluster.status(name)
        restarted = status and len(status.get("world_sizes", [])) > 1
        return status if restarted and status["final_step"] > killed_at else None

    status = wait_for(resumed, PROGRESS_TIMEOUT_S, f"run {name} to train again", every=2)
    cluster.mark(f"{name} trains again: world sizes {status['world_sizes']}")

    cluster.up(workers=3)
    cluster.mark(f"scaled to {len(cluster.workers())} healthy workers")

    def grown() -> dict | None:
        status = cluster.status(name)
        return status if status and status.get("world_sizes", [])[-1:] == [3] else None

    status = wait_for(grown, PROGRESS_TIMEOUT_S, f"run {name} to use 3 workers", every=2)
    cluster.mark(f"{name} world sizes {status['world_sizes']} at step {status['final_step']}")

    assert wait_for_job(cluster, job_id) == "SUCCEEDED"
    result = cluster.verify(name)
    cluster.mark(f"{name} SUCCEEDED; verify: {json.dumps(result)}")
    assert result["ok"] is True, result
    assert result["errors"] == [], result
    assert result["world_sizes"][0] == 2 and result["world_sizes"][-1] == 3, result
    # The attempt after the kill resumed from a checkpoint, not from the start.
    assert result["resumed_from_steps"][1], result
    assert result["final_step"] == 608, result
