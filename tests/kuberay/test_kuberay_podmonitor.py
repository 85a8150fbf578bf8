"""The PodMonitor in kuberay/monitoring/ on the real files and on broken copies.

.venv/bin/python -m pytest tests/kuberay/test_kuberay_podmonitor.py
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from kuberay_invariants import KUBERAY_DIR, kubectl_apply_files
from kuberay_podmonitor import PODMONITOR_FILE, podmonitor, schema_errors, selection_errors


@pytest.fixture
def monitor() -> dict[str, Any]:
    return copy.deepcopy(podmonitor())


def test_the_podmonitor_is_well_formed_and_selects_every_ray_pod(monitor, cluster) -> None:
    assert schema_errors(monitor) == []
    assert selection_errors(monitor, cluster) == []


def test_kubectl_apply_of_kuberay_does_not_need_the_prometheus_operator() -> None:
    # A PodMonitor fails to apply where its CRD is missing: it lives in a subfolder of its own.
    assert PODMONITOR_FILE.parent != KUBERAY_DIR
    assert PODMONITOR_FILE not in kubectl_apply_files()


@pytest.mark.parametrize(
    ("break_it", "expected"),
    [
        (lambda m: m["spec"]["podMetricsEndpoints"][0].update(intervall="15s"), "intervall"),
        (lambda m: m["spec"]["podMetricsEndpoints"][0].update(interval="15 sec"), "15 sec"),
        (lambda m: m["spec"].pop("selector"), "'selector' is a required property"),
        (lambda m: m.update(apiVersion="monitoring.coreos.com/v1beta1"), "was expected"),
    ],
)
def test_schema_rejects_broken_copies(monitor, break_it, expected) -> None:
    break_it(monitor)
    errors = schema_errors(monitor)
    assert errors and expected in " ".join(errors), errors


def test_a_selector_that_misses_the_pods_is_caught(monitor, cluster) -> None:
    monitor["spec"]["selector"]["matchLabels"]["ray.io/cluster"] = "some-other-cluster"
    errors = selection_errors(monitor, cluster)
    assert len(errors) == 2, errors  # the head group and the worker group
    assert "does not match" in errors[0]


def test_a_port_that_is_not_rays_metrics_port_is_caught(monitor, cluster) -> None:
    monitor["spec"]["podMetricsEndpoints"][0]["port"] = "dashboard"  # 8265 on the head only
    errors = selection_errors(monitor, cluster)
    assert any("'dashboard' is 8265" in e for e in errors), errors
    assert any("'dashboard' is None" in e for e in errors), errors  # workers have no such port
