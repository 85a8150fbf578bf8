"""Integration fixture: a real Ray head on this machine, shared by every test of the session."""

from __future__ import annotations

import pytest
from ray.cluster_utils import Cluster
from ray_runs import free_port


@pytest.fixture(scope="session")
def ray_cluster():
    """A real Ray head (4 CPUs, dashboard for the state API) in its own processes.

    The pytest process never calls ray.init itself: the tests drive Ray only through the CLI
    (RAY_ADDRESS) and the state API, as a user would. (ray.init/shutdown cycles in one process
    also crashed the interpreter.)
    """
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 4, "include_dashboard": True, "dashboard_port": free_port()},
    )
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()


@pytest.fixture(scope="session")
def ray_address(ray_cluster):
    return ray_cluster.address


@pytest.fixture(scope="session")
def metrics_url(ray_cluster) -> str:
    """The head node's Prometheus endpoint (Ray picked the port when it started)."""
    return f"http://127.0.0.1:{ray_cluster.head_node.metrics_export_port}/metrics"
