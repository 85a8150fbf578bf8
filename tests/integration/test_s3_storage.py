"""Runs, checkpoints, run logs and data on S3-compatible object storage (a real SeaweedFS S3
server on loopback), through pyarrow.fs, including a worker kill and a resume from S3."""

from __future__ import annotations

import pyarrow.fs as pafs
from support.cli import run, train_cli
from support.runs import write_config
from support.s3 import CREDENTIALS, KEY, SECRET, s3

from training.core import checkpoint, runlog, storage


def test_training_on_s3_resumes_after_a_kill(tmp_path, s3_endpoint):
    storage = {"path": "s3://training/runs", "endpoint_override": s3_endpoint, "scheme": "http"}
    config = write_config(
        tmp_path / "s3.yaml",
        tmp_path,
        run={"name": "on-s3"},
        storage=storage,
        data={"path": "s3://training/data/demo.parquet"},
        chaos={"faults": [{"kind": "kill", "rank": 1, "step": 50}]},
    )
    # No RAY_ADDRESS: the CLI starts its own Ray, whose workers inherit the credentials.
    result = train_cli(config, address=None, env=CREDENTIALS, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Starting fresh run 'on-s3' at s3://training/runs/on-s3" in result.stdout

    fs = s3(s3_endpoint)
    report = runlog.check_ledger(runlog.read_events(fs, "training/runs/on-s3"))
    assert report.ok, report.errors
    assert report.completed and report.final_step == 114
    # Rank 1 died before step 50: rank 0 saved the state of step 49 to S3 on failure, and the
    # retry read it back from there.
    assert report.resumed_from_steps == [None, 49]
    kept = checkpoint.scan(fs, "training/runs/on-s3")
    assert kept[0].step == 114 and all(c.valid for c in kept)
    assert len(kept) <= 2 * 2  # num_to_keep 2: Ray's registered ones plus ours at most
    assert_tensorboard_and_plot_work_from_s3(fs, tmp_path, config)


def assert_tensorboard_and_plot_work_from_s3(fs, tmp_path, config) -> None:
    """Event files uploaded through pyarrow.fs (one per attempt) draw one curve; plot reads S3."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    local = tmp_path / "tensorboard"
    local.mkdir()
    files = storage.list_dir(fs, "training/runs/on-s3/tensorboard")
    attempts = {f.base_name.rsplit(".", 1)[-1].split("-")[0] for f in files}
    assert len(attempts) == 2, [f.path for f in files]  # segments of the killed and the resumed
    for info in files:
        (local / info.base_name).write_bytes(storage.read_bytes(fs, info.path))
    board = EventAccumulator(str(local), size_guidance={"scalars": 0})
    board.Reload()
    # Scalars come from the logged steps (every 20 and the last), each once and in order across
    # the kill and the redo; the rolled-back points are purged (tests/unit/test_tensorboard.py).
    loss_steps = [e.step for e in board.Scalars("train/loss")]
    assert loss_steps == [20, 40, 60, 80, 100, 114], loss_steps
    assert [e.step for e in board.Scalars("train/world_size")] == loss_steps

    png = tmp_path / "on-s3.png"
    plotted = run("plot", "--config", config, "--name", "on-s3", "--out", png,
                  address=None, env=CREDENTIALS, timeout=120)  # fmt: skip
    assert plotted.returncode == 0, plotted.stdout + plotted.stderr
    assert png.read_bytes()[:4] == b"\x89PNG" and "1 restarts" in plotted.stdout


def test_a_missing_bucket_or_denied_access_exits_2_before_ray(tmp_path, s3_endpoint, monkeypatch):
    """The store answers, but the bucket is not there or the key is wrong: one line naming the
    endpoint and what to check, exit 2, nothing created (training/core/storage.py classifies)."""
    from click.testing import CliRunner

    from training.driver.cli import main

    data = tmp_path / "d.parquet"
    assert CliRunner().invoke(main, ["demo-data", "--out", str(data)]).exit_code == 0
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    train = ["train", "--set", f"data.path={data}", "--set", "storage.scheme=http",
             "--set", f"storage.endpoint_override={s3_endpoint}"]  # fmt: skip

    missing = CliRunner().invoke(main, [*train, "--storage", "s3://no-such-bucket/runs"])
    assert missing.exit_code == 2, missing.output
    assert missing.output.strip().splitlines() == [
        f"error: bucket 'no-such-bucket' does not exist at S3 endpoint http://{s3_endpoint} "
        "(for s3://no-such-bucket/runs): create it, correct the path, or set "
        "storage.allow_bucket_creation: true"
    ]
    assert s3(s3_endpoint).get_file_info("no-such-bucket").type == pafs.FileType.NotFound

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    denied = CliRunner().invoke(main, [*train, "--storage", "s3://training/runs"])
    assert denied.exit_code == 2, denied.output
    assert denied.output.strip().splitlines() == [
        f"error: access denied to s3://training/runs at S3 endpoint http://{s3_endpoint} "
        "(ACCESS_DENIED during HeadBucket): check the credentials (AWS_ACCESS_KEY_ID / "
        "AWS_SECRET_ACCESS_KEY, on every node) and that they may read and write this bucket"
    ]
