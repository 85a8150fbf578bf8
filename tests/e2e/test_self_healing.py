"""End to end on a real Docker engine: the Compose cluster heals itself (issue 13).

    IMAGE=elastic-trainer:0.1.0 .venv/bin/python -m pytest tests/e2e/test_self_healing.py -s

One cluster (Redis + head + 2 workers, its own project, token and ports) and one run,
`e2e-heal`, submitted by the cluster's own supervisor container (cluster/supervisor.py), never by
the test. In file order, on that one run:
  1. a second `train` of the same run, submitted through the job API, is refused (exit 2) with
     a line naming where the run trains;
  2. `docker stop` of one worker (SIGTERM, as `docker compose stop worker` sends): Ray drains the
     node, the run checkpoints at once and goes on on the other worker; redone steps: 0;
  3. the head's main process is SIGKILLed (a crash: Docker restarts the container by itself),
     the supervisor resubmits, the run resumes and finishes SUCCEEDED with the ledger exact.
The timeline (seconds since the cluster was up) is printed at the end.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from e2e_support import run
from healing_support import (
    STEPS_PER_EPOCH,
    HealingCluster,
    attempts,
    crash_head_and_recover,
    finish,
    supervised_cluster,
    wait_for_training,
)
from test_compose import CONFIG_IN_IMAGE, job_client, train_command, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

NAME = "e2e-heal"
EPOCHS = 12  # 912 steps: long enough for all three scenarios on 2 shared cores


@pytest.fixture(scope="module")
def cluster(
    project_image: str, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[HealingCluster]:
    """Redis + head + 2 workers, healthy, and the supervisor training `e2e-heal`."""
    tmp = tmp_path_factory.mktemp("heal")
    with supervised_cluster(request, tmp, workers=2, name=NAME, epochs=EPOCHS) as c:
        yield c


def test_second_writer_of_a_training_run_is_refused(cluster: HealingCluster) -> None:
    first = wait_for_training(cluster, NAME, after=0, min_steps=15, world=2)
    cluster.mark(f"{NAME} training on 2 workers (step {first['last_step']})")
    client = job_client(cluster)
    # The very same command (same config): only the lease can refuse it.
    job_id = client.submit_job(
        entrypoint=train_command(CONFIG_IN_IMAGE, NAME, training__epochs=EPOCHS)
    )
    status = wait_for(f"duplicate job {job_id} to end",
                      lambda: client.get_job_status(job_id).is_terminal(), 180)  # fmt: skip
    info, logs = client.get_job_info(job_id), client.get_job_logs(job_id)
    refusal = next((line for line in logs.splitlines() if "already training" in line), "")
    cluster.mark(
        f"second train of {NAME}: {info.status.value}, exit {info.driver_exit_code}: {refusal}"
    )
    assert status and info.status.value == "FAILED", (info, logs[-3000:])
    assert info.driver_exit_code == 2, (info, logs[-3000:])
    assert f"error: run '{NAME}' is already training (host head pid " in refusal, logs[-3000:]
    assert ", job supervised-1-" in refusal and "since " in refusal, refusal
    assert "Resuming" not in logs and "Starting" not in logs, "refused only after touching the run"


def test_graceful_worker_stop_redoes_no_step(cluster: HealingCluster) -> None:
    before = attempts(cluster, NAME)[-1]
    assert before["world"] == 2, before
    victim = cluster.workers()[-1]
    cluster.mark(
        f"docker stop worker {victim[:12]} (SIGTERM, grace 60 s) at step {before['last_step']}"
    )
    run(["docker", "stop", "--time", "60", victim], timeout=120)
    cluster.mark(f"worker {victim[:12]} stopped")
    resumed = wait_for_training(cluster, NAME, after=before["start"], min_steps=1, world=1)
    runs = attempts(cluster, NAME)
    drained = runs[-2]
    redone = drained["last_step"] - resumed["resumed_from"]
    cluster.mark(
        f"resumed on 1 worker from step {resumed['resumed_from']}; the drained attempt's last "
        f"step {drained['last_step']}, last checkpoint {drained.get('last_checkpoint')}: "
        f"redone steps {redone}"
    )
    assert drained["attempt"] == before["attempt"], runs
    assert drained.get("last_checkpoint") == drained["last_step"], drained
    assert redone == 0, runs


def test_head_crash_heals_unattended(cluster: HealingCluster) -> None:
    crash_head_and_recover(cluster, NAME)
    finish(cluster, NAME, total_steps=EPOCHS * STEPS_PER_EPOCH)
