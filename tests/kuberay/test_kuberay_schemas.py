"""Every manifest in kuberay/ against the real schemas, offline: RayCluster / RayJob against the
KubeRay v1.7.0 CRDs (defaults applied, unknown fields rejected), core kinds and the embedded pod
templates against Kubernetes' own schemas (kubernetes-validate). Each check is also shown to
fail on a broken copy.

    .venv/bin/python -m pytest tests/kuberay
"""

from __future__ import annotations

import copy
from typing import Any

from kuberay_invariants import groups, ident, manifest_files, pod_specs
from kuberay_schema import (
    CRD_FILES,
    KUBERNETES_VERSION,
    core_errors,
    crd_errors,
    crd_version_schema,
    defaulted,
    pod_template_errors,
    to_json_schema,
)

RAY_KINDS = set(CRD_FILES)


def test_the_expected_objects_are_there(manifests: list[dict[str, Any]]) -> None:
    kinds = sorted(m["kind"] for m in manifests)
    assert kinds == [
        "Deployment",  # Redis for the head's fault tolerance (redis.gcs-ft.yaml), with
        "PersistentVolumeClaim",  # its volume,
        "PersistentVolumeClaim",  # the runs' shared storage,
        "RayCluster",
        "RayJob",
        "Service",  # and Redis's Service
    ], manifest_files()


def test_every_manifest_is_valid_against_its_schema(manifests: list[dict[str, Any]]) -> None:
    errors = {}
    for manifest in manifests:
        check = crd_errors if manifest["kind"] in RAY_KINDS else core_errors
        errors[ident(manifest)] = check(manifest)
    assert errors == {ident(m): [] for m in manifests}


def test_every_embedded_pod_template_is_a_valid_core_pod_template(
    manifests: list[dict[str, Any]],
) -> None:
    errors = {}
    for manifest in (m for m in manifests if m["kind"] in RAY_KINDS):
        for label, _, group in groups(manifest):
            errors[label] = pod_template_errors(group["template"])
        if manifest["kind"] == "RayJob":
            errors["submitter"] = pod_template_errors(manifest["spec"]["submitterPodTemplate"])
    assert errors and all(v == [] for v in errors.values()), errors


def test_schema_defaults_are_applied_as_the_api_server_would(cluster: dict[str, Any]) -> None:
    del cluster["spec"]["workerGroupSpecs"][0]["replicas"]
    stored = defaulted(cluster)
    worker = stored["spec"]["workerGroupSpecs"][0]
    # Defaults from the CRD: replicas 0, numOfHosts 1; nested ones too (container port protocol).
    assert worker["replicas"] == 0
    assert worker["numOfHosts"] == 1
    ports = stored["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]
    assert {p["protocol"] for p in ports} == {"TCP"}
    assert "replicas" not in cluster["spec"]["workerGroupSpecs"][0], "input must stay untouched"


def test_rayjob_defaults_fill_submission_mode(job: dict[str, Any]) -> None:
    del job["spec"]["submissionMode"]
    assert defaulted(job)["spec"]["submissionMode"] == "K8sJobMode"


def test_converted_schema_closes_objects_but_keeps_maps_and_int_or_string() -> None:
    schema = to_json_schema(crd_version_schema("RayCluster"))
    spec = schema["properties"]["spec"]
    assert spec["additionalProperties"] is False
    assert spec["properties"]["headGroupSpec"]["properties"]["rayStartParams"][
        "additionalProperties"
    ] == {"type": "string"}
    container = spec["properties"]["headGroupSpec"]["properties"]["template"]["properties"]["spec"][
        "properties"
    ]["containers"]["items"]
    cpu = container["properties"]["resources"]["properties"]["limits"]["additionalProperties"]
    assert {"type": "integer"} in cpu["anyOf"] and {"type": "string"} in cpu["anyOf"]


# ---------------------------------------------------------------- each check can fail


def test_unknown_field_in_ray_spec_is_rejected(cluster: dict[str, Any]) -> None:
    cluster["spec"]["workerGroupSpecs"][0]["maxReplica"] = 4
    assert any("'maxReplica' was unexpected" in e for e in crd_errors(cluster))


def test_unknown_field_deep_in_pod_template_is_rejected(cluster: dict[str, Any]) -> None:
    container = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    container["resource"] = container.pop("resources")
    errors = crd_errors(cluster)
    assert any(
        e.startswith("spec.headGroupSpec.template.spec.containers.0")
        and "'resource' was unexpected" in e
        for e in errors
    ), errors
    template = cluster["spec"]["headGroupSpec"]["template"]
    assert any("'resource' was unexpected" in e for e in pod_template_errors(template))


def test_wrong_types_are_rejected(cluster: dict[str, Any], job: dict[str, Any]) -> None:
    cluster["spec"]["workerGroupSpecs"][0]["minReplicas"] = "2"
    assert "spec.workerGroupSpecs.0.minReplicas: '2' is not of type 'integer'" in crd_errors(
        cluster
    )
    job["spec"]["backoffLimit"] = 2**31
    assert any(e.startswith("spec.backoffLimit:") for e in crd_errors(job))


def test_non_string_ray_start_param_is_rejected_by_the_crd(cluster: dict[str, Any]) -> None:
    cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    assert "spec.headGroupSpec.rayStartParams.num-cpus: 0 is not of type 'string'" in crd_errors(
        cluster
    )


def test_enum_violations_are_rejected(cluster: dict[str, Any]) -> None:
    cluster["spec"]["authOptions"]["mode"] = "password"
    assert any(
        e.startswith("spec.authOptions.mode: 'password' is not one of") for e in crd_errors(cluster)
    )


def test_missing_required_field_is_rejected(cluster: dict[str, Any]) -> None:
    del cluster["spec"]["workerGroupSpecs"][0]["groupName"]
    assert "spec.workerGroupSpecs.0: 'groupName' is a required property" in crd_errors(cluster)


def test_bad_quantity_is_rejected(cluster: dict[str, Any]) -> None:
    limits = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]
    limits["limits"]["memory"] = "4 GB"
    assert any("does not match" in e and "limits.memory" in e for e in crd_errors(cluster))


def test_duplicate_env_names_are_rejected(cluster: dict[str, Any]) -> None:
    env = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    env.append(dict(env[0]))
    assert any("duplicate entries in a list-type=map" in e for e in crd_errors(cluster))


def test_fields_guarded_by_cel_rules_are_not_trusted_silently(cluster: dict[str, Any]) -> None:
    cluster["spec"]["managedBy"] = "ray.io/kuberay-operator"
    assert any(e.startswith("spec.managedBy: guarded by CEL rules") for e in crd_errors(cluster))


def test_wrong_api_version_and_bad_metadata_are_rejected(cluster: dict[str, Any]) -> None:
    cluster["apiVersion"] = "ray.io/v1alpha2"
    cluster["metadata"]["label"] = {"a": "b"}
    errors = crd_errors(cluster)
    assert "apiVersion: 'ray.io/v1alpha2', expected 'ray.io/v1'" in errors
    assert any(e.startswith("metadata:") and "'label' was unexpected" in e for e in errors)


def run_storage_claim(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    return next(m for m in manifests if m["metadata"]["name"] == "elastic-trainer-storage")


def test_core_kind_errors_are_caught(manifests: list[dict[str, Any]]) -> None:
    pvc = copy.deepcopy(run_storage_claim(manifests))
    pvc["spec"]["accessMode"] = pvc["spec"].pop("accessModes")
    assert any("'accessMode' was unexpected" in e for e in core_errors(pvc))
    pvc = copy.deepcopy(run_storage_claim(manifests))
    pvc["spec"]["resources"]["requests"]["storage"] = ["50Gi"]
    assert core_errors(pvc) != []


def test_core_schemas_are_used_offline_for_a_fixed_kubernetes_version() -> None:
    assert KUBERNETES_VERSION.startswith("1.3")
    unknown = {"apiVersion": "example.com/v1", "kind": "Gadget", "metadata": {"name": "x"}}
    assert any("Couldn't find schema" in e for e in core_errors(unknown))


def test_submitter_template_is_checked_too(job: dict[str, Any]) -> None:
    labels = [label for label, _ in pod_specs(job)]
    assert any("submitterPodTemplate" in label for label in labels)
    job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["imagePullPolicy"] = 1
    errors = crd_errors(job)
    assert any(
        e.startswith("spec.submitterPodTemplate.spec.containers.0.imagePullPolicy") for e in errors
    )
    assert pod_template_errors(job["spec"]["submitterPodTemplate"]) != []
