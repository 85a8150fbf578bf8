"""Fixtures shared by the offline KubeRay tests: the manifests, and fresh copies to break."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from kuberay_invariants import all_manifests, one


@pytest.fixture(scope="module")
def manifests() -> list[dict[str, Any]]:
    return all_manifests()


@pytest.fixture
def cluster(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    return copy.deepcopy(one("RayCluster", manifests))


@pytest.fixture
def job(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    return copy.deepcopy(one("RayJob", manifests))
