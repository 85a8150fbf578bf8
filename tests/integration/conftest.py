"""Integration fixture: a real Ray head on this machine, shared by every test of the session."""

from __future__ import annotations

import pytest
from support.ray_cluster import ray_cluster as build_ray_cluster


@pytest.fixture(scope="session")
def ray_cluster():
    """A real Ray head (4 CPUs, dashboard for the state API) in its own processes."""
    with build_ray_cluster(head_cpus=4, dashboard=True) as (cluster, _):
        yield cluster


@pytest.fixture(scope="session")
def ray_address(ray_cluster):
    return ray_cluster.address


@pytest.fixture(scope="session")
def metrics_url(ray_cluster) -> str:
    """The head node's Prometheus endpoint (Ray picked the port when it started)."""
    return f"http://127.0.0.1:{ray_cluster.head_node.metrics_export_port}/metrics"
