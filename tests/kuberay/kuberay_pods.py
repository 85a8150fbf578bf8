"""What the KubeRay operator (v1.7) makes of a head or worker group: the container command
line, the environment it adds, the probes' endpoints. A model of the operator's pod builder
(ray-operator/controllers/ray/common/pod.go), used offline by tests/kuberay and, with the real
image, by tests/e2e/test_kuberay_pod_contract.py.

    head:   /bin/bash -lc -- "ulimit -n 65536; ray start --head --block --dashboard-host=0.0.0.0
                              --metrics-export-port=8080 <rayStartParams as --key=value>"
    worker: /bin/bash -lc -- "ulimit -n 65536; ray start --address=<head-svc FQDN>:6379 --block
                              --metrics-export-port=8080 <rayStartParams>"

The flags come out sorted by name, as the operator writes them; "true" becomes a bare flag and
"false" drops it (except the tri-state log-color / include-dashboard).
"""

from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Any

# The operator starts the Ray container through a login shell: the image's PATH must survive
# /etc/profile (Debian's resets PATH for login shells).
CONTAINER_COMMAND = ["/bin/bash", "-lc", "--"]
ULIMIT = "ulimit -n 65536"
GCS_PORT = "6379"
DASHBOARD_PORT = 8265
DASHBOARD_AGENT_PORT = 52365
METRICS_PORT = "8080"
# Ray >= 2.53: KubeRay's liveness/readiness probes are HTTP GETs of the node health endpoint on
# the dashboard agent's port (older Ray: wget of local_raylet_healthz / gcs_healthz).
NODE_HEALTH_PATH = "/api/healthz"
GCS_HEALTH_PATH = "/api/gcs_healthz"
TRI_STATE_PARAMS = ("log-color", "include-dashboard")
AUTH_TOKEN_SECRET_KEY = "auth_token"

_SUFFIXES = {
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
    "n": Fraction(1, 10**9),
    "u": Fraction(1, 10**6),
    "m": Fraction(1, 10**3),
    "": 1,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
}
_QUANTITY = re.compile(
    r"^([+-]?(?:\d+(?:\.\d*)?|\.\d+))(?:([eE][+-]?\d+)|([KMGTPE]i|[numkMGTPE]))?$"
)


def parse_quantity(value: Any) -> Fraction:
    """A Kubernetes resource quantity ("500m", "4Gi", 2, "1e3") as an exact number."""
    match = _QUANTITY.match(str(value).strip())
    if not match:
        raise ValueError(f"not a Kubernetes quantity: {value!r}")
    number, exponent, suffix = match.groups()
    scale = Fraction(10) ** int(exponent[1:]) if exponent else Fraction(_SUFFIXES[suffix or ""])
    return Fraction(number) * scale


def quantity_value(value: Any) -> int:
    """resource.Quantity.Value(): the integer value, rounded up (away from zero)."""
    return math.ceil(parse_quantity(value))


def ray_container(group: dict[str, Any]) -> dict[str, Any]:
    """The Ray container of a group's pod template (KubeRay: the first container)."""
    return group["template"]["spec"]["containers"][0]


def head_service_fqdn(cluster_name: str, namespace: str = "default") -> str:
    return f"{cluster_name}-head-svc.{namespace}.svc.cluster.local"


def ray_start_params(group: dict[str, Any], node_type: str, head_fqdn: str) -> dict[str, str]:
    """rayStartParams completed the way the operator completes them."""
    params = dict(group.get("rayStartParams") or {})
    if node_type == "worker":
        params.setdefault("address", f"{head_fqdn}:{params.get('port', GCS_PORT)}")
    else:
        params.setdefault("dashboard-host", "0.0.0.0")
    params.setdefault("metrics-export-port", METRICS_PORT)
    params["block"] = "true"
    limits = ray_container(group).get("resources", {}).get("limits", {})
    requests = ray_container(group).get("resources", {}).get("requests", {})
    cpu = limits.get("cpu", requests.get("cpu"))
    if "num-cpus" not in params and cpu is not None and parse_quantity(cpu) != 0:
        params["num-cpus"] = str(quantity_value(cpu))
    if "memory" not in params and limits.get("memory") is not None:
        params["memory"] = str(quantity_value(limits["memory"]))
    gpus = [v for k, v in sorted(limits.items()) if k.endswith("gpu") and parse_quantity(v)]
    if "num-gpus" not in params and gpus:
        params["num-gpus"] = str(quantity_value(gpus[0]))
    return params


def convert_param_map(params: dict[str, str]) -> str:
    flags = []
    for key in sorted(params):
        value = str(params[key])
        if value.lower() in ("true", "false") and key not in TRI_STATE_PARAMS:
            if value.lower() == "true":
                flags.append(f"--{key}")
        else:
            flags.append(f"--{key}={value}")
    return " ".join(flags)


def ray_start_command(group: dict[str, Any], node_type: str, head_fqdn: str) -> str:
    head = " --head" if node_type == "head" else ""
    params = convert_param_map(ray_start_params(group, node_type, head_fqdn))
    return f"ray start{head} {params}"


def container_args(group: dict[str, Any], node_type: str, head_fqdn: str) -> str:
    """The single argument the operator passes to CONTAINER_COMMAND."""
    return f"{ULIMIT}; {ray_start_command(group, node_type, head_fqdn)}"


def operator_env(
    *,
    cluster_name: str,
    group_name: str,
    node_type: str,
    pod_name: str,
    head_fqdn: str,
    ray_start_cmd: str,
    auth_token: str | None,
) -> dict[str, str]:
    """Environment variables the operator appends to the Ray container (fieldRefs resolved)."""
    ip = "127.0.0.1" if node_type == "head" else head_fqdn
    env = {}
    if node_type == "worker":
        env["FQ_RAY_IP"] = head_fqdn
        env["RAY_IP"] = head_fqdn.split(".")[0]
    env.update(
        {
            "RAY_CLUSTER_NAME": cluster_name,
            "RAY_CLOUD_INSTANCE_ID": pod_name,
            "RAY_NODE_TYPE_NAME": group_name,
            "KUBERAY_GEN_RAY_START_CMD": ray_start_cmd,
            "RAY_PORT": GCS_PORT,
            "RAY_ADDRESS": f"{ip}:{GCS_PORT}",
            "RAY_USAGE_STATS_KUBERAY_IN_USE": "1",
            "RAY_DASHBOARD_ENABLE_K8S_DISK_USAGE": "1",
        }
    )
    if node_type == "head":
        env["RAY_USAGE_STATS_EXTRA_TAGS"] = "kuberay_version=v1.7.0;kuberay_crd=RayCluster"
    if auth_token is not None:
        # authOptions.mode=token: from the Secret's `auth_token` key via secretKeyRef.
        env["RAY_AUTH_MODE"] = "token"
        env["RAY_AUTH_TOKEN"] = auth_token
    return env


def manifest_env(container: dict[str, Any]) -> dict[str, str]:
    """The container's own `env` (literal values only: a test cannot resolve other sources)."""
    env = {}
    for var in container.get("env", []):
        if "value" not in var:
            raise ValueError(f"env {var['name']}: only literal values can be reproduced offline")
        env[var["name"]] = str(var["value"])
    return env


def wait_gcs_ready_script(head_fqdn: str) -> str:
    """The worker's injected init container: block until the head's GCS answers."""
    return (
        "SECONDS=0; until ray health-check --address "
        f"{head_fqdn}:{GCS_PORT} >/dev/null 2>&1; do "
        'if (( SECONDS > 120 )); then echo "GCS not ready"; exit 1; fi; sleep 1; done; '
        'echo "GCS is ready."'
    )
