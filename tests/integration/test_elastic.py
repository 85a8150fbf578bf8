"""Elastic training on a real multi-node Ray cluster (``ray.cluster_utils.Cluster``): a node is
removed mid-run and the run carries on with fewer workers; a node is added back and the run
grows again. The exactly-once ledger must hold over the whole run. The workload is the image
task (scikit-learn's digits, a small CNN with seeded augmentation)."""

from __future__ import annotations

import pytest
from ray_runs import events, start_cli, two_worker_cluster, wait_for, write_config

from training.core import runlog


@pytest.fixture
def cluster():
    """A head with no CPUs (no training worker lands there) and two 1-CPU worker nodes."""
    with two_worker_cluster() as (cluster, workers):
        yield cluster, workers


def attempt_state(storage, name):
    """(attempts, world size of the latest attempt, steps it ran) from the run log."""
    try:
        logged = events(storage, name)
    except FileNotFoundError:
        return 0, 0, 0
    starts = [e for e in logged if e["event"] == "start"]
    if not starts:
        return 0, 0, 0
    latest = starts[-1]
    done = [e for e in logged if e["event"] == "step" and e["attempt"] == latest["attempt"]]
    return len(starts), latest["world_size"], len(done)


def running_on(storage, name, world_size, steps, after_attempt=0):
    """True once an attempt later than ``after_attempt`` runs ``steps`` steps on ``world_size``."""
    attempts, size, done = attempt_state(storage, name)
    return attempts > after_attempt and size == world_size and done >= steps


def test_node_lost_and_regained(tmp_path, cluster):
    ray_cluster, workers = cluster
    config = write_config(
        tmp_path / "elastic.yaml",
        tmp_path,
        run={"name": "elastic"},
        scaling={"min_workers": 1, "max_workers": 2, "resize_check_interval_s": 2},
        # The image task: its seeded augmentation must not care how the batch is split.
        task={"name": "image", "options": {"width": 64}},
        data={"path": str(tmp_path / "digits"), "create_demo_if_missing": True},
        training={"epochs": 12, "global_batch_size": 64, "log_every_n_steps": 50},
        checkpoint={"every_n_steps": 20, "num_to_keep": 2},
        failure={"max_failures": 5},
    )
    log = tmp_path / "elastic.log"
    proc = start_cli(config, log, address=ray_cluster.address)
    try:
        wait_for(lambda: running_on(tmp_path, "elastic", 2, 30), 240, "30 steps on 2 workers", proc)
        ray_cluster.remove_node(workers[1])
        wait_for(
            lambda: running_on(tmp_path, "elastic", 1, 20),
            240,
            "20 steps on the 1 worker left",
            proc,
        )
        shrunk_at = attempt_state(tmp_path, "elastic")[0]
        ray_cluster.add_node(num_cpus=1)
        wait_for(
            lambda: running_on(tmp_path, "elastic", 2, 10, after_attempt=shrunk_at),
            240,
            "the run to grow back to 2 workers",
            proc,
        )
        assert proc.wait(timeout=400) == 0, log.read_text()[-5000:]
    finally:
        if proc.poll() is None:
            proc.kill()

    report = runlog.check_ledger(events(tmp_path, "elastic"))
    assert report.ok, report.errors
    assert report.completed
    sizes = report.world_sizes
    assert sizes[0] == 2 and 1 in sizes and sizes[-1] == 2, sizes
    assert sizes.index(1) < len(sizes) - 1  # grew back after shrinking
    print(f"elastic: world sizes {sizes}, resumed from {report.resumed_from_steps}")
