"""Container healthchecks for the Compose Ray cluster: "ready", not just "a process exists".

    python /app/cluster/healthcheck.py head     # GCS up and the job API serves authenticated calls
    python /app/cluster/healthcheck.py worker   # this node's raylet is registered ALIVE in the GCS

Exit 0 when ready, 1 otherwise with one line saying why (shown by `docker inspect`).
The token comes from RAY_AUTH_TOKEN, as for every other Ray client on the node.
"""

from __future__ import annotations

import os
import socket
import sys
import urllib.request

LOCAL_DASHBOARD = "http://127.0.0.1:8265"
HEAD_DASHBOARD = os.environ.get("RAY_HEAD_DASHBOARD", "http://head:8265")


def http_get(url: str, token: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, response.read(200).decode(errors="replace")


def head_ready() -> str | None:
    # /api/gcs_healthz answers "success" only while the dashboard reaches a live GCS.
    status, body = http_get(f"{LOCAL_DASHBOARD}/api/gcs_healthz")
    if status != 200 or "success" not in body:
        return f"GCS not healthy: {status} {body!r}"
    # The job API with the node's token: proves the submitters' path (and the token) works.
    status, _ = http_get(f"{LOCAL_DASHBOARD}/api/jobs/", os.environ.get("RAY_AUTH_TOKEN"))
    return None if status == 200 else f"job API answered {status}"


def worker_ready() -> str | None:
    from ray.util.state import list_nodes  # imported here: only the worker check needs Ray

    my_ip = socket.gethostbyname(socket.gethostname())
    nodes = list_nodes(address=HEAD_DASHBOARD, filters=[("node_ip", "=", my_ip)], timeout=10)
    if any(node.state == "ALIVE" for node in nodes):
        return None
    return f"no ALIVE Ray node with IP {my_ip} in the cluster ({len(nodes)} found)"


def main(role: str) -> int:
    checks = {"head": head_ready, "worker": worker_ready}
    if role not in checks:
        print(f"usage: healthcheck.py {{{'|'.join(checks)}}}", file=sys.stderr)
        return 2
    try:
        problem = checks[role]()
    except Exception as exc:  # any failure to ask means "not ready yet"
        problem = f"{type(exc).__name__}: {exc}"
    if problem:
        print(f"{role} not ready: {problem}")
        return 1
    print(f"{role} ready")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else ""))
