"""Head fault tolerance on KubeRay, offline: the RayCluster's gcsFaultToleranceOptions against the
v1.7.0 CRD and against the Redis in kuberay/redis.gcs-ft.yaml; the RayJob keeps backoffLimit.
Every rule is also shown to reject a broken copy.

    .venv/bin/python -m pytest tests/kuberay/test_kuberay_gcs_ft.py
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from kuberay_gcs_ft import REDIS_NAME, by_kind, drain_grace_errors, gcs_ft_errors
from kuberay_invariants import rayjob_errors, same_cluster_errors
from kuberay_schema import core_errors, crd_errors, pod_template_errors


@pytest.fixture
def objects(manifests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return copy.deepcopy(manifests)


def redis_pod(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return by_kind(objects, "Deployment")[REDIS_NAME]["spec"]["template"]["spec"]


def redis_args(objects: list[dict[str, Any]]) -> list[str]:
    return redis_pod(objects)["containers"][0]["command"]


def test_real_manifests_have_head_fault_tolerance(cluster, job, manifests) -> None:
    assert gcs_ft_errors(cluster, manifests) == []
    assert cluster["spec"]["gcsFaultToleranceOptions"]["redisAddress"] == f"{REDIS_NAME}:6379"
    # The RayJob's cluster may differ from the RayCluster only there (it retries instead).
    assert same_cluster_errors(cluster, job) == []
    assert job["spec"]["backoffLimit"] >= 1 and rayjob_errors(job) == []


def test_redis_objects_are_valid_core_objects(manifests) -> None:
    redis = [m for m in manifests if m["metadata"]["name"] == REDIS_NAME]
    assert sorted(m["kind"] for m in redis) == ["Deployment", "PersistentVolumeClaim", "Service"]
    assert {m["kind"]: core_errors(m) for m in redis} == {m["kind"]: [] for m in redis}
    template = by_kind(manifests, "Deployment")[REDIS_NAME]["spec"]["template"]
    assert pod_template_errors(template) == []


def test_crd_rejects_a_bad_backend_and_unknown_fields(cluster) -> None:
    bad_backend = copy.deepcopy(cluster)
    bad_backend["spec"]["gcsFaultToleranceOptions"]["backend"] = "memcached"
    assert any("backend" in e for e in crd_errors(bad_backend))
    unknown = copy.deepcopy(cluster)
    unknown["spec"]["gcsFaultToleranceOptions"]["redisHost"] = "x"
    assert any("redisHost" in e for e in crd_errors(unknown))
    wrong_type = copy.deepcopy(cluster)
    wrong_type["spec"]["gcsFaultToleranceOptions"]["redisPassword"] = "hunter2"
    assert crd_errors(wrong_type)


def test_missing_options_are_rejected(cluster, objects) -> None:
    del cluster["spec"]["gcsFaultToleranceOptions"]
    assert [e.split(": ", 1)[1].split(":")[0] for e in gcs_ft_errors(cluster, objects)] == [
        "gcsFaultToleranceOptions missing"
    ]


def test_rocksdb_backend_is_rejected_here(cluster, objects) -> None:
    cluster["spec"]["gcsFaultToleranceOptions"]["backend"] = "rocksdb"
    assert any("backend must be redis" in e for e in gcs_ft_errors(cluster, objects))


def test_literal_password_is_rejected(cluster, objects) -> None:
    cluster["spec"]["gcsFaultToleranceOptions"]["redisPassword"] = {"value": "hunter2"}
    assert any("from a Secret" in e for e in gcs_ft_errors(cluster, objects))


def test_address_without_service_or_port_is_rejected(cluster, objects) -> None:
    options = cluster["spec"]["gcsFaultToleranceOptions"]
    options["redisAddress"] = "redis-elsewhere:6379"
    assert any("is no Service" in e for e in gcs_ft_errors(cluster, objects))
    options["redisAddress"] = f"{REDIS_NAME}:6380"
    assert any("has no port '6380'" in e for e in gcs_ft_errors(cluster, objects))


def test_redis_port_must_be_the_services(cluster, objects) -> None:
    args = redis_args(objects)
    args[args.index("--port") + 1] = "6390"
    assert any("--port 6390" in e for e in gcs_ft_errors(cluster, objects))


def test_redis_without_append_only_file_or_volume_is_rejected(cluster, objects) -> None:
    args = redis_args(objects)
    args[args.index("--appendonly") + 1] = "no"
    assert any("--appendonly yes" in e for e in gcs_ft_errors(cluster, objects))
    args[args.index("--appendonly") + 1] = "yes"
    redis_pod(objects)["volumes"][0] = {"name": "data", "emptyDir": {}}
    assert any("not on a PersistentVolumeClaim" in e for e in gcs_ft_errors(cluster, objects))


def test_password_secret_must_match(cluster, objects) -> None:
    ref = cluster["spec"]["gcsFaultToleranceOptions"]["redisPassword"]["valueFrom"]
    ref["secretKeyRef"]["name"] = "some-other-secret"
    assert any("differs from the RayCluster's" in e for e in gcs_ft_errors(cluster, objects))
    ref["secretKeyRef"]["name"] = REDIS_NAME
    args = redis_args(objects)
    del args[args.index("--requirepass") : args.index("--requirepass") + 2]
    assert any("--requirepass" in e for e in gcs_ft_errors(cluster, objects))


def test_second_redis_replica_is_rejected(cluster, objects) -> None:
    by_kind(objects, "Deployment")[REDIS_NAME]["spec"]["replicas"] = 2
    assert any("one replica" in e for e in gcs_ft_errors(cluster, objects))


def test_hand_set_redis_env_or_old_annotation_is_rejected(cluster, objects) -> None:
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head["env"].append({"name": "RAY_REDIS_ADDRESS", "value": "x:6379"})
    cluster["metadata"]["annotations"] = {"ray.io/ft-enabled": "true"}
    errors = gcs_ft_errors(cluster, objects)
    assert any("RAY_REDIS_ADDRESS" in e for e in errors)
    assert any("ray.io/ft-enabled" in e for e in errors)


def test_rayjob_without_retries_is_rejected(job) -> None:
    job["spec"]["backoffLimit"] = 0
    assert any("backoffLimit" in e for e in rayjob_errors(job))


def test_worker_pods_outlive_the_drain_window(cluster, job) -> None:
    assert drain_grace_errors(cluster) == [] and drain_grace_errors(job) == []
    del cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert any("must exceed Ray's 30 s" in e for e in drain_grace_errors(cluster))
