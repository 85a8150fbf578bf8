"""The operator install (helm chart pinned to 1.7.0, values that fit the chart) and the model
of the pods KubeRay builds from the RayCluster (kuberay_pods), which the pod contract test in
tests/e2e runs with the real image.

    .venv/bin/python -m pytest tests/kuberay
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Any

import pytest
import yaml
from kuberay_invariants import KUBERAY_DIR, all_manifests, one
from kuberay_pods import (
    CONTAINER_COMMAND,
    container_args,
    convert_param_map,
    head_service_fqdn,
    operator_env,
    parse_quantity,
    quantity_value,
    ray_start_params,
)
from kuberay_schema import CRD_FILES, KUBERAY_SCHEMAS

CHART_VERSION = "1.7.0"
INSTALL_SCRIPT = KUBERAY_DIR / "install-operator.sh"
OPERATOR_VALUES = KUBERAY_DIR / "helm" / "values.kuberay-operator.yaml"
CHART_DIR = KUBERAY_SCHEMAS / "charts" / "kuberay-operator"
# Chart values passed straight to Kubernetes objects (toYaml): any content is fine there.
FREE_FORM_VALUES = {"resources", "env", "nodeSelector", "affinity", "annotations", "labels"}


# ---------------------------------------------------------------- operator install


def test_install_script_pins_the_chart() -> None:
    script = INSTALL_SCRIPT.read_text()
    assert "helm repo add kuberay https://ray-project.github.io/kuberay-helm/" in script
    assert re.search(r"helm upgrade --install kuberay-operator kuberay/kuberay-operator", script)
    assert f"KUBERAY_CHART_VERSION=${{KUBERAY_CHART_VERSION:-{CHART_VERSION}}}" in script
    assert '--version "$KUBERAY_CHART_VERSION"' in script
    assert (
        '--values "$VALUES"' in script
        and "VALUES=kuberay/helm/values.kuberay-operator.yaml" in script
    )


def test_pinned_chart_is_the_one_whose_crds_validate_the_manifests() -> None:
    chart = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())
    assert chart["name"] == "kuberay-operator"
    assert chart["version"] == CHART_VERSION
    assert {p.name for p in CRD_FILES.values()} == {
        "ray.io_rayclusters.yaml",
        "ray.io_rayjobs.yaml",
    }


def unknown_value_keys(ours: Any, chart: Any, path: str = "") -> list[str]:
    """Keys of our values file that the chart's values.yaml does not have."""
    if not isinstance(ours, dict) or not isinstance(chart, dict) or path in FREE_FORM_VALUES:
        return []
    missing = []
    for key, value in ours.items():
        where = f"{path}.{key}".lstrip(".")
        if key not in chart:
            missing.append(where)
        elif where not in FREE_FORM_VALUES:
            missing += unknown_value_keys(value, chart[key], where)
    return missing


def test_operator_values_fit_the_chart() -> None:
    chart_values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    ours = yaml.safe_load(OPERATOR_VALUES.read_text())
    assert unknown_value_keys(ours, chart_values) == []
    assert ours["image"]["tag"] == f"v{CHART_VERSION}"
    assert ours["resources"]["requests"] == ours["resources"]["limits"]


def test_unknown_value_keys_are_found() -> None:
    chart = {"image": {"tag": "v1"}, "resources": {"limits": {}}}
    ours = {"image": {"tga": "v1"}, "resources": {"requests": {"cpu": "1"}}, "replica": 2}
    assert unknown_value_keys(ours, chart) == ["image.tga", "replica"]


# ---------------------------------------------------------------- the pods KubeRay builds


@pytest.fixture(scope="module")
def cluster() -> dict[str, Any]:
    return one("RayCluster", all_manifests())


def test_quantities() -> None:
    assert parse_quantity("500m") == Fraction(1, 2)
    assert parse_quantity("4Gi") == 4 * 2**30
    assert parse_quantity(2) == 2
    assert parse_quantity("1e3") == 1000
    assert quantity_value("500m") == 1  # Quantity.Value() rounds up
    with pytest.raises(ValueError):
        parse_quantity("4 GB")


def test_param_map_formatting_matches_the_operator() -> None:
    params = {"num-cpus": "0", "block": "true", "log-color": "true", "disable-usage-stats": "false"}
    assert convert_param_map(params) == "--block --log-color=true --num-cpus=0"


def test_head_command_line(cluster: dict[str, Any]) -> None:
    fqdn = head_service_fqdn("elastic-trainer")
    assert fqdn == "elastic-trainer-head-svc.default.svc.cluster.local"
    args = container_args(cluster["spec"]["headGroupSpec"], "head", fqdn)
    assert args == (
        "ulimit -n 65536; ray start --head --block --dashboard-host=0.0.0.0 "
        f"--memory={4 * 2**30} --metrics-export-port=8080 --num-cpus=0"
    )
    assert CONTAINER_COMMAND == ["/bin/bash", "-lc", "--"]


def test_worker_command_line(cluster: dict[str, Any]) -> None:
    fqdn = head_service_fqdn("elastic-trainer")
    args = container_args(cluster["spec"]["workerGroupSpecs"][0], "worker", fqdn)
    assert args == (
        f"ulimit -n 65536; ray start --address={fqdn}:6379 --block "
        f"--memory={4 * 2**30} --metrics-export-port=8080 --num-cpus=2"
    )


def test_cpu_limit_fills_num_cpus_when_the_manifest_leaves_it_out(cluster: dict[str, Any]) -> None:
    group = {**cluster["spec"]["workerGroupSpecs"][0], "rayStartParams": {}}
    assert ray_start_params(group, "worker", "h")["num-cpus"] == "2"


def test_operator_env(cluster: dict[str, Any]) -> None:
    env = operator_env(
        cluster_name="elastic-trainer",
        group_name="cpu-workers",
        node_type="worker",
        pod_name="elastic-trainer-cpu-workers-worker-abcde",
        head_fqdn=head_service_fqdn("elastic-trainer"),
        ray_start_cmd="ray start ...",
        auth_token="t0k3n",
    )
    assert env["RAY_ADDRESS"] == "elastic-trainer-head-svc.default.svc.cluster.local:6379"
    assert env["RAY_IP"] == "elastic-trainer-head-svc"
    assert (env["RAY_AUTH_MODE"], env["RAY_AUTH_TOKEN"]) == ("token", "t0k3n")
