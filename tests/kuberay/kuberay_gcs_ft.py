"""Rules for the RayCluster's head fault tolerance (gcsFaultToleranceOptions) that no schema
holds: the Redis it names exists in kuberay/ (a Service on that port in front of a redis-server
that keeps its data on a volume), the password comes from the same Secret on both sides, and
nothing else switches fault tolerance on behind the operator's back.

Each check returns one-line errors; an empty list means the rule holds.
"""

from __future__ import annotations

from typing import Any

from kuberay_invariants import ident

REDIS_NAME = "elastic-trainer-redis"
# Set by the operator from gcsFaultToleranceOptions; KubeRay refuses a cluster that also sets
# them by hand (or the old annotation).
OPERATOR_OWNED_ENV = ("RAY_REDIS_ADDRESS", "RAY_REDIS_PASSWORD", "RAY_REDIS_USERNAME")
OLD_FT_ANNOTATION = "ray.io/ft-enabled"


def by_kind(manifests: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {m["metadata"]["name"]: m for m in manifests if m.get("kind") == kind}


def flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args[:-1] else None


def redis_deployment(service: dict[str, Any], manifests: list[dict[str, Any]]):
    """The Deployment whose pods the Service selects, or None."""
    selector = service["spec"].get("selector") or {}
    for deployment in by_kind(manifests, "Deployment").values():
        labels = deployment["spec"]["template"]["metadata"].get("labels") or {}
        if selector and all(labels.get(k) == v for k, v in selector.items()):
            return deployment
    return None


def options_errors(cluster: dict[str, Any]) -> list[str]:
    who, spec = ident(cluster), cluster["spec"]
    options = spec.get("gcsFaultToleranceOptions")
    if not isinstance(options, dict):
        return [f"{who}: gcsFaultToleranceOptions missing: a lost head would lose the cluster"]
    errors = []
    if options.get("backend", "redis") != "redis":
        errors.append(
            f"{who}: gcsFaultToleranceOptions.backend must be redis (kuberay/ ships Redis)"
        )
    password = options.get("redisPassword") or {}
    if "value" in password or "secretKeyRef" not in (password.get("valueFrom") or {}):
        errors.append(f"{who}: redisPassword must come from a Secret (valueFrom.secretKeyRef)")
    annotations = cluster["metadata"].get("annotations") or {}
    if OLD_FT_ANNOTATION in annotations:
        errors.append(
            f"{who}: annotation {OLD_FT_ANNOTATION} conflicts with gcsFaultToleranceOptions"
        )
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    for env in head.get("env") or []:
        if env["name"] in OPERATOR_OWNED_ENV:
            errors.append(f"{who}: head env {env['name']} is set by the operator from the options")
    return errors


def redis_errors(cluster: dict[str, Any], manifests: list[dict[str, Any]]) -> list[str]:
    """The Redis behind redisAddress: a Service on that port, a redis-server with the same
    password Secret, append-only data on a PersistentVolumeClaim, one replica."""
    who, options = ident(cluster), cluster["spec"].get("gcsFaultToleranceOptions") or {}
    host, _, port = options.get("redisAddress", "").removeprefix("redis://").partition(":")
    service = by_kind(manifests, "Service").get(host)
    if service is None:
        return [f"{who}: redisAddress host {host!r} is no Service in kuberay/"]
    ports = {str(p["port"]): p for p in service["spec"].get("ports", [])}
    if port not in ports:
        return [f"{who}: Service {host} has no port {port!r} (has {sorted(ports)})"]
    deployment = redis_deployment(service, manifests)
    if deployment is None:
        return [f"{who}: Service {host} selects no Deployment in kuberay/"]
    return _redis_pod_errors(deployment, ports[port], options, manifests)


def _redis_pod_errors(deployment, service_port, options, manifests) -> list[str]:
    who, spec = ident(deployment), deployment["spec"]
    pod = spec["template"]["spec"]
    container = pod["containers"][0]
    args = [*container.get("command", []), *container.get("args", [])]
    errors = []
    if args[:1] != ["redis-server"]:
        return [f"{who}: container does not run redis-server ({args[:1]})"]
    named = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
    target = service_port.get("targetPort", service_port["port"])
    target_port = named.get(target, target)
    if str(flag(args, "--port") or 6379) != str(target_port):
        errors.append(f"{who}: redis-server --port {flag(args, '--port')} != Service targetPort")
    if flag(args, "--appendonly") != "yes":
        errors.append(f"{who}: redis-server needs --appendonly yes, or a restart loses the GCS")
    errors += _data_volume_errors(who, pod, container, flag(args, "--dir"), manifests)
    errors += _password_errors(who, container, flag(args, "--requirepass"), options)
    if spec.get("replicas", 1) != 1 or (spec.get("strategy") or {}).get("type") != "Recreate":
        errors.append(f"{who}: one replica with strategy Recreate (one writer of the data)")
    return errors


def _data_volume_errors(who, pod, container, data_dir, manifests) -> list[str]:
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    claim = (volumes.get(mounts.get(data_dir), {}).get("persistentVolumeClaim") or {}).get(
        "claimName"
    )
    if claim is None:
        return [f"{who}: redis --dir {data_dir!r} is not on a PersistentVolumeClaim"]
    if claim not in by_kind(manifests, "PersistentVolumeClaim"):
        return [f"{who}: claim {claim!r} is not in kuberay/"]
    return []


def _password_errors(who, container, requirepass, options) -> list[str]:
    wanted = ((options.get("redisPassword") or {}).get("valueFrom") or {}).get("secretKeyRef")
    env = {e["name"]: e for e in container.get("env", [])}
    var = (requirepass or "").removeprefix("$(").removesuffix(")")
    ref = ((env.get(var) or {}).get("valueFrom") or {}).get("secretKeyRef")
    if not requirepass or ref is None:
        return [f"{who}: redis-server needs --requirepass $(VAR) with VAR from a Secret"]
    if wanted and (ref.get("name"), ref.get("key")) != (wanted.get("name"), wanted.get("key")):
        return [f"{who}: Redis password Secret {ref} differs from the RayCluster's {wanted}"]
    return []


def gcs_ft_errors(cluster: dict[str, Any], manifests: list[dict[str, Any]]) -> list[str]:
    errors = options_errors(cluster)
    return errors or redis_errors(cluster, manifests)


# Ray's default RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S: how long `ray start` drains on SIGTERM.
RAY_DRAIN_WINDOW_S = 30


def drain_grace_errors(manifest: dict[str, Any]) -> list[str]:
    """Worker pods must outlive Ray's drain window, or a drained node is killed mid-checkpoint."""
    spec = manifest["spec"].get("rayClusterSpec", manifest["spec"])
    errors = []
    for group in spec["workerGroupSpecs"]:
        grace = group["template"]["spec"].get("terminationGracePeriodSeconds", 30)
        if grace <= RAY_DRAIN_WINDOW_S:
            errors.append(
                f"{ident(manifest)} group {group['groupName']}: terminationGracePeriodSeconds "
                f"{grace} must exceed Ray's {RAY_DRAIN_WINDOW_S} s drain window"
            )
    return errors
