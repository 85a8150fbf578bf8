"""Shared by the self-healing e2e tests: a run submitted by the Compose cluster's own supervisor
container, the run's attempts read from its run log on the volume, and the head crash with its
recovery timeline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from support.cli import wait_for
from support.compose import (
    CONFIG_IN_IMAGE,
    STORAGE,
    ComposeCluster,
    project_containers,
    run,
    train_command,
)

CLUSTER_DIR = Path(__file__).resolve().parents[2] / "cluster"
STEP_TIMEOUT_S = 300
FINISH_TIMEOUT_S = 900
STEPS_PER_EPOCH = 76  # cluster/train.yaml: 4096 demo rows, global batch 48

# Per attempt, from the run log on the volume: when it started, on how many workers, from
# which step, and the last step it recorded (rank 0 writes a line per step, line-buffered).
ATTEMPTS_PY = """
import json, sys, pyarrow.fs as fs
from training.core import runlog
events = runlog.read_events(fs.LocalFileSystem(), sys.argv[1])
out = {}
for e in events:
    a = out.setdefault(e["attempt"], {"attempt": e["attempt"], "last_step": None})
    if e["event"] == "start":
        a.update(start=e["time"], world=e["world_size"], resumed_from=e["resumed_from_step"])
    elif e["event"] == "step":
        a.update(last_step=e["global_step"], last_time=e["time"])
    elif e["event"] == "checkpoint":
        a["last_checkpoint"] = e["global_step"]
print(json.dumps(sorted((a for a in out.values() if "start" in a), key=lambda a: a["start"])))
"""


def attempts(c: ComposeCluster, name: str) -> list[dict[str, Any]]:
    script = ["python", "-c", ATTEMPTS_PY, f"{STORAGE}/{name}"]
    proc = c.compose("exec", "-T", "head", *script, check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 and proc.stdout.strip() else []


def container(c: ComposeCluster, service: str) -> str:
    return c.compose("ps", "--quiet", "--all", service).stdout.split()[0]


def inspect(container_id: str, fmt: str) -> str:
    return run(["docker", "inspect", "--format", fmt, container_id]).stdout.strip()


def supervisor_container(c: ComposeCluster) -> str:
    found = project_containers(c, "label=com.docker.compose.service=submit")
    assert len(found) == 1, f"expected one supervisor container, found {found}"
    return found[0]


def start_supervisor(c: ComposeCluster, name: str, epochs: int) -> None:
    """The cluster's supervisor container, submitting the run ``name`` (and resubmitting it)."""
    entrypoint = train_command(CONFIG_IN_IMAGE, name, training__epochs=epochs).split()
    c.compose("run", "--detach", "--no-deps", "submit", "python", "/app/cluster/supervisor.py",
              "--address=http://head:8265", "--", *entrypoint)  # fmt: skip
    c.mark(f"supervisor container started: it submits {name} ({epochs * STEPS_PER_EPOCH} steps)")


def wait_for_training(
    c: ComposeCluster, name: str, after: float, min_steps: int, world: int | None = None
) -> dict[str, Any]:
    """The newest attempt once it started after `after` (epoch s) and took `min_steps` steps."""

    def training() -> dict | None:
        runs = attempts(c, name)
        last = runs[-1] if runs else None
        if not last or last["start"] <= after or last["last_step"] is None:
            return None
        if world is not None and last["world"] != world:
            return None
        done = last["last_step"] - (last["resumed_from"] or 0)
        return last if done >= min_steps else None

    return wait_for(training, STEP_TIMEOUT_S, f"{name} training after t={after:.0f}", every=2)


def crash_head_and_recover(c: ComposeCluster, name: str) -> dict[str, Any]:
    """SIGKILL the head's PID 1 (a crash: Docker's restart policy applies; `docker kill` would be
    a manual stop that Docker never undoes); the run trains again. Returns the new attempt."""
    before = wait_for_training(c, name, after=0, min_steps=10)
    head = container(c, "head")
    workers = {w: inspect(w, "{{.RestartCount}}") for w in c.workers()}
    pid = inspect(head, "{{.State.Pid}}")
    run(["kill", "-9", pid])
    killed_at = float(run(["date", "+%s.%N"]).stdout)
    c.mark(f"SIGKILL head {head[:12]} (pid {pid}) at step {before['last_step']}")

    def head_back() -> bool:
        restarted = inspect(head, "{{.RestartCount}}") != "0"
        return restarted and inspect(head, "{{.State.Health.Status}}") == "healthy"

    wait_for(head_back, 240, "the head to restart and be healthy", every=2)
    c.mark("head restarted by Docker and healthy")
    again = wait_for_training(c, name, after=killed_at, min_steps=1)
    restarts = {w[:12]: inspect(w, "{{.RestartCount}}") for w in workers}
    c.mark(
        f"training again from step {again['resumed_from']} on {again['world']} worker(s), "
        f"{again['last_time'] - killed_at:.1f}s after the kill; worker container restarts "
        f"{restarts}"
    )
    assert again["resumed_from"] and again["resumed_from"] >= (before["resumed_from"] or 0), again
    return again


def finish(c: ComposeCluster, name: str, total_steps: int) -> dict[str, Any]:
    """The supervisor exits 0 after its job SUCCEEDED; the ledger is exact."""
    sup = supervisor_container(c)
    wait_for(lambda: inspect(sup, "{{.State.Status}}") == "exited", FINISH_TIMEOUT_S,
             "the supervisor to finish", every=5)  # fmt: skip
    code = inspect(sup, "{{.State.ExitCode}}")
    result = c.verify(name)
    c.mark(f"supervisor exited {code}; verify: {json.dumps(result)}")
    logs = run(["docker", "logs", sup]).stdout
    assert code == "0", logs[-5000:]
    assert "SUCCEEDED" in logs and "--lease-dead-job supervised-1-" in logs, logs[-5000:]
    assert result["ok"] is True and result["completed"] is True, result
    assert result["final_step"] == total_steps, result
    return result
