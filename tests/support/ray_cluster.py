"""The one builder of a real Ray cluster on this machine (``ray.cluster_utils.Cluster``: a head
and worker nodes as separate raylets, as in Ray's own tests). The pytest process never calls
ray.init itself: tests drive Ray through the CLI (RAY_ADDRESS) and the state API, as a user
would (ray.init/shutdown cycles in one process also crashed the interpreter)."""

from __future__ import annotations

import contextlib

from support.ports import free_port


@contextlib.contextmanager
def ray_cluster(head_cpus: int, worker_nodes: int = 0, dashboard: bool = False):
    """A head with ``head_cpus`` CPUs and ``worker_nodes`` 1-CPU worker nodes; yields
    ``(cluster, worker nodes)``. ``head_cpus=0`` keeps every training worker off the head."""
    from ray.cluster_utils import Cluster

    head = {"num_cpus": head_cpus, "dashboard_port": free_port()}
    if dashboard:
        head["include_dashboard"] = True
    cluster = Cluster(initialize_head=True, head_node_args=head)
    try:
        nodes = [cluster.add_node(num_cpus=1) for _ in range(worker_nodes)]
        cluster.wait_for_nodes()
        yield cluster, nodes
    finally:
        cluster.shutdown()
