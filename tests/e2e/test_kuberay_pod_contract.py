"""Pod contract: the project image, started the way KubeRay v1.7 starts this RayCluster's pods,
forms a Ray cluster that runs the RayJob's training entrypoint to completion.

    make e2e        # = .venv/bin/python -m pytest tests/e2e (needs the Docker engine)

No Kubernetes runs here, so the pods are rebuilt from kuberay/raycluster.elastic-trainer.yaml
(parsed, nothing copied by hand) as Docker containers:
- command: `/bin/bash -lc -- "ulimit -n 65536; ray start --head ... <rayStartParams>"` on the
  head, `ray start --address=<head-svc FQDN>:6379 ...` on workers (tests/kuberay/kuberay_pods.py
  models the operator's pod builder); the login shell is part of the contract;
- the user, group, fsGroup, dropped capabilities and no-new-privileges of the securityContext,
  the memory / CPU limits, the manifest's env plus what the operator adds (RAY_ADDRESS, ...,
  RAY_AUTH_MODE=token and RAY_AUTH_TOKEN as authOptions injects them from the Secret);
- volumes: a named volume at the PVC's mountPath, the ConfigMap's items as a read-only
  directory, a tmpfs for the Memory emptyDir at /dev/shm and for the /tmp/ray emptyDir;
- one user-defined network in which the head answers to its Service's FQDN;
- workers wait for the head's GCS like the operator's injected init container does;
- readiness is what the operator's probes check: HTTP GET of the node health endpoint on
  the dashboard agent port, from outside the container, without a token.
Then the RayJob's entrypoint (shortened with --set) is submitted through the job API with the
token, as the README's port-forward + `ray job submit` does, and must succeed; `verify --json`
must find the exactly-once ledger intact, with one training worker per worker pod.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kuberay"))

from kuberay_invariants import (
    KUBERAY_DIR,
    all_manifests,
    entrypoint_args,
    entrypoint_flag,
    one,
)
from kuberay_pods import (
    CONTAINER_COMMAND,
    DASHBOARD_AGENT_PORT,
    DASHBOARD_PORT,
    GCS_HEALTH_PATH,
    NODE_HEALTH_PATH,
    container_args,
    head_service_fqdn,
    manifest_env,
    operator_env,
    parse_quantity,
    quantity_value,
    ray_container,
    ray_start_command,
    wait_gcs_ready_script,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(600)]

CONFIG_SOURCE_DIR = KUBERAY_DIR / "config"  # kubectl create configmap --from-file=...
# Shorten the RayJob's run to a smoke test; everything else comes from the manifests.
SHORT_RUN = [
    "--set",
    "training.max_steps=20",
    "--set",
    "checkpoint.every_n_steps=10",
    "--set",
    "training.report_every_n_steps=10",
    "--set",
    "task.options.demo_rows=1024",
]
HEAD_READY_S = 120
WORKERS_READY_S = 180
JOB_DONE_S = 300


def docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"docker {' '.join(args[:3])} ... failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
        )
    return proc


def poll(what: str, deadline_s: float, probe: Callable[[], Any], every_s: float = 1.0) -> Any:
    """Call probe until it returns something truthy; fail with `what` after deadline_s."""
    deadline, last = time.monotonic() + deadline_s, None
    while time.monotonic() < deadline:
        try:
            last = probe()
            if last:
                return last
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            last = exc
        time.sleep(every_s)
    raise AssertionError(f"{what}: not reached within {deadline_s:.0f}s (last: {last!r})")


def http(url: str, token: str | None = None, timeout: float = 5) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


class PodSandbox:
    """The Docker objects standing in for one RayCluster; removed by cleanup()."""

    def __init__(self, cluster: dict[str, Any], image: str, workdir: Path) -> None:
        self.cluster, self.image = cluster, image
        self.name = cluster["metadata"]["name"]
        self.fqdn = head_service_fqdn(self.name)
        self.token = secrets.token_hex(32)  # `openssl rand -hex 32` in the README
        uid = secrets.token_hex(3)
        self.prefix = f"et-kuberay-{uid}"
        self.network, self.storage_volume = f"{self.prefix}-net", f"{self.prefix}-storage"
        self.config_dirs: dict[str, Path] = {}
        self.workdir = workdir
        self.containers: list[str] = []

    # ---- Docker objects from the manifest

    def create_network_and_volume(self) -> None:
        docker("network", "create", self.network)
        docker("volume", "create", self.storage_volume)

    def config_dir(self, source: dict[str, Any]) -> Path:
        """A ConfigMap volume: a directory holding exactly its items."""
        path = self.workdir / f"configmap-{source['name']}"
        if not path.exists():
            path.mkdir(mode=0o755)
            path.chmod(0o755)
            for item in source["items"]:
                target = path / item["path"]
                shutil.copyfile(CONFIG_SOURCE_DIR / item["key"], target)
                target.chmod(0o644)
        return path

    def volume_args(self, group: dict[str, Any]) -> list[str]:
        spec, container = group["template"]["spec"], ray_container(group)
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        args = []
        for mount in container.get("volumeMounts", []):
            source, path = volumes[mount["name"]], mount["mountPath"]
            if "persistentVolumeClaim" in source:
                args += ["--mount", f"type=volume,src={self.storage_volume},dst={path}"]
            elif "configMap" in source:
                src = self.config_dir(source["configMap"])
                args += ["--mount", f"type=bind,src={src},dst={path},readonly"]
            elif source.get("emptyDir", {}).get("medium") == "Memory" and path == "/dev/shm":
                args += [f"--shm-size={quantity_value(source['emptyDir']['sizeLimit'])}"]
            elif "emptyDir" in source:
                # An emptyDir is an empty, world-writable directory.
                args += ["--mount", f"type=tmpfs,dst={path},tmpfs-mode=1777"]
            else:
                raise AssertionError(f"volume {mount['name']}: no Docker stand-in for {source}")
        return args

    def security_args(self, group: dict[str, Any]) -> list[str]:
        pod = group["template"]["spec"].get("securityContext", {})
        container = ray_container(group).get("securityContext", {})
        args = ["--user", f"{pod['runAsUser']}:{pod['runAsGroup']}"]
        if "fsGroup" in pod:
            args += ["--group-add", str(pod["fsGroup"])]
        if container.get("allowPrivilegeEscalation") is False:
            args += ["--security-opt", "no-new-privileges"]
        for capability in container.get("capabilities", {}).get("drop", []):
            args += ["--cap-drop", capability]
        return args

    def resource_args(self, group: dict[str, Any]) -> list[str]:
        limits = ray_container(group)["resources"]["limits"]
        memory = str(quantity_value(limits["memory"]))
        # Docker refuses more CPUs than the machine has; Ray's CPU count comes from the flags.
        cpus = min(float(parse_quantity(limits["cpu"])), float(os.cpu_count() or 1))
        return ["--memory", memory, "--memory-swap", memory, "--cpus", f"{cpus:g}"]

    def run_pod(
        self, group: dict[str, Any], node_type: str, pod_name: str, extra: list[str]
    ) -> str:
        container = f"{self.prefix}-{pod_name}"
        env = manifest_env(ray_container(group))
        env.update(
            operator_env(
                cluster_name=self.name,
                group_name=group.get("groupName", "headgroup"),
                node_type=node_type,
                pod_name=pod_name,
                head_fqdn=self.fqdn,
                ray_start_cmd=ray_start_command(group, node_type, self.fqdn),
                auth_token=self.token,
            )
        )
        args = ["run", "--detach", "--name", container, "--hostname", pod_name]
        args += ["--network", self.network, *extra]
        args += self.security_args(group) + self.resource_args(group) + self.volume_args(group)
        args += [arg for key, value in env.items() for arg in ("--env", f"{key}={value}")]
        args += ["--entrypoint", CONTAINER_COMMAND[0], self.image, *CONTAINER_COMMAND[1:]]
        # Where the engine's hard open-files limit is below 65536, the operator's `ulimit -n
        # 65536` prints an error and `ray start` runs anyway (`;`), as on such a node.
        args += [container_args(group, node_type, self.fqdn)]
        self.containers.append(container)
        docker(*args)
        return container

    def run_init_container(self, group: dict[str, Any], pod_name: str) -> None:
        """The operator's wait-gcs-ready init container: same image, env and user."""
        env = {
            **manifest_env(ray_container(group)),
            "FQ_RAY_IP": self.fqdn,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
        }
        args = ["run", "--rm", "--name", f"{self.prefix}-{pod_name}-init"]
        args += ["--network", self.network, *self.security_args(group)]
        args += [arg for key, value in env.items() for arg in ("--env", f"{key}={value}")]
        args += ["--entrypoint", CONTAINER_COMMAND[0], self.image, *CONTAINER_COMMAND[1:]]
        docker(*args, wait_gcs_ready_script(self.fqdn), timeout=180)

    # ---- observations

    def ip(self, container: str) -> str:
        fmt = "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}"
        return docker("inspect", "--format", fmt, container).stdout.strip()

    def running(self, container: str) -> None:
        state = docker("inspect", "--format", "{{.State.Status}}", container).stdout.strip()
        if state != "running":
            raise AssertionError(f"{container} is {state}:\n{self.logs(container)}")

    def probe(self, container: str, port: int, path: str) -> bool:
        """Like the kubelet's HTTP probe: pod IP, no token; a dead container fails at once."""
        self.running(container)
        status, _ = http(f"http://{self.ip(container)}:{port}{path}")
        return status == 200

    def host_port(self, container: str, port: int) -> int:
        mapping = docker("port", container, f"{port}/tcp").stdout.split()[0]
        return int(mapping.rsplit(":", 1)[1])

    def logs(self, container: str, tail: int = 60) -> str:
        proc = docker("logs", "--tail", str(tail), container, check=False)
        return f"--- {container} ---\n{proc.stdout[-6000:]}{proc.stderr[-6000:]}"

    def all_logs(self) -> str:
        return "\n".join(self.logs(c) for c in self.containers)

    def cleanup(self) -> None:
        for container in self.containers:
            docker("rm", "--force", "--volumes", container, check=False)
        docker("network", "rm", self.network, check=False)
        docker("volume", "rm", "--force", self.storage_volume, check=False)


def alive_nodes(dashboard: str, token: str) -> int:
    status, body = http(f"{dashboard}/api/v0/nodes?limit=100", token)
    if status != 200:
        raise ValueError(f"GET /api/v0/nodes: {status} {body[:200]}")
    nodes = json.loads(body)["data"]["result"]["result"]
    return sum(node.get("state") == "ALIVE" for node in nodes)


def submit(dashboard: str, token: str, submission_id: str, entrypoint: list[str]) -> None:
    """`ray job submit` from this machine, as the README does through the port-forward."""
    ray_cli = Path(sys.executable).with_name("ray")
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    cmd = [str(ray_cli), "job", "submit", "--address", dashboard]
    cmd += ["--submission-id", submission_id, "--no-wait", "--", *entrypoint]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert proc.returncode == 0, f"ray job submit failed:\n{proc.stdout}\n{proc.stderr}"


def job_status(dashboard: str, token: str, submission_id: str) -> str:
    status, body = http(f"{dashboard}/api/jobs/{submission_id}", token)
    if status != 200:
        raise ValueError(f"GET /api/jobs/{submission_id}: {status} {body[:200]}")
    state = json.loads(body)["status"]
    return state if state in ("SUCCEEDED", "FAILED", "STOPPED") else ""


def run_pod_contract(image: str, workdir: Path, sandbox_out: list[PodSandbox]) -> dict[str, Any]:
    """Start the pods, run the job, return `verify --json`; the caller cleans up."""
    manifests = all_manifests()
    cluster, job = one("RayCluster", manifests), one("RayJob", manifests)
    head, (workers,) = cluster["spec"]["headGroupSpec"], cluster["spec"]["workerGroupSpecs"]
    pods = PodSandbox(cluster, image, workdir)
    sandbox_out.append(pods)
    pods.create_network_and_volume()

    head_pod = f"{pods.name}-head-{secrets.token_hex(3)[:5]}"
    aliases = ["--network-alias", pods.fqdn, "--network-alias", pods.fqdn.split(".")[0]]
    head_container = pods.run_pod(
        head, "head", head_pod, [*aliases, "--publish", f"127.0.0.1::{DASHBOARD_PORT}"]
    )
    poll(
        "head readiness (node health on the agent port, GCS health on the dashboard)",
        HEAD_READY_S,
        lambda: (
            pods.probe(head_container, DASHBOARD_AGENT_PORT, NODE_HEALTH_PATH)
            and pods.probe(head_container, DASHBOARD_PORT, GCS_HEALTH_PATH)
        ),
    )
    dashboard = f"http://127.0.0.1:{pods.host_port(head_container, DASHBOARD_PORT)}"
    status, _ = http(f"{dashboard}/api/jobs/")
    assert status == 401, f"the job API answered {status} without a token: auth is off"

    worker_containers = []
    for _ in range(workers["replicas"]):
        pod = f"{pods.name}-{workers['groupName']}-worker-{secrets.token_hex(3)[:5]}"
        pods.run_init_container(workers, pod)
        worker_containers.append(pods.run_pod(workers, "worker", pod, []))
    for container in worker_containers:
        poll(
            f"{container} readiness",
            WORKERS_READY_S,
            lambda c=container: pods.probe(c, DASHBOARD_AGENT_PORT, NODE_HEALTH_PATH),
        )
    expected_nodes = 1 + workers["replicas"]
    poll(
        f"{expected_nodes} alive Ray nodes",
        WORKERS_READY_S,
        lambda: alive_nodes(dashboard, pods.token) == expected_nodes,
    )

    submission_id = f"kuberay-contract-{secrets.token_hex(4)}"
    submit(dashboard, pods.token, submission_id, [*entrypoint_args(job), *SHORT_RUN])
    final = poll(
        "training job end", JOB_DONE_S, lambda: job_status(dashboard, pods.token, submission_id), 3
    )
    _, job_logs = http(f"{dashboard}/api/jobs/{submission_id}/logs", pods.token)
    print(json.loads(job_logs).get("logs", "")[-4000:])
    assert final == "SUCCEEDED", f"job {final}:\n{job_logs[-6000:]}\n{pods.all_logs()}"

    config_path, run_name = entrypoint_flag(job, "--config"), entrypoint_flag(job, "--name")
    verify = docker(
        "exec", head_container, "python", "-m", "training", "verify",
        "--config", str(config_path), "--name", str(run_name), "--json",
        timeout=120, check=False,
    )  # fmt: skip
    assert verify.returncode == 0, f"verify failed:\n{verify.stdout}\n{verify.stderr}"
    report = json.loads(verify.stdout.strip().splitlines()[-1])
    report["expected_world_size"] = workers["replicas"]
    return report


def test_kuberay_pods_run_the_training_job(project_image: str, tmp_path: Path) -> None:
    cluster = one("RayCluster", all_manifests())
    for group in (cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]):
        assert ray_container(group)["image"] == project_image
    sandboxes: list[PodSandbox] = []
    try:
        report = run_pod_contract(project_image, tmp_path, sandboxes)
    except AssertionError:
        if sandboxes:
            print(sandboxes[0].all_logs())
        raise
    finally:
        for sandbox in sandboxes:
            sandbox.cleanup()
    print("verify:", json.dumps(report))
    assert report["ok"] is True, report
    # One training worker per worker pod, none on the head (num-cpus "0").
    assert report["world_sizes"] == [report["expected_world_size"]], report
