"""CLI behaviour that needs no Ray: bad input is refused before any cluster resource is taken."""

import json
import subprocess
import sys

import pytest
import ray
import torch
from click.testing import CliRunner

from training.core import checkpoint, runlog
from training.driver import launch, lease
from training.driver.cli import main
from training.driver.settings import parse_config


def run(*args):
    return CliRunner().invoke(main, list(args))


def test_bad_config_exits_2_with_one_line_per_problem_before_ray_starts(tmp_path):
    result = run(
        "train",
        "--config",
        "training/configs/local.yaml",
        "--set",
        "training.global_batch_size=-4",
        "--set",
        "scaling.max_workers=1",
        "--storage",
        str(tmp_path),
    )
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert lines == [
        "config error: scaling: min_workers (2) must be <= max_workers (1)",
        "config error: training.global_batch_size: Input should be greater than 0 (got -4)",
    ]
    assert not ray.is_initialized()
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_missing_data_is_refused_before_ray_starts(tmp_path):
    result = run(
        "train",
        "--storage",
        str(tmp_path / "runs"),
        "--set",
        f"data.path={tmp_path / 'none.parquet'}",
    )
    assert result.exit_code == 2
    assert "data.path: " in result.output and "does not exist" in result.output
    assert not ray.is_initialized()


def test_resuming_with_a_different_model_or_seed_is_refused(tmp_path):
    base = {
        "storage": {"path": str(tmp_path)},
        "data": {"path": str(tmp_path / "d.parquet"), "create_demo_if_missing": True},
        "task": {"options": {"demo_rows": 256}},
    }
    launch.prepare_run(parse_config(base))
    saved = (tmp_path / "demo" / "run_config.json").read_bytes()
    result = run(
        "train",
        "--storage",
        str(tmp_path),
        "--set",
        f"data.path={tmp_path / 'd.parquet'}",
        "--set",
        "training.seed=5",
        "--set",
        "task.options.demo_rows=256",
        "--set",
        "task.options.model=transformer",
    )
    assert result.exit_code == 2
    assert "run 'demo' already exists" in result.output
    assert "training.seed: 0 -> 5" in result.output and "task:" in result.output
    assert (tmp_path / "demo" / "run_config.json").read_bytes() == saved  # nothing overwritten
    assert not ray.is_initialized()


def test_status_and_verify_on_an_empty_storage(tmp_path):
    result = run("status", "--storage", str(tmp_path))
    assert result.exit_code == 0 and "No runs under" in result.output
    result = run("verify", "--storage", str(tmp_path), "--name", "ghost", "--json")
    assert result.exit_code == 1
    assert json.loads(result.output)["errors"] == ["the run log has no attempts"]


def test_status_reads_storage_without_importing_torch(tmp_path):
    """`status` is polled by people and scripts while a run trains (the e2e tests every 2 s, in
    the head container): loading torch and the task registry for it cost 2-3 s of CPU a call."""
    script = (
        "import sys; from training.driver.cli import main\n"
        f"main(['status', '--storage', {str(tmp_path)!r}], standalone_mode=False)\n"
        "assert 'torch' not in sys.modules, 'status imported torch'\n"
        "assert 'training.tasks' not in sys.modules, 'status imported the task registry'\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert f"No runs under {tmp_path}" in proc.stdout


def test_verify_deep_reads_checksums_that_status_does_not(tmp_path, monkeypatch):
    """A byte flipped in place keeps every size: only `verify --deep` (or a load) can see it."""
    for step in (10, 20):
        state = {"progress": {"global_step": step}, "weights": torch.randn(256)}
        checkpoint.write_state(tmp_path / "r" / checkpoint.dir_name(step), state)
    state_file = tmp_path / "r" / checkpoint.dir_name(20) / checkpoint.STATE_FILE
    blob = bytearray(state_file.read_bytes())
    blob[-200] ^= 0xFF
    state_file.write_bytes(bytes(blob))
    ledger = runlog.LedgerReport(True, True, 1, [1], [None], 20)
    monkeypatch.setattr(runlog, "check_ledger", lambda events: ledger)  # only checkpoints matter

    shallow = run("verify", "--storage", str(tmp_path), "--name", "r", "--json")
    assert shallow.exit_code == 0 and "checkpoints" not in json.loads(shallow.output)
    status = run("status", "--storage", str(tmp_path), "--name", "r", "--json")
    assert [c["valid"] for c in json.loads(status.output)[0]["checkpoints"]] == [True, True]

    deep = run("verify", "--storage", str(tmp_path), "--name", "r", "--deep", "--json")
    assert deep.exit_code == 1
    found = [(c["step"], c["valid"], c["reason"]) for c in json.loads(deep.output)["checkpoints"]]
    assert found == [
        (20, False, "train_state.pt checksum does not match the manifest"),
        (10, True, ""),
    ]
    text = run("verify", "--storage", str(tmp_path), "--name", "r", "--deep")
    assert text.exit_code == 1
    assert "checkpoint step 20: INVALID (train_state.pt checksum does not match" in text.output
    assert "checkpoint step 10: checksums match" in text.output


def test_demo_data_command(tmp_path):
    out = tmp_path / "demo.parquet"
    result = run("demo-data", "--out", str(out))
    assert result.exit_code == 0 and out.stat().st_size > 0
    bad = run("demo-data", "--task", "gpt", "--out", str(tmp_path / "x"))
    assert bad.exit_code == 2 and "task.name 'gpt'" in bad.output


def test_relative_paths_are_resolved_for_the_workers(tmp_path, monkeypatch):
    """Workers run in Ray's own directories: a relative path must reach them absolute."""
    monkeypatch.chdir(tmp_path)
    cfg = launch.with_absolute_paths(
        parse_config({"storage": {"path": "runs"}, "data": {"path": "data/d.parquet"}})
    )
    assert cfg.storage.path == str(tmp_path / "runs")
    assert cfg.data.path == str(tmp_path / "data" / "d.parquet")
    remote = launch.with_absolute_paths(parse_config({"storage": {"path": "s3://b/runs"}}))
    assert remote.storage.path == "s3://b/runs"


def test_ray_starts_inside_the_lease_settle_window_not_after_it(tmp_path, monkeypatch):
    """Starting Ray fills the lease's settle wait (training/driver/lease.py) instead of following
    it."""
    cfg = parse_config(
        {
            "storage": {"path": str(tmp_path)},
            "data": {"path": str(tmp_path / "d.parquet"), "create_demo_if_missing": True},
            "task": {"options": {"demo_rows": 256}},
        }
    )
    slept: list[float] = []
    monkeypatch.setattr(lease.time, "sleep", slept.append)  # the settle wait, recorded
    sleeps_before_connect: list[list[float]] = []
    monkeypatch.setattr(launch, "connect_ray", lambda _: sleeps_before_connect.append(list(slept)))

    class Stop(Exception):
        pass

    def stop(*_):
        raise Stop

    monkeypatch.setattr(launch, "build_trainer", stop)
    with pytest.raises(Stop):
        launch.train(cfg)
    assert sleeps_before_connect[0] == []  # Ray was started before any settle sleep...
    assert slept and slept[0] < lease.SETTLE_S  # ...and the sleep that followed was shortened


def test_ray_train_settings_go_by_variables_ray_train_passes_to_its_controller():
    """failure.* settings Ray Train reads only from the environment: each variable set must be
    one Ray propagates from the driver to its controller, or the setting would silently not
    apply (the group start timeout is read in the controller's worker group)."""
    from ray.train.v2._internal.constants import ENV_VARS_TO_PROPAGATE

    cfg = parse_config({"failure": {"group_start_timeout_s": 20, "health_check_interval_s": 0.5}})
    env = launch.ray_train_environment(cfg)
    assert env["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] == "20.0"
    assert env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.5"
    assert set(env) <= ENV_VARS_TO_PROPAGATE, set(env) - ENV_VARS_TO_PROPAGATE
