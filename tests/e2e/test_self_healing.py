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

import json
import secrets
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from e2e_support import run
from test_compose import (
    CONFIG_IN_IMAGE,
    STORAGE,
    ComposeCluster,
    dump_logs,
    free_port,
    job_client,
    train_command,
    wait_for,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

NAME = "e2e-heal"
EPOCHS = 12  # 912 steps: long enough for all three scenarios on 2 shared cores
TOTAL_STEPS = 76 * EPOCHS
STEP_TIMEOUT_S = 300
FINISH_TIMEOUT_S = 900

# Per attempt, from the run log on the volume: when it started, on how many workers, from
# which step, and the last step it recorded (rank 0 writes a line per step, line-buffered).
ATTEMPTS_PY = f"""
import json, pyarrow.fs as fs
from training import runlog
events = runlog.read_events(fs.LocalFileSystem(), "{STORAGE}/{NAME}")
out = {{}}
for e in events:
    a = out.setdefault(e["attempt"], {{"attempt": e["attempt"], "last_step": None}})
    if e["event"] == "start":
        a.update(start=e["time"], world=e["world_size"], resumed_from=e["resumed_from_step"])
    elif e["event"] == "step":
        a.update(last_step=e["global_step"], last_time=e["time"])
    elif e["event"] == "checkpoint":
        a["last_checkpoint"] = e["global_step"]
print(json.dumps(sorted((a for a in out.values() if "start" in a), key=lambda a: a["start"])))
"""


def attempts(c: ComposeCluster) -> list[dict[str, Any]]:
    proc = c.compose("exec", "-T", "head", "python", "-c", ATTEMPTS_PY, check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 and proc.stdout.strip() else []


def container(c: ComposeCluster, service: str) -> str:
    return c.compose("ps", "--quiet", "--all", service).stdout.split()[0]


def inspect(container_id: str, fmt: str) -> str:
    return run(["docker", "inspect", "--format", fmt, container_id]).stdout.strip()


def project_containers(c: ComposeCluster, *labels: str) -> list[str]:
    filters = [f"label=com.docker.compose.project={c.project}", *labels]
    cmd = ["docker", "ps", "--all", "--quiet", *[a for f in filters for a in ("--filter", f)]]
    return run(cmd).stdout.split()


def supervisor_container(c: ComposeCluster) -> str:
    found = project_containers(c, "label=com.docker.compose.service=submit")
    assert len(found) == 1, f"expected one supervisor container, found {found}"
    return found[0]


@pytest.fixture(scope="module")
def cluster(
    project_image: str, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[ComposeCluster]:
    """Redis + head + 2 workers, healthy, and the supervisor training `e2e-heal`."""
    token, dashboard_port = secrets.token_hex(32), free_port()
    env_file = tmp_path_factory.mktemp("heal") / "e2e.env"
    env_file.write_text(
        f"RAY_AUTH_TOKEN={token}\nDASHBOARD_HOST_PORT={dashboard_port}\n"
        f"METRICS_HOST_PORT={free_port()}\nHEAD_MEMORY=3g\nWORKER_MEMORY=2g\n"
    )
    env_file.chmod(0o600)
    c = ComposeCluster(
        project=f"et-heal-{uuid.uuid4().hex[:8]}",
        env_file=env_file,
        token=token,
        dashboard_port=dashboard_port,
    )
    failed_before = request.session.testsfailed
    try:
        c.up(workers=2)
        c.mark(f"cluster up: redis + head + {len(c.workers())} workers healthy ({c.project})")
        entrypoint = train_command(CONFIG_IN_IMAGE, NAME, training__epochs=EPOCHS).split()
        c.compose("run", "--detach", "--no-deps", "submit", "python", "/app/cluster/supervisor.py",
                  "--address=http://head:8265", "--", *entrypoint)  # fmt: skip
        c.mark(f"supervisor container started: it submits {NAME} ({TOTAL_STEPS} steps)")
        yield c
    finally:
        if request.session.testsfailed > failed_before:
            dump_logs(c)
            sup = supervisor_container(c)
            print(run(["docker", "logs", "--tail", "200", sup], check=False).stdout[-20000:])
        print("\n".join(["", "timeline:", *c.timeline]))
        for leftover in project_containers(c):  # the supervisor is a one-off `run` container
            run(["docker", "rm", "--force", leftover], check=False)
        c.compose("down", "--volumes", "--remove-orphans", "--timeout", "10", timeout=180)


def wait_for_training(c: ComposeCluster, after: float, min_steps: int, world: int | None = None):
    """The newest attempt once it started after `after` (epoch s) and took `min_steps` steps."""

    def training() -> dict | None:
        runs = attempts(c)
        last = runs[-1] if runs else None
        if not last or last["start"] <= after or last["last_step"] is None:
            return None
        if world is not None and last["world"] != world:
            return None
        done = last["last_step"] - (last["resumed_from"] or 0)
        return last if done >= min_steps else None

    return wait_for(f"{NAME} training after t={after:.0f}", training, STEP_TIMEOUT_S)


def test_second_writer_of_a_training_run_is_refused(cluster: ComposeCluster) -> None:
    first = wait_for_training(cluster, after=0, min_steps=15, world=2)
    cluster.mark(f"{NAME} training on 2 workers (step {first['last_step']})")
    client = job_client(cluster)
    job_id = client.submit_job(entrypoint=train_command(CONFIG_IN_IMAGE, NAME))
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


def test_graceful_worker_stop_redoes_no_step(cluster: ComposeCluster) -> None:
    before = attempts(cluster)[-1]
    assert before["world"] == 2, before
    victim = cluster.workers()[-1]
    cluster.mark(
        f"docker stop worker {victim[:12]} (SIGTERM, grace 60 s) at step {before['last_step']}"
    )
    run(["docker", "stop", "--time", "60", victim], timeout=120)
    cluster.mark(f"worker {victim[:12]} stopped")
    resumed = wait_for_training(cluster, after=before["start"], min_steps=1, world=1)
    runs = attempts(cluster)
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


def test_head_crash_heals_unattended(cluster: ComposeCluster) -> None:
    before = wait_for_training(cluster, after=0, min_steps=10, world=1)
    head = container(cluster, "head")
    workers = {w: inspect(w, "{{.RestartCount}}") for w in cluster.workers()}
    pid = inspect(head, "{{.State.Pid}}")
    run(["kill", "-9", pid])  # the head's PID 1 dies, as in a crash; `docker kill` would be a stop
    killed_at = float(run(["date", "+%s.%N"]).stdout)
    cluster.mark(f"SIGKILL head {head[:12]} (pid {pid}) at step {before['last_step']}")

    def head_back() -> bool:
        restarted = inspect(head, "{{.RestartCount}}") != "0"
        return restarted and inspect(head, "{{.State.Health.Status}}") == "healthy"

    wait_for("the head to restart and be healthy", head_back, 240)
    cluster.mark("head restarted by Docker and healthy")
    again = wait_for_training(cluster, after=killed_at, min_steps=1)
    cluster.mark(
        f"training again from step {again['resumed_from']} on {again['world']} worker(s), "
        f"{again['last_time'] - killed_at:.1f}s after the kill; worker restarts "
        f"{[inspect(w, '{{.RestartCount}}') for w in workers]} (before {list(workers.values())})"
    )
    assert again["resumed_from"] and again["resumed_from"] >= before["resumed_from"], again

    sup = supervisor_container(cluster)
    wait_for("the supervisor to finish", lambda: inspect(sup, "{{.State.Status}}") == "exited",
             FINISH_TIMEOUT_S, every_s=5)  # fmt: skip
    code = inspect(sup, "{{.State.ExitCode}}")
    result = cluster.verify(NAME)
    cluster.mark(f"supervisor exited {code}; verify: {json.dumps(result)}")
    logs = run(["docker", "logs", sup]).stdout
    assert code == "0", logs[-5000:]
    assert "SUCCEEDED" in logs and "--lease-dead-job supervised-1-" in logs, logs[-5000:]
    assert result["ok"] is True and result["completed"] is True, result
    assert result["final_step"] == TOTAL_STEPS, result
