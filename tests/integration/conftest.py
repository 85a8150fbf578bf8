"""Integration fixture: a real Ray head on this machine, shared by every test of the session."""

from __future__ import annotations

import pytest
from ray.cluster_utils import Cluster
from ray_runs import free_port


@pytest.fixture(scope="session")
def ray_address():
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
    yield cluster.address
    cluster.shutdown()
