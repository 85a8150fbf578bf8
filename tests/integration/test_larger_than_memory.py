"""A table several times larger than the memory a worker may use, streamed. Every training worker
moves itself into a memory cgroup of its own before it loads data (``limited_tasks.py``: after
paying the fixed costs of torch, a baseline it logs), so the kernel enforces the limit. The
streamed run trains to the end through an elastic shrink and grow mid-epoch, and from S3 through
a worker SIGKILL mid-epoch, with the exactly-once ledger exact; the same table loaded whole is
OOM-killed under the same limit (the limit is real)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from memory_limit import MemoryCgroup
from support.cli import REPO, finish, start_cli, wait_for
from support.ray_cluster import ray_cluster
from support.runs import attempt_state, events, newest_valid_step, running_on, write_config
from support.s3 import CREDENTIALS, s3

from training.core import runlog
from training.tasks import tabular

HERE = Path(__file__).resolve().parent
MB = 2**20
# 400k rows x 256 float32 features = 417 MB of Parquet (98 row groups of 4096 rows, 4.2 MB
# decoded each); once it starts loading data a worker may allocate 112 MB above its baseline
# (reader, model, optimizer, DDP, checkpoints, S3 reads, modules imported late: everything),
# 3.5x less than the table (the control test, loading it whole, is OOM-killed).
ROWS, FEATURES, GROUP_ROWS = 400_000, 256, 4096
LIMIT = 112 * MB
WINDOW = 2  # at most 2 x 2 row groups (17 MB decoded) held per worker
BATCH = 1024  # 351 steps per epoch over the 360k training rows
STEPS_PER_EPOCH = 351
TASK = "limited_tasks:MemoryLimitedTabular"


@pytest.fixture(scope="module")
def big_table(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("big") / "table.parquet"
    tabular.write_sharded_demo(pafs.LocalFileSystem(), str(path), ROWS, FEATURES, GROUP_ROWS)
    assert path.stat().st_size > 3.5 * LIMIT
    return path


@pytest.fixture(scope="module")
def limits():
    """The parent cgroup under which each training worker makes its own limited one."""
    parent = MemoryCgroup.under_own()
    yield parent
    parent.remove()


@pytest.fixture
def new_workers(limits):
    """The worker cgroups made during this test (the cluster and parent are shared)."""
    before = {c.path for c in limits.children()}
    return lambda: [c for c in limits.children() if c.path not in before]


@pytest.fixture(scope="module")
def cluster(limits):
    """A head without CPUs and two 1-CPU worker nodes, shared by the tests of this module. The
    nodes' environment reaches the workers: the test task's module, the memory limit, and the
    S3 credentials."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PYTHONPATH", f"{REPO}:{HERE}")
        env.setenv("ELASTIC_TEST_CGROUP_DIR", str(limits.path))
        env.setenv("ELASTIC_TEST_MEMORY_LIMIT", str(LIMIT))
        env.setenv("RAY_DEDUP_LOGS", "0")  # every worker's streaming summary line
        for name, value in CREDENTIALS.items():
            env.setenv(name, value)
        with ray_cluster(head_cpus=0, worker_nodes=2) as (cluster, nodes):
            yield cluster, nodes


def start(config: Path, log: Path, address: str) -> subprocess.Popen:
    """The training CLI joined to the cluster; it can import the test task (PYTHONPATH)."""
    return start_cli(config, log, address=address, env={"PYTHONPATH": f"{REPO}:{HERE}"})


def streamed_config(root: Path, name: str, data_path: str, **sections) -> Path:
    defaults = {
        "run": {"name": name},
        "scaling": {"min_workers": 1, "max_workers": 2, "resize_check_interval_s": 2},
        "task": {
            "name": TASK,
            "options": {"stream": True, "window": WINDOW, "mlp": {"hidden_sizes": [64]}},
        },
        "data": {"path": data_path, "create_demo_if_missing": False},
        "training": {"epochs": 1, "global_batch_size": BATCH, "log_every_n_steps": 50},
        "eval": {"batches": 2},
        "checkpoint": {"every_n_steps": 30, "num_to_keep": 2},
        # A lost node: Ray Train first asks for the old size again (its view of the reserved
        # resources is up to ~20 s old) and waits this long before it tries the smaller one.
        "failure": {"max_failures": 5, "group_start_timeout_s": 20},
    }
    for section, values in sections.items():
        defaults.setdefault(section, {}).update(values)
    return write_config(root / f"{name}.yaml", root, **defaults)


def memory_report(workers: list[MemoryCgroup], output: str) -> tuple[int, list[float], str]:
    """(OOM kills, each finishing worker's peak RSS in MB, a description for the test log)."""
    kills = sum(w.oom_kills() for w in workers)
    rss = [float(m) for m in re.findall(r"streaming: read .* peak RSS (\d+) MB", output)]
    base = [float(m) for m in re.findall(r"memory limit: baseline RSS (\d+) MB", output)]
    charged = ", ".join(f"{w.peak_bytes() / MB:.0f}" for w in workers)
    text = (
        f"table {ROWS * (4 * FEATURES + 8) / MB:.0f} MB decoded, limit {LIMIT / MB:.0f} MB per "
        f"worker above its baseline RSS (MB: {base}); peak charged under the limit per worker "
        f"(MB): {charged}; finishing workers' peak RSS with Python, torch and Ray (MB): {rss}; "
        f"OOM kills {kills}"
    )
    return kills, rss, text


def checkpointed(storage: Path, name: str, step: int) -> bool:
    """A valid checkpoint of ``step`` (or later) is on storage."""
    return (newest_valid_step(storage, name) or 0) >= step


def test_streamed_table_shrinks_and_grows_mid_epoch_within_the_memory_limit(
    tmp_path, big_table, new_workers, cluster
):
    ray_cluster, nodes = cluster
    # A step takes ~15 ms and an epoch seconds, a resize up to a minute: rank 0 stalls (once
    # each) before step 40, where the node is removed, and before step 300, where the cluster
    # grows back; the resize restarts the group and ends the stall. Both resizes mid-epoch.
    stalls = [{"kind": "stall", "rank": 0, "step": s, "seconds": 400} for s in (40, 300)]
    config = streamed_config(
        tmp_path, "elastic", str(big_table), training={"epochs": 2}, chaos={"faults": stalls}
    )
    log = tmp_path / "elastic.log"
    proc = start(config, log, ray_cluster.address)
    try:
        wait_for(
            lambda: (
                running_on(tmp_path, "elastic", 2, 39) and checkpointed(tmp_path, "elastic", 30)
            ),
            300,
            "the stall at step 40, with checkpoint 30 on storage",
            proc,
        )
        ray_cluster.remove_node(nodes[1])
        # Grow back only once the 1-worker attempt (resumed from 30) is in its stall before
        # step 300 with checkpoint 270 saved: the resize must not race the steps before it.
        wait_for(
            lambda: (
                running_on(tmp_path, "elastic", 1, 269) and checkpointed(tmp_path, "elastic", 270)
            ),
            300,
            "the stall at step 300 on 1 worker, with checkpoint 270 on storage",
            proc,
        )
        shrunk_at = attempt_state(tmp_path, "elastic")[0]
        ray_cluster.add_node(num_cpus=1)
        wait_for(
            lambda: running_on(tmp_path, "elastic", 2, 10, after_attempt=shrunk_at),
            300,
            "the run to grow back to 2 workers",
            proc,
        )
    finally:
        assert finish(proc, log, 600) == 0, log.read_text()[-5000:]
    report = runlog.check_ledger(events(tmp_path, "elastic"))
    assert report.ok and report.completed, (report.errors, report)
    assert report.final_step == 2 * STEPS_PER_EPOCH
    sizes, resumed = report.world_sizes, report.resumed_from_steps
    assert sizes[0] == 2 and 1 in sizes and sizes[-1] == 2, sizes
    assert resumed == [None, 30, 270], resumed  # both resizes mid-epoch
    kills, rss, text = memory_report(new_workers(), log.read_text())
    assert kills == 0 and len(new_workers()) >= 5, text  # 2, then 1, then 2 workers
    assert len(rss) == 2, log.read_text()[-3000:]  # both workers of the last attempt finished
    print(f"streamed, elastic: world sizes {sizes}, resumed from {resumed}; {text}")


def test_the_same_table_loaded_whole_is_killed_by_the_same_limit(
    tmp_path, big_table, new_workers, cluster
):
    ray_cluster, _ = cluster
    whole = {"name": TASK, "options": {"stream": False, "mlp": {"hidden_sizes": [64]}}}
    config = streamed_config(
        tmp_path, "whole", str(big_table), task=whole, failure={"max_failures": 0}
    )
    log = tmp_path / "whole.log"
    assert finish(start(config, log, ray_cluster.address), log, 300) == 1, log.read_text()[-3000:]
    kills, _, text = memory_report(new_workers(), log.read_text())
    assert kills >= 1, text
    assert not [e for e in events(tmp_path, "whole") if e["event"] == "step"]  # died loading
    print(f"loaded whole: {text}")


def test_streamed_from_s3_survives_a_worker_kill_mid_epoch(
    tmp_path, big_table, new_workers, cluster, request
):
    ray_cluster, _ = cluster
    endpoint = request.getfixturevalue("s3_endpoint")
    fs = s3(endpoint)
    pafs.copy_files(str(big_table), "training/big/table.parquet", destination_filesystem=fs)
    config = streamed_config(
        tmp_path,
        "streamed",
        "s3://training/big/table.parquet",
        storage={"path": "s3://training/runs", "endpoint_override": endpoint, "scheme": "http"},
        chaos={"faults": [{"kind": "kill", "rank": 1, "step": 200}]},  # SIGKILL, mid-epoch
    )
    log = tmp_path / "s3.log"
    assert finish(start(config, log, ray_cluster.address), log, 600) == 0, log.read_text()[-5000:]
    report = runlog.check_ledger(runlog.read_events(fs, "training/runs/streamed"))
    assert report.ok and report.completed, (report.errors, report)
    assert report.final_step == STEPS_PER_EPOCH
    resumed = report.resumed_from_steps
    assert len(resumed) == 2 and 0 < resumed[1] < 200, resumed  # resumed mid-epoch from S3
    kills, rss, text = memory_report(new_workers(), log.read_text())
    assert kills == 0 and len(rss) == 2, text
    print(f"streamed from S3, worker killed at step 200: resumed from {resumed}; {text}")
