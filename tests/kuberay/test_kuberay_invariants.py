"""Rules for kuberay/ that the schemas cannot express, on the real manifests and on broken
copies (each rule must be able to fail, with a message that names the problem).

    .venv/bin/python -m pytest tests/kuberay
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from kuberay_gcs_ft import REDIS_NAME
from kuberay_invariants import (
    KUBERAY_DIR,
    TRAIN_CONFIG,
    apply_dir_errors,
    auth_errors,
    built_image_tag,
    config_errors,
    config_mount_errors,
    head_errors,
    image_errors,
    kubectl_apply_files,
    name_errors,
    pinned_ray_version,
    ray_start_param_errors,
    ray_version_errors,
    ray_volume_errors,
    rayjob_errors,
    replica_errors,
    resource_errors,
    same_cluster_errors,
    storage_errors,
    train_config,
    trainer_errors,
)
from kuberay_schema import core_errors

# The one project image: docker/build-image.sh builds it, CI tests it, both pods run it.
PROJECT_IMAGE = "elastic-trainer:0.1.0"


@pytest.fixture
def pvcs(manifests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # The run storage claims; Redis's own volume (redis.gcs-ft.yaml) is not run storage.
    claims = [m for m in manifests if m["kind"] == "PersistentVolumeClaim"]
    return copy.deepcopy([m for m in claims if m["metadata"]["name"] != REDIS_NAME])


@pytest.fixture
def config() -> dict[str, Any]:
    return train_config()


def ray_manifests(cluster: dict[str, Any], job: dict[str, Any]) -> list[dict[str, Any]]:
    return [cluster, job]


def worker(manifest: dict[str, Any]) -> dict[str, Any]:
    spec = (
        manifest["spec"] if manifest["kind"] == "RayCluster" else manifest["spec"]["rayClusterSpec"]
    )
    return spec["workerGroupSpecs"][0]


def head(manifest: dict[str, Any]) -> dict[str, Any]:
    spec = (
        manifest["spec"] if manifest["kind"] == "RayCluster" else manifest["spec"]["rayClusterSpec"]
    )
    return spec["headGroupSpec"]


def container(group: dict[str, Any]) -> dict[str, Any]:
    return group["template"]["spec"]["containers"][0]


# ---------------------------------------------------------------- the real manifests hold


def test_kubectl_apply_on_the_folder_reads_only_kubernetes_objects() -> None:
    files = kubectl_apply_files()
    assert [f.name for f in files] == [
        "pvc.run-storage.yaml",
        "raycluster.elastic-trainer.yaml",
        "redis.gcs-ft.yaml",
    ]
    assert apply_dir_errors(files) == []
    assert (KUBERAY_DIR / "batch" / "rayjob.elastic-trainer.yaml").is_file()


def test_real_manifests_hold_every_rule(
    cluster: dict[str, Any], job: dict[str, Any], pvcs: list[dict[str, Any]], config: dict[str, Any]
) -> None:
    errors = [
        *apply_dir_errors(kubectl_apply_files(KUBERAY_DIR / "batch")),
        *config_errors(config),
        *storage_errors([cluster, job], pvcs, config),
        *same_cluster_errors(cluster, job),
        *rayjob_errors(job),
        *auth_errors(cluster, require_secret_name=True),
        *auth_errors(job, require_secret_name=False),
    ]
    for manifest in (cluster, job):
        errors += name_errors(manifest)
        errors += replica_errors(manifest)
        errors += trainer_errors(manifest, config)
        errors += head_errors(manifest)
        errors += ray_start_param_errors(manifest)
        errors += image_errors(manifest, PROJECT_IMAGE)
        errors += resource_errors(manifest)
        errors += ray_volume_errors(manifest)
        errors += config_mount_errors(manifest)
        errors += ray_version_errors(manifest, pinned_ray_version())
    assert errors == []


def test_image_is_the_one_the_build_script_makes() -> None:
    assert built_image_tag() == PROJECT_IMAGE


def test_worker_range_is_the_trainers(cluster: dict[str, Any], config: dict[str, Any]) -> None:
    group = worker(cluster)
    assert (group["minReplicas"], group["maxReplicas"]) == (
        config["scaling"]["min_workers"],
        config["scaling"]["max_workers"],
    )


# ---------------------------------------------------------------- each rule can fail


def test_long_names_are_rejected(cluster: dict[str, Any], job: dict[str, Any]) -> None:
    cluster["metadata"]["name"] = "c" * 54
    assert name_errors(cluster) == [
        "raycluster/" + "c" * 54 + ": RayCluster name has 54 > 53 characters"
    ]
    job["metadata"]["name"] = "j" * 48
    errors = name_errors(job)
    assert any("RayJob name has 48 > 47 characters" in e for e in errors)
    assert any("generated RayCluster name has 54 > 53" in e for e in errors)
    cluster["metadata"]["name"] = "Elastic_Trainer"
    assert any("DNS-1035" in e for e in name_errors(cluster))


def test_min_above_max_and_replicas_outside_range_are_rejected(cluster: dict[str, Any]) -> None:
    worker(cluster)["minReplicas"] = 5
    errors = replica_errors(cluster)
    assert any("minReplicas 5 > maxReplicas 4" in e for e in errors)
    worker(cluster)["minReplicas"], worker(cluster)["replicas"] = 2, 7
    assert any(
        "replicas 7 outside minReplicas..maxReplicas 2..4" in e for e in replica_errors(cluster)
    )


def test_worker_range_must_match_the_training_config(
    cluster: dict[str, Any], config: dict[str, Any]
) -> None:
    worker(cluster)["maxReplicas"] = 8
    assert any(
        "maxReplicas 8 != scaling.max_workers 4" in e for e in trainer_errors(cluster, config)
    )
    config["scaling"]["min_workers"] = 1
    assert any(
        "minReplicas 2 != scaling.min_workers 1" in e for e in trainer_errors(cluster, config)
    )


def test_one_training_worker_per_pod(cluster: dict[str, Any], config: dict[str, Any]) -> None:
    worker(cluster)["rayStartParams"]["num-cpus"] = "4"  # two 2-CPU training workers would fit
    assert any("must fit exactly once" in e for e in trainer_errors(cluster, config))
    del worker(cluster)["rayStartParams"]["num-cpus"]  # then the CPU limit counts (2): fine
    assert trainer_errors(cluster, config) == []
    config["scaling"]["use_gpu"] = True
    assert any("scaling.use_gpu True" in e for e in trainer_errors(cluster, config))


def test_second_worker_group_is_rejected(cluster: dict[str, Any], config: dict[str, Any]) -> None:
    cluster["spec"]["workerGroupSpecs"].append(copy.deepcopy(worker(cluster)))
    assert any("expected one worker group, found 2" in e for e in trainer_errors(cluster, config))


def test_batch_size_must_divide_every_world_size(config: dict[str, Any]) -> None:
    config["training"]["global_batch_size"] = 50
    assert any("not divisible by world sizes [3, 4]" in e for e in config_errors(config))
    config["extra"] = {}
    assert any("unknown section 'extra'" in e for e in config_errors(config))


def test_head_must_offer_no_cpus(cluster: dict[str, Any]) -> None:
    del head(cluster)["rayStartParams"]["num-cpus"]
    assert any('num-cpus must be "0"' in e for e in head_errors(cluster))


def test_non_string_ray_start_param_is_rejected(cluster: dict[str, Any]) -> None:
    worker(cluster)["rayStartParams"]["num-cpus"] = 2
    assert any(
        "rayStartParams num-cpus must be a string, got int 2" in e
        for e in ray_start_param_errors(cluster)
    )


def test_mismatched_images_are_rejected(cluster: dict[str, Any], job: dict[str, Any]) -> None:
    container(worker(cluster))["image"] = "elastic-trainer:0.0.9"
    errors = image_errors(cluster, PROJECT_IMAGE)
    assert errors == [
        "raycluster/elastic-trainer workerGroupSpecs[0] (cpu-workers) container ray-worker: "
        "image 'elastic-trainer:0.0.9' != 'elastic-trainer:0.1.0'"
    ]
    job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["image"] = "rayproject/ray:2.60.0"
    assert any("submitterPodTemplate" in e for e in image_errors(job, PROJECT_IMAGE))


def test_requests_must_equal_limits(cluster: dict[str, Any], job: dict[str, Any]) -> None:
    container(head(cluster))["resources"]["requests"]["memory"] = "2Gi"
    assert any("requests.memory 2Gi != limits.memory 4Gi" in e for e in resource_errors(cluster))
    del container(worker(cluster))["resources"]["limits"]["cpu"]
    assert any("cpu needs both requests and limits" in e for e in resource_errors(cluster))
    job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = "1"
    assert any("submitterPodTemplate" in e for e in resource_errors(job))


def test_equal_quantities_in_other_units_are_equal(cluster: dict[str, Any]) -> None:
    container(head(cluster))["resources"]["requests"].update(cpu="2000m", memory="4096Mi")
    assert resource_errors(cluster) == []


def test_missing_shm_and_ray_tmp_volumes_are_rejected(cluster: dict[str, Any]) -> None:
    mounts = container(worker(cluster))["volumeMounts"]
    container(worker(cluster))["volumeMounts"] = [m for m in mounts if m["mountPath"] != "/dev/shm"]
    assert any(
        "/dev/shm must be mounted from an emptyDir with medium Memory" in e
        for e in ray_volume_errors(cluster)
    )
    volumes = head(cluster)["template"]["spec"]["volumes"]
    next(v for v in volumes if v["name"] == "shared-mem")["emptyDir"] = {}
    next(v for v in volumes if v["name"] == "ray-logs").pop("emptyDir")
    volumes[-1]["hostPath"] = {"path": "/tmp"}
    errors = ray_volume_errors(cluster)
    assert sum("/dev/shm must be mounted" in e for e in errors) == 2
    assert any("/tmp/ray must be mounted from an emptyDir volume" in e for e in errors)


def test_shm_larger_than_memory_is_rejected(cluster: dict[str, Any]) -> None:
    volumes = head(cluster)["template"]["spec"]["volumes"]
    next(v for v in volumes if v["name"] == "shared-mem")["emptyDir"]["sizeLimit"] = "8Gi"
    assert any(
        "sizeLimit 8Gi must be set and <= memory limit 4Gi" in e for e in ray_volume_errors(cluster)
    )


def test_storage_must_be_one_rwx_volume_at_one_path(
    cluster: dict[str, Any], job: dict[str, Any], pvcs: list[dict[str, Any]], config: dict[str, Any]
) -> None:
    mount = next(m for m in container(worker(job))["volumeMounts"] if m["name"] == "run-storage")
    mount["mountPath"] = "/data"
    assert any(
        "storage volume differs between pods" in e
        for e in storage_errors([cluster, job], pvcs, config)
    )
    mount["mountPath"] = "/mnt/storage"
    pvcs[0]["spec"]["accessModes"] = ["ReadWriteOnce"]
    assert any(
        "must include ReadWriteMany" in e for e in storage_errors([cluster, job], pvcs, config)
    )
    pvcs[0]["metadata"]["name"] = "other"
    assert any(
        "claim 'elastic-trainer-storage' is not defined" in e
        for e in storage_errors([cluster, job], pvcs, config)
    )


def test_worker_without_storage_is_rejected(
    cluster: dict[str, Any], job: dict[str, Any], pvcs: list[dict[str, Any]], config: dict[str, Any]
) -> None:
    mounts = container(worker(cluster))["volumeMounts"]
    container(worker(cluster))["volumeMounts"] = [m for m in mounts if m["name"] != "run-storage"]
    assert any(
        "cpu-workers" in e and "PersistentVolumeClaim mount" in e
        for e in storage_errors([cluster, job], pvcs, config)
    )


def test_storage_paths_must_lie_on_the_shared_volume(
    cluster: dict[str, Any], job: dict[str, Any], pvcs: list[dict[str, Any]], config: dict[str, Any]
) -> None:
    config["storage"]["path"] = "/mnt/storagex/runs"
    assert any(
        "storage.path '/mnt/storagex/runs' is not below" in e
        for e in storage_errors([cluster, job], pvcs, config)
    )
    config["storage"]["path"] = "s3://bucket/runs"  # object storage needs no volume
    assert storage_errors([cluster, job], pvcs, config) == []
    config["data"]["path"] = "./data/demo.parquet"
    assert any(
        "data.path './data/demo.parquet'" in e for e in storage_errors([cluster, job], pvcs, config)
    )
    config["data"]["path"] = "/mnt/storage/data/demo.parquet"
    job["spec"]["entrypoint"] += " --storage /tmp/runs"
    assert any(
        "entrypoint --storage '/tmp/runs'" in e
        for e in storage_errors([cluster, job], pvcs, config)
    )


def test_config_must_be_mounted_at_one_path(cluster: dict[str, Any]) -> None:
    mount = next(
        m for m in container(worker(cluster))["volumeMounts"] if m["name"] == "train-config"
    )
    mount["mountPath"] = "/etc/other"
    assert any("mounted at different paths" in e for e in config_mount_errors(cluster))
    head_volumes = head(cluster)["template"]["spec"]["volumes"]
    next(v for v in head_volumes if v["name"] == "train-config")["configMap"]["items"][0]["key"] = (
        "x.yaml"
    )
    assert any(
        "headGroupSpec: the ConfigMap key 'train.yaml'" in e for e in config_mount_errors(cluster)
    )


def test_token_auth_must_be_on(cluster: dict[str, Any]) -> None:
    cluster["spec"]["authOptions"] = {"mode": "disabled"}
    errors = auth_errors(cluster, require_secret_name=True)
    assert any("authOptions.mode must be 'token'" in e for e in errors)
    assert any("authOptions.secretName must name the Secret" in e for e in errors)
    container(head(cluster))["env"].append({"name": "RAY_AUTH_MODE", "value": "disabled"})
    assert any("RAY_AUTH_MODE is set by the operator" in e for e in auth_errors(cluster, True))


def test_rayjob_retry_and_cleanup_rules(job: dict[str, Any]) -> None:
    job["spec"]["backoffLimit"] = 0
    job["spec"]["shutdownAfterJobFinishes"] = False
    job["spec"]["ttlSecondsAfterFinished"] = 0
    job["spec"]["submissionMode"] = "K8sMode"
    errors = rayjob_errors(job)
    assert any("backoffLimit must be >= 1" in e for e in errors)
    assert any("shutdownAfterJobFinishes must be true" in e for e in errors)
    assert any("ttlSecondsAfterFinished must be > 0" in e for e in errors)
    assert any("submissionMode 'K8sMode' is not one of K8sJobMode, HTTPMode" in e for e in errors)


def test_rayjob_entrypoint_rules(job: dict[str, Any]) -> None:
    job["spec"]["entrypoint"] = "python train.py --config /etc/elastic-trainer/config.yaml"
    errors = rayjob_errors(job)
    assert any("must start with 'python -m training train'" in e for e in errors)
    assert any("needs a fixed --name" in e for e in errors)
    assert any(
        "--config '/etc/elastic-trainer/config.yaml' is not a file mounted on the head" in e
        for e in errors
    )


def test_rayjob_cluster_must_equal_the_raycluster(
    cluster: dict[str, Any], job: dict[str, Any]
) -> None:
    container(worker(job))["resources"]["limits"]["memory"] = "8Gi"
    errors = same_cluster_errors(cluster, job)
    assert errors == [
        "rayjob/elastic-trainer-batch rayClusterSpec differs from raycluster/elastic-trainer "
        "spec at workerGroupSpecs[0].template.spec.containers[0].resources.limits.memory"
    ]


def test_ray_version_must_match_the_image(cluster: dict[str, Any]) -> None:
    cluster["spec"]["rayVersion"] = "2.59.0"
    assert ray_version_errors(cluster, pinned_ray_version()) == [
        "raycluster/elastic-trainer: rayVersion '2.59.0' != the image's Ray '2.60.0'"
    ]


def test_ray_pins_must_agree(tmp_path: Path) -> None:
    (tmp_path / "requirements.txt").write_text("ray[default,train]==2.60.0\n")
    (tmp_path / "pyproject.toml").write_text(
        'dependencies = [\n  "ray[default,train]==2.59.0",\n]\n'
    )
    with pytest.raises(AssertionError, match="Ray pins disagree"):
        pinned_ray_version((tmp_path / "requirements.txt", tmp_path / "pyproject.toml"))


def test_apply_dir_rejects_non_manifests(tmp_path: Path) -> None:
    (tmp_path / "values.yaml").write_text("image:\n  tag: v1\n")
    (tmp_path / "train.yaml").write_text(TRAIN_CONFIG.read_text())
    errors = apply_dir_errors(kubectl_apply_files(tmp_path))
    assert errors == [
        "train.yaml: a document without apiVersion/kind/metadata",
        "values.yaml: a document without apiVersion/kind/metadata",
    ]


def test_readme_and_headers_create_what_the_manifests_reference(cluster: dict[str, Any]) -> None:
    """The Secret, ConfigMap, Service and label the docs use are the ones the manifests name."""
    readme = (KUBERAY_DIR.parent / "README.md").read_text()
    section = readme[readme.index("<!-- BEGIN kuberay -->") : readme.index("<!-- END kuberay -->")]
    header = (KUBERAY_DIR / "raycluster.elastic-trainer.yaml").read_text()
    secret = cluster["spec"]["authOptions"]["secretName"]
    volumes = head(cluster)["template"]["spec"]["volumes"]
    config_map = next(v["configMap"] for v in volumes if "configMap" in v)
    key = config_map["items"][0]["key"]
    name = cluster["metadata"]["name"]
    for text in (section, header):
        assert f"kubectl create secret generic {secret}" in text
        assert "--from-literal=auth_token=" in text
        assert f"kubectl create configmap {config_map['name']}" in text
        assert f"--from-file={key}=kuberay/config/{key}" in text
        assert f"ray.io/cluster={name}" in text
        assert f"svc/{name}-head-svc 8265:8265" in text
    assert f"--from-file={key}=kuberay/config/{key}" in TRAIN_CONFIG.read_text()


def test_config_map_as_kubectl_creates_it_is_valid(cluster: dict[str, Any]) -> None:
    volumes = head(cluster)["template"]["spec"]["volumes"]
    config_map = next(v["configMap"] for v in volumes if "configMap" in v)
    key = config_map["items"][0]["key"]
    made = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": config_map["name"]},
        "data": {key: (KUBERAY_DIR / "config" / key).read_text()},
    }
    assert core_errors(made) == []
    assert len(made["data"][key].encode()) < 2**20  # the ConfigMap size limit
