"""Warm spares (training/ray_internals/spares.py): which processes count as this job's spares, how
many the
keeper asks Ray for, and that a broken preload never takes the worker down."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from training.ray_internals import spares


def fake_process(proc: Path, pid: int, title: str, **env: str) -> None:
    entry = proc / str(pid)
    entry.mkdir(parents=True)
    (entry / "cmdline").write_bytes(title.encode() + b"\0")
    (entry / "environ").write_bytes(b"\0".join(f"{k}={v}".encode() for k, v in env.items()))


@pytest.fixture
def proc(tmp_path):
    root = tmp_path / "proc"
    marker = spares.JOB_MARKER
    fake_process(root, 10, "ray::IDLE", **{marker: "01000000"})  # a spare of this job
    fake_process(root, 11, "ray::RayTrainWorker.train_fn", **{marker: "01000000"})  # in use
    fake_process(root, 12, "ray::IDLE", **{marker: "02000000"})  # another job's spare
    fake_process(root, 13, "ray::IDLE", PATH="/usr/bin")  # a plain Ray worker
    fake_process(root, 14, "ray::Holder", **{marker: ""})  # a helper actor, marker cleared
    (root / "self").mkdir()
    (root / "stat").write_text("cpu  1 2 3\nbtime 1700000000\n")
    return root


def test_spares_are_marked_processes_without_a_train_worker(proc):
    assert spares.spare_pids("01000000", proc) == [10]
    assert sorted(spares.spare_pids(None, proc)) == [10, 12]


def test_a_process_that_vanishes_while_listed_is_skipped(proc):
    (proc / "15").mkdir()  # no environ: gone between listing and reading
    assert spares.spare_pids("01000000", proc) == [10]


def test_process_start_time_comes_from_boot_time_and_start_ticks(proc):
    ticks = 250 * spares.os.sysconf("SC_CLK_TCK")
    fields = ["S"] + ["0"] * 18 + [str(ticks)]  # starttime is field 22, the 20th after ')'
    (proc / "self/stat").write_text(f"4242 (ray::IDLE (x)) {' '.join(fields)} 0 0\n")
    assert spares.process_started_at(proc) == pytest.approx(1700000250.0)
    (proc / "stat").write_text("cpu 1\n")  # no btime: unknown, not made up
    assert spares.process_started_at(proc) is None


def test_the_keeper_asks_only_for_the_missing_spares(proc, monkeypatch):
    asked = []
    monkeypatch.setattr(spares, "prestart", asked.append)
    listed = spares.spare_pids
    monkeypatch.setattr(spares, "spare_pids", lambda job: listed(job, proc))
    monkeypatch.setenv(spares.JOB_MARKER, "01000000")
    keeper = spares.Keeper(wanted=3)
    assert keeper.top_up() == 2 and asked == [2]  # one spare (pid 10) is there already
    assert spares.Keeper(wanted=1).top_up() == 0 and asked == [2]


def test_the_keeper_stops_at_the_first_error_and_training_goes_on(monkeypatch, caplog):
    def broken(count):
        raise RuntimeError("raylet unreachable")

    monkeypatch.setattr(spares, "prestart", broken)
    monkeypatch.setattr(spares, "spare_pids", lambda job: [])
    monkeypatch.setenv(spares.JOB_MARKER, "01000000")
    keeper = spares.Keeper(wanted=1)
    keeper.start()
    keeper._thread.join(timeout=10)
    assert not keeper._thread.is_alive()
    assert "restarts start cold" in caplog.text


def test_no_keeper_thread_when_the_driver_turned_spares_off(monkeypatch):
    monkeypatch.delenv(spares.JOB_MARKER, raising=False)
    keeper = spares.Keeper(wanted=2)
    keeper.start()
    assert not keeper._thread.is_alive()


def test_preload_survives_a_module_that_cannot_be_imported(monkeypatch, caplog):
    monkeypatch.setattr(spares, "PRELOAD", ("json", "no_such_module_for_the_test"))
    before = time.time()
    spares.preload()
    assert spares.preloaded_at is not None and spares.preloaded_at >= before
    assert "json" in sys.modules
    assert "could not preload no_such_module_for_the_test" in caplog.text


def test_helper_actors_clear_the_hook_and_the_marker():
    helper_env = spares.without_spares()["env_vars"]
    for variable in spares.runtime_env("01000000")["env_vars"]:
        assert helper_env[variable] == ""


def test_only_a_process_started_beside_a_running_train_worker_counts_as_a_spare(proc):
    assert spares._training_here("01000000", proc)  # pid 11 trains for job 01000000
    assert not spares._training_here("02000000", proc)  # job 02000000 has only a spare
    assert not spares._training_here("", proc)  # spares off: no marker


def test_a_spare_imports_at_the_lowest_priority_in_a_thread_of_its_own(monkeypatch):
    seen = []

    def record(name):
        thread = spares.threading.current_thread()
        nice = spares.os.getpriority(spares.os.PRIO_PROCESS, spares.threading.get_native_id())
        seen.append((name, thread.name, nice))

    monkeypatch.setattr(spares, "PRELOAD", ("json",))
    monkeypatch.setattr(spares.importlib, "import_module", record)
    main_nice = spares.os.getpriority(spares.os.PRIO_PROCESS, 0)
    monkeypatch.setattr(spares, "_training_here", lambda job: True)
    spares.preload()
    monkeypatch.setattr(spares, "_training_here", lambda job: False)
    spares.preload()  # the first group's workers (nothing trains yet) import at full speed
    assert seen == [("json", "spare-preload", 19), ("json", "MainThread", main_nice)]
    assert spares.os.getpriority(spares.os.PRIO_PROCESS, 0) == main_nice


def node(address: str, alive: bool = True, **resources: float) -> dict:
    return {
        "Alive": alive,
        "NodeManagerAddress": address,
        "NodeManagerPort": 1,
        "Resources": resources,
    }


def test_the_first_group_is_started_where_train_workers_fit_up_to_max_workers():
    nodes = [
        node("head", CPU=0.0),  # a head started with --num-cpus=0 holds no train worker
        node("dead", alive=False, CPU=8.0),
        node("a", CPU=3.0),
        node("b", CPU=1.0),
        node("c", CPU=4.0),
    ]
    assert spares.first_group_plan(nodes, 5, {"CPU": 1}) == {"a:1": 3, "b:1": 1, "c:1": 1}
    assert spares.first_group_plan(nodes, 2, {"CPU": 2}) == {"a:1": 1, "c:1": 1}
    gpus = [node("cpu-only", CPU=8.0), node("gpu", CPU=8.0, GPU=1.0)]
    assert spares.first_group_plan(gpus, 4, {"CPU": 1, "GPU": 1}) == {"gpu:1": 1}


def test_runtime_envs_merge_as_ray_merges_a_child_into_its_parent():
    """env_vars are merged (the child's value wins); any other field is the child's."""
    job = {"working_dir": "gcs://job.zip", "env_vars": {"A": "job", "B": "job"}}
    child = {"env_vars": {"B": "child", "C": "child"}, "pip": ["x"]}
    assert spares.merge_runtime_envs(job, child) == {
        "working_dir": "gcs://job.zip",
        "env_vars": {"A": "job", "B": "child", "C": "child"},
        "pip": ["x"],
    }
    assert spares.merge_runtime_envs({}, child) == child
