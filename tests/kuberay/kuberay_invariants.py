"""Rules for the manifests in kuberay/ that no schema can express: name lengths, replica ranges
against the trainer's config, one image everywhere, requests == limits, shared memory and log
volumes, one shared storage volume at one path, token auth, RayJob retry/cleanup settings.

Every check takes parsed manifests (dicts) and returns a list of one-line errors naming the
object and the field; an empty list means the rule holds. The tests feed them the real files
and deliberately broken copies.
"""

from __future__ import annotations

import posixpath
import re
import shlex
from pathlib import Path
from typing import Any

import yaml
from kuberay_pods import parse_quantity, ray_start_params

from training.core.config import Config

REPO_ROOT = Path(__file__).resolve().parents[2]
KUBERAY_DIR = REPO_ROOT / "kuberay"
TRAIN_CONFIG = KUBERAY_DIR / "config" / "train.yaml"
BUILD_SCRIPT = REPO_ROOT / "docker" / "build-image.sh"
PYPROJECT = REPO_ROOT / "pyproject.toml"
IMAGE_REQUIREMENTS = REPO_ROOT / "docker" / "requirements.txt"

MAX_RAYCLUSTER_NAME = 53
MAX_RAYJOB_NAME = 47
# The RayJob's cluster is named <rayjob>-<5 random characters>.
RAYJOB_CLUSTER_SUFFIX = len("-abcde")
SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
# The trainer config's top-level sections, from the config model itself.
CONFIG_SECTIONS = set(Config.model_fields)
SHM_PATH = "/dev/shm"
RAY_TMP_PATH = "/tmp/ray"


# ---------------------------------------------------------------- loading


def load_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def kubectl_apply_files(directory: Path = KUBERAY_DIR) -> list[Path]:
    """The files `kubectl apply -f DIR` reads: .yaml/.yml/.json directly in DIR."""
    return sorted(p for p in directory.iterdir() if p.suffix in (".yaml", ".yml", ".json"))


def manifest_files() -> list[Path]:
    """Everything meant for `kubectl apply`: kuberay/ itself and the separate RayJob folder."""
    return kubectl_apply_files() + kubectl_apply_files(KUBERAY_DIR / "batch")


def all_manifests() -> list[dict[str, Any]]:
    return [doc for path in manifest_files() for doc in load_documents(path)]


def one(kind: str, manifests: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    found = [m for m in (manifests or all_manifests()) if m.get("kind") == kind]
    assert len(found) == 1, f"expected exactly one {kind} in kuberay/, found {len(found)}"
    return found[0]


def train_config(path: Path = TRAIN_CONFIG) -> dict[str, Any]:
    """The training config as plain YAML (the `training` package is not imported here)."""
    return yaml.safe_load(path.read_text())


def ident(manifest: dict[str, Any]) -> str:
    return f"{manifest.get('kind', '?').lower()}/{manifest.get('metadata', {}).get('name', '?')}"


def cluster_spec(manifest: dict[str, Any]) -> dict[str, Any]:
    """The RayCluster spec of a RayCluster, or the one a RayJob creates."""
    return (
        manifest["spec"] if manifest["kind"] == "RayCluster" else manifest["spec"]["rayClusterSpec"]
    )


def groups(manifest: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(label, node type, group spec) for the head group and every worker group."""
    spec = cluster_spec(manifest)
    out = [(f"{ident(manifest)} headGroupSpec", "head", spec["headGroupSpec"])]
    for i, group in enumerate(spec.get("workerGroupSpecs", [])):
        label = f"{ident(manifest)} workerGroupSpecs[{i}] ({group.get('groupName')})"
        out.append((label, "worker", group))
    return out


def pod_specs(manifest: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Every pod spec a manifest makes: Ray groups, and a RayJob's submitter."""
    out = [(label, group["template"]["spec"]) for label, _, group in groups(manifest)]
    if manifest["kind"] == "RayJob" and "submitterPodTemplate" in manifest["spec"]:
        out.append(
            (
                f"{ident(manifest)} submitterPodTemplate",
                manifest["spec"]["submitterPodTemplate"]["spec"],
            )
        )
    return out


def containers(pod_spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod_spec.get("initContainers", []), *pod_spec.get("containers", [])]


# ---------------------------------------------------------------- kubectl apply -f kuberay/


def apply_dir_errors(paths: list[Path]) -> list[str]:
    """Every document `kubectl apply -f kuberay/` reads must be a Kubernetes object."""
    errors = []
    for path in paths:
        try:
            docs = load_documents(path)
        except yaml.YAMLError as exc:
            errors.append(f"{path.name}: not YAML: {exc}")
            continue
        for doc in docs:
            if not isinstance(doc, dict) or not {"apiVersion", "kind", "metadata"} <= doc.keys():
                errors.append(f"{path.name}: a document without apiVersion/kind/metadata")
            elif not doc["metadata"].get("name"):
                errors.append(f"{path.name}: {doc['kind']} without metadata.name")
    return errors


# ---------------------------------------------------------------- names


def name_errors(manifest: dict[str, Any]) -> list[str]:
    name = manifest.get("metadata", {}).get("name", "")
    kind = manifest["kind"]
    errors = []
    if not DNS1035_LABEL.match(name):
        errors.append(f"{ident(manifest)}: name must be a DNS-1035 label (a-z, 0-9, '-')")
    if kind == "RayCluster" and len(name) > MAX_RAYCLUSTER_NAME:
        errors.append(
            f"{ident(manifest)}: RayCluster name has {len(name)} > {MAX_RAYCLUSTER_NAME} characters"
        )
    if kind == "RayJob":
        if len(name) > MAX_RAYJOB_NAME:
            errors.append(
                f"{ident(manifest)}: RayJob name has {len(name)} > {MAX_RAYJOB_NAME} characters"
            )
        generated = len(name) + RAYJOB_CLUSTER_SUFFIX
        if generated > MAX_RAYCLUSTER_NAME:
            errors.append(
                f"{ident(manifest)}: generated RayCluster name has {generated} > "
                f"{MAX_RAYCLUSTER_NAME} characters"
            )
    return errors


# ---------------------------------------------------------------- replicas and the trainer


def replica_errors(manifest: dict[str, Any]) -> list[str]:
    """minReplicas <= replicas <= maxReplicas (the operator would silently clamp otherwise)."""
    errors = []
    for label, node_type, group in groups(manifest):
        if node_type != "worker":
            continue
        low, high = group.get("minReplicas", 0), group.get("maxReplicas", 2**31 - 1)
        replicas = group.get("replicas", 0)
        if low > high:
            errors.append(f"{label}: minReplicas {low} > maxReplicas {high}")
        if not low <= replicas <= high:
            errors.append(
                f"{label}: replicas {replicas} outside minReplicas..maxReplicas {low}..{high}"
            )
    return errors


def worker_num_cpus(group: dict[str, Any]) -> float | None:
    """The Ray CPUs a worker pod offers: rayStartParams num-cpus, else from its CPU limit."""
    value = ray_start_params(group, "worker", "head").get("num-cpus")
    return None if value is None else float(value)


def trainer_errors(manifest: dict[str, Any], config: dict[str, Any]) -> list[str]:
    """The worker group must give the trainer exactly its elastic range, one worker per pod."""
    scaling = config.get("scaling", {})
    workers = [(label, g) for label, t, g in groups(manifest) if t == "worker"]
    if len(workers) != 1:
        return [f"{ident(manifest)}: expected one worker group, found {len(workers)}"]
    label, group = workers[0]
    errors = []
    for replicas_key, scaling_key in (
        ("minReplicas", "min_workers"),
        ("maxReplicas", "max_workers"),
    ):
        if group.get(replicas_key) != scaling.get(scaling_key):
            errors.append(
                f"{label}: {replicas_key} {group.get(replicas_key)} != scaling.{scaling_key} "
                f"{scaling.get(scaling_key)} of the training config"
            )
    per_worker = scaling.get("cpus_per_worker", 1)
    cpus = worker_num_cpus(group)
    if cpus is None or not per_worker <= cpus < 2 * per_worker:
        errors.append(
            f"{label}: a worker pod offers {cpus} Ray CPUs; scaling.cpus_per_worker {per_worker} "
            "must fit exactly once (one training worker per pod)"
        )
    limits = group["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
    has_gpu = any(k.endswith("gpu") and parse_quantity(v) for k, v in limits.items())
    if bool(scaling.get("use_gpu")) != has_gpu:
        errors.append(
            f"{label}: scaling.use_gpu {scaling.get('use_gpu')} but GPU limit present={has_gpu}"
        )
    return errors


def config_errors(config: dict[str, Any]) -> list[str]:
    """Sanity of the training config itself, as far as plain YAML tells."""
    errors = [f"train.yaml: unknown section {s!r}" for s in sorted(set(config) - CONFIG_SECTIONS)]
    scaling, batch = config.get("scaling", {}), config.get("training", {}).get("global_batch_size")
    low, high = scaling.get("min_workers", 0), scaling.get("max_workers", 0)
    if low > high:
        errors.append(f"train.yaml: scaling.min_workers {low} > max_workers {high}")
    if batch is not None:
        bad = [w for w in range(max(low, 1), high + 1) if batch % w]
        if bad:
            errors.append(
                f"train.yaml: global_batch_size {batch} not divisible by world sizes {bad}"
            )
    return errors


# ---------------------------------------------------------------- head, params, images, resources


def head_errors(manifest: dict[str, Any]) -> list[str]:
    params = cluster_spec(manifest)["headGroupSpec"].get("rayStartParams", {})
    if params.get("num-cpus") != "0":
        return [
            f'{ident(manifest)} headGroupSpec: rayStartParams num-cpus must be "0", '
            f"got {params.get('num-cpus')!r}"
        ]
    return []


def ray_start_param_errors(manifest: dict[str, Any]) -> list[str]:
    errors = []
    for label, _, group in groups(manifest):
        for key, value in (group.get("rayStartParams") or {}).items():
            if not isinstance(value, str):
                errors.append(
                    f"{label}: rayStartParams {key} must be a string, "
                    f"got {type(value).__name__} {value!r}"
                )
    return errors


def image_errors(manifest: dict[str, Any], expected: str) -> list[str]:
    """Every container of every pod runs the project image (same tag head/workers/submitter)."""
    errors = []
    for label, spec in pod_specs(manifest):
        for container in containers(spec):
            if container.get("image") != expected:
                errors.append(
                    f"{label} container {container.get('name')}: "
                    f"image {container.get('image')!r} != {expected!r}"
                )
    return errors


def resource_errors(manifest: dict[str, Any]) -> list[str]:
    """requests == limits, for cpu and memory, on every container (Guaranteed QoS)."""
    errors = []
    for label, spec in pod_specs(manifest):
        for container in containers(spec):
            where = f"{label} container {container.get('name')}"
            resources = container.get("resources", {})
            requests, limits = resources.get("requests", {}), resources.get("limits", {})
            for res in ("cpu", "memory"):
                if res not in requests or res not in limits:
                    errors.append(f"{where}: {res} needs both requests and limits")
            for res in sorted(set(requests) | set(limits)):
                if (
                    res in requests
                    and res in limits
                    and parse_quantity(requests[res]) != parse_quantity(limits[res])
                ):
                    errors.append(
                        f"{where}: requests.{res} {requests[res]} != limits.{res} {limits[res]}"
                    )
                elif (res in requests) != (res in limits):
                    errors.append(f"{where}: requests != limits for {res}")
    return errors


# ---------------------------------------------------------------- volumes


def mounts_by_path(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["mountPath"]: m for m in container.get("volumeMounts", [])}


def volume(pod_spec: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((v for v in pod_spec.get("volumes", []) if v.get("name") == name), None)


def ray_volume_errors(manifest: dict[str, Any]) -> list[str]:
    """/dev/shm on a memory-backed emptyDir no bigger than the memory limit, /tmp/ray on a
    volume of its own, as KubeRay recommends, in every Ray container."""
    errors = []
    for label, _, group in groups(manifest):
        spec, container = group["template"]["spec"], group["template"]["spec"]["containers"][0]
        mounts = mounts_by_path(container)
        shm = volume(spec, mounts[SHM_PATH]["name"]) if SHM_PATH in mounts else None
        if shm is None or shm.get("emptyDir", {}).get("medium") != "Memory":
            errors.append(
                f"{label}: {SHM_PATH} must be mounted from an emptyDir with medium Memory"
            )
        else:
            size = shm["emptyDir"].get("sizeLimit")
            memory = container.get("resources", {}).get("limits", {}).get("memory")
            if size is None or memory is None or parse_quantity(size) > parse_quantity(memory):
                errors.append(
                    f"{label}: {SHM_PATH} sizeLimit {size} must be set and <= memory limit {memory}"
                )
        logs = volume(spec, mounts[RAY_TMP_PATH]["name"]) if RAY_TMP_PATH in mounts else None
        if logs is None or "emptyDir" not in logs:
            errors.append(f"{label}: {RAY_TMP_PATH} must be mounted from an emptyDir volume")
    return errors


def storage_mounts(manifest: dict[str, Any]) -> list[tuple[str, str | None, str | None]]:
    """(label, mountPath, claimName) of the PVC mount of every Ray container."""
    out = []
    for label, _, group in groups(manifest):
        spec, container = group["template"]["spec"], group["template"]["spec"]["containers"][0]
        found = [
            (m["mountPath"], volume(spec, m["name"])["persistentVolumeClaim"]["claimName"])
            for m in container.get("volumeMounts", [])
            if (volume(spec, m["name"]) or {}).get("persistentVolumeClaim")
        ]
        out.append((label, *found[0]) if len(found) == 1 else (label, None, None))
    return out


def storage_errors(
    ray_manifests: list[dict[str, Any]], pvcs: list[dict[str, Any]], config: dict[str, Any]
) -> list[str]:
    """One ReadWriteMany claim, mounted at one path on every pod of every Ray manifest, and the
    config's storage / data paths (and the RayJob's --storage) below that path."""
    mounts = [m for manifest in ray_manifests for m in storage_mounts(manifest)]
    errors = [
        f"{label}: no (or more than one) PersistentVolumeClaim mount"
        for label, path, _ in mounts
        if path is None
    ]
    pairs = {(path, claim) for _, path, claim in mounts if path is not None}
    if len(pairs) > 1:
        errors.append(f"storage volume differs between pods: {sorted(pairs)}")
    if errors or not pairs:
        return errors or ["no Ray pod mounts a storage volume"]
    ((mount_path, claim),) = pairs
    pvc = next((p for p in pvcs if p["metadata"]["name"] == claim), None)
    if pvc is None:
        errors.append(f"claim {claim!r} is not defined in kuberay/")
    elif "ReadWriteMany" not in pvc["spec"].get("accessModes", []):
        errors.append(f"persistentvolumeclaim/{claim}: accessModes must include ReadWriteMany")
    paths = {
        "storage.path": config.get("storage", {}).get("path", ""),
        "data.path": config.get("data", {}).get("path", ""),
    }
    for manifest in ray_manifests:
        if manifest["kind"] == "RayJob":
            storage_flag = entrypoint_flag(manifest, "--storage")
            if storage_flag is not None:
                paths[f"{ident(manifest)} entrypoint --storage"] = storage_flag
    for what, path in paths.items():
        if not path.startswith("s3://") and not is_below(path, mount_path):
            errors.append(f"{what} {path!r} is not below the storage mountPath {mount_path!r}")
    return errors


def is_below(path: str, directory: str) -> bool:
    path, directory = posixpath.normpath(path), posixpath.normpath(directory)
    return posixpath.isabs(path) and (
        path == directory or path.startswith(directory.rstrip("/") + "/")
    )


def mounted_files(group: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Files the Ray container sees from ConfigMap volumes: path -> (configMap name, key)."""
    spec, container = group["template"]["spec"], group["template"]["spec"]["containers"][0]
    files = {}
    for mount in container.get("volumeMounts", []):
        source = (volume(spec, mount["name"]) or {}).get("configMap")
        if source is None:
            continue
        for item in source.get("items", []):
            files[posixpath.join(mount["mountPath"], item["path"])] = (source["name"], item["key"])
    return files


def config_mount_errors(manifest: dict[str, Any], config_file: Path = TRAIN_CONFIG) -> list[str]:
    """Every Ray pod sees the training config at the same path, from a ConfigMap key named
    like kuberay/config/<file> (the key `kubectl create configmap --from-file` produces)."""
    errors, seen = [], set()
    for label, _, group in groups(manifest):
        matches = {
            path for path, (_, key) in mounted_files(group).items() if key == config_file.name
        }
        if len(matches) != 1:
            errors.append(
                f"{label}: the ConfigMap key {config_file.name!r} must be mounted exactly once"
            )
        seen |= matches
    if len(seen) > 1:
        errors.append(
            f"{ident(manifest)}: the training config is mounted at different paths {sorted(seen)}"
        )
    return errors


# ---------------------------------------------------------------- auth, RayJob


def auth_errors(manifest: dict[str, Any], require_secret_name: bool) -> list[str]:
    auth = cluster_spec(manifest).get("authOptions") or {}
    errors = []
    if auth.get("mode") != "token":
        errors.append(
            f"{ident(manifest)}: authOptions.mode must be 'token', got {auth.get('mode')!r}"
        )
    if require_secret_name and not auth.get("secretName"):
        errors.append(
            f"{ident(manifest)}: authOptions.secretName must name the Secret the README creates"
        )
    for label, spec in pod_specs(manifest):
        for container in containers(spec):
            for var in container.get("env", []):
                if var.get("name") in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):
                    errors.append(
                        f"{label} container {container.get('name')}: {var['name']} is set by the "
                        "operator from authOptions; do not set it"
                    )
    return errors


def entrypoint_args(manifest: dict[str, Any]) -> list[str]:
    return shlex.split(manifest["spec"].get("entrypoint", ""))


def entrypoint_flag(manifest: dict[str, Any], flag: str) -> str | None:
    args = entrypoint_args(manifest)
    values = [args[i + 1] for i, a in enumerate(args[:-1]) if a == flag]
    values += [a.split("=", 1)[1] for a in args if a.startswith(flag + "=")]
    return values[-1] if values else None


def rayjob_errors(job: dict[str, Any]) -> list[str]:
    spec, who = job["spec"], ident(job)
    errors = []
    if spec.get("backoffLimit", 0) < 1:
        errors.append(
            f"{who}: backoffLimit must be >= 1 so that a lost head is retried, "
            f"got {spec.get('backoffLimit', 0)}"
        )
    if spec.get("shutdownAfterJobFinishes") is not True:
        errors.append(f"{who}: shutdownAfterJobFinishes must be true")
    if spec.get("ttlSecondsAfterFinished", 0) <= 0:
        errors.append(f"{who}: ttlSecondsAfterFinished must be > 0 (with shutdownAfterJobFinishes)")
    mode = spec.get("submissionMode", "K8sJobMode")
    if mode not in SUBMISSION_MODES:
        errors.append(f"{who}: submissionMode {mode!r} is not one of {', '.join(SUBMISSION_MODES)}")
    args = entrypoint_args(job)
    if args[:4] != ["python", "-m", "training", "train"]:
        errors.append(
            f"{who}: entrypoint must start with 'python -m training train', "
            f"got {spec.get('entrypoint')!r}"
        )
    if entrypoint_flag(job, "--name") is None:
        errors.append(
            f"{who}: entrypoint needs a fixed --name, so that a retry resumes the same run"
        )
    config_path = entrypoint_flag(job, "--config")
    head = cluster_spec(job)["headGroupSpec"]
    if config_path is None or config_path not in mounted_files(head):
        errors.append(
            f"{who}: entrypoint --config {config_path!r} is not a file mounted on the head "
            f"({sorted(mounted_files(head))})"
        )
    return errors


def spec_differences(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [
            d
            for k in sorted(set(a) | set(b))
            for d in spec_differences(a.get(k), b.get(k), f"{path}.{k}".lstrip("."))
        ]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [
            d
            for i, (x, y) in enumerate(zip(a, b, strict=True))
            for d in spec_differences(x, y, f"{path}[{i}]")
        ]
    return [] if a == b else [path]


def same_cluster_errors(cluster: dict[str, Any], job: dict[str, Any]) -> list[str]:
    """The RayJob's cluster is the RayCluster (same pods, storage, image); only the token Secret
    may differ (the operator makes one per RayJob cluster), and gcsFaultToleranceOptions (the
    RayJob survives a lost head by retrying on a new cluster: backoffLimit)."""
    allowed = {"authOptions.secretName", "gcsFaultToleranceOptions"}
    diffs = [d for d in spec_differences(cluster["spec"], cluster_spec(job)) if d not in allowed]
    return [f"{ident(job)} rayClusterSpec differs from {ident(cluster)} spec at {d}" for d in diffs]


# ---------------------------------------------------------------- versions and the image


def pinned_ray_version(
    files: tuple[Path, ...] = (PYPROJECT, IMAGE_REQUIREMENTS),
) -> str:
    """The Ray version pinned (`ray[...]==X`) by pyproject.toml and by the image's requirements;
    they must agree, and that is the Ray inside the image."""
    pins = {}
    for path in files:
        found = re.findall(r"^\s*\"?ray(?:\[[^\]]*\])?==([\w.]+)\"?", path.read_text(), re.M)
        assert len(found) == 1, f"{path.name} must pin ray exactly once, found {found}"
        pins[path.name] = found[0]
    assert len(set(pins.values())) == 1, f"Ray pins disagree: {pins}"
    return next(iter(pins.values()))


def ray_version_errors(manifest: dict[str, Any], expected: str) -> list[str]:
    got = cluster_spec(manifest).get("rayVersion")
    if got != expected:
        return [f"{ident(manifest)}: rayVersion {got!r} != the image's Ray {expected!r}"]
    return []


def built_image_tag(script: Path = BUILD_SCRIPT) -> str:
    """The tag docker/build-image.sh builds by default (IMAGE=${IMAGE:-<tag>})."""
    match = re.search(r"^IMAGE=\$\{IMAGE:-([^}]+)\}", script.read_text(), re.MULTILINE)
    assert match, f"{script} does not set a default IMAGE=${{IMAGE:-...}}"
    return match.group(1)
