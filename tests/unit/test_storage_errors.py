"""Storage failures are named (endpoint, path, what to check) and classified from pyarrow's real
errors; the CLI refuses unusable storage and a missing GPU with exit 2 before Ray starts, and
offers to resume only a run that has a checkpoint.

Real connection errors come from an S3FileSystem pointed at a closed loopback port (127.0.0.1:9);
missing-bucket and access-denied errors need a real store: their message texts below are copied
from SeaweedFS runs, and tests/integration/test_s3_storage.py checks them end to end."""

from __future__ import annotations

import pickle
import socket
import time

import pyarrow.fs as pafs
import pytest
import ray
import torch
import torch.distributed.checkpoint as dcp
from click.testing import CliRunner
from support.checkpoints import save
from torch.distributed.checkpoint import CheckpointException

from training.core import dcp_storage, storage
from training.core.config import StorageSection
from training.core.storage import StorageError
from training.driver import launch
from training.driver.cli import main
from training.driver.settings import parse_config
from training.tasks import DataSource, build

CLOSED = "127.0.0.1:9"  # nothing listens on the discard port: connections are refused at once
DOWN = StorageSection(path="s3://bucket/runs", endpoint_override=CLOSED, scheme="http")


@pytest.fixture(autouse=True)
def no_cloud_lookups(monkeypatch):
    """Credentials from the environment: the AWS SDK must not ask a metadata service."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def s3(endpoint: str = CLOSED, **options) -> pafs.S3FileSystem:
    retry = pafs.AwsStandardS3RetryStrategy(max_attempts=1)
    return storage.S3FileSystem(
        endpoint_override=endpoint, scheme="http", retry_strategy=retry, **options
    )


def raised(call) -> OSError:
    with pytest.raises(OSError) as caught:
        call()
    return caught.value


def run(*args):
    return CliRunner().invoke(main, list(args))


# ---- classification of pyarrow's own errors ------------------------------------------------
def test_a_refused_connection_names_the_endpoint_and_what_to_check():
    fs = s3()
    error = storage.classify(raised(lambda: fs.get_file_info("bucket/runs")), fs, "s3://b/runs")
    assert error.kind == StorageError.UNREACHABLE and error.transient
    assert error.describe() == (
        "cannot reach S3 endpoint http://127.0.0.1:9 (connection refused) for s3://b/runs: "
        "check storage.endpoint_override / storage.scheme and that the store is up"
    )


def test_a_store_that_accepts_but_never_answers_is_a_timeout():
    with socket.socket() as silent:  # the kernel completes the handshake; nobody replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        fs = s3(f"127.0.0.1:{silent.getsockname()[1]}", request_timeout=0.5, connect_timeout=0.5)
        exc = raised(lambda: fs.get_file_info("bucket/runs"))
    error = storage.classify(exc, fs, "s3://bucket/runs")
    assert error.kind == StorageError.TIMEOUT and error.transient
    assert "timed out for s3://bucket/runs" in str(error)


# Texts of pyarrow 26 errors from a SeaweedFS server (wrong secret key; a read-only identity
# writing; a bucket that does not exist) and of a 5xx answer.
@pytest.mark.parametrize(
    ("text", "kind", "named"),
    [
        (
            "When getting information for bucket 'training': AWS Error ACCESS_DENIED during "
            "HeadBucket operation: No response body.",
            StorageError.DENIED,
            "access denied to s3://training/runs at S3 endpoint http://127.0.0.1:9 "
            "(ACCESS_DENIED during HeadBucket): check the credentials",
        ),
        (
            "When listing objects under key 'runs/' in bucket 'training': AWS Error "
            "SIGNATURE_DOES_NOT_MATCH during ListObjectsV2 operation: The request signature we "
            "calculated does not match the signature you provided.",
            StorageError.DENIED,
            "(SIGNATURE_DOES_NOT_MATCH during ListObjectsV2)",
        ),
        (
            "Bucket 'training' not found. To create buckets, enable the allow_bucket_creation "
            "option.",
            StorageError.NO_BUCKET,
            "bucket 'training' does not exist at S3 endpoint http://127.0.0.1:9",
        ),
        (
            "When reading information for key 'data/x' in bucket 'training': AWS Error "
            "INTERNAL_FAILURE during GetObject operation: internal error",
            StorageError.OUTAGE,
            "(INTERNAL_FAILURE during GetObject): the store is down or overloaded",
        ),
        (
            "When reading information for key 'x' in bucket 'training': AWS Error UNKNOWN "
            "(HTTP status 503) during HeadObject operation: No response body.",
            StorageError.OUTAGE,
            "failed for s3://training/runs",
        ),
    ],
)
def test_store_answers_are_classified(text, kind, named):
    error = storage.classify(OSError(text), s3(), "s3://training/runs")
    assert error.kind == kind and named in str(error)
    assert error.transient == (kind == StorageError.OUTAGE)


def test_errors_that_are_not_the_stores_are_left_alone(tmp_path):
    bad_parquet = OSError("Could not open Parquet input source 'x': Parquet magic bytes not found")
    assert storage.classify(bad_parquet, s3(), "s3://b/x") is None
    local = raised(lambda: pafs.LocalFileSystem().open_input_stream(str(tmp_path / "none")))
    assert storage.classify(local, pafs.LocalFileSystem(), str(tmp_path)) is None


def test_a_storage_error_survives_pickling_and_so_does_the_retry_strategy():
    error = pickle.loads(pickle.dumps(StorageError(StorageError.TIMEOUT, "slow")))
    assert (error.kind, str(error)) == (StorageError.TIMEOUT, "slow")
    # Ray ships the run's filesystem to the workers pickled; pyarrow's own pickle rebuilds a
    # plain S3FileSystem with the default retries, ours goes through storage.resolve's options.
    fs, _ = storage.resolve("s3://b/runs", DOWN)
    assert type(pickle.loads(pickle.dumps(fs))) is storage.S3FileSystem


def test_during_training_a_transient_error_says_so():
    fs = s3()
    expected = r"^transient storage error \(outage\) during training"
    with pytest.raises(StorageError, match=expected), storage.named_errors(fs, "s3://b", True):
        fs.get_file_info("b/data")


def test_tabular_data_on_an_unreachable_store_is_a_storage_error_not_bad_parquet():
    fs = s3()
    task = build("tabular", {}, DataSource(fs, "b/d.parquet", "s3://b/d.parquet", 0.1))
    with pytest.raises(StorageError, match=r"cannot reach S3 endpoint http://127\.0\.0\.1:9"):
        task.check()  # on the driver: the pre-flight line
    with pytest.raises(StorageError, match=r"^transient storage error"):
        task.load()  # in a worker: Ray Train retries the attempt


def test_a_sharded_checkpoint_on_an_unreachable_store_fails_naming_it():
    """DCP's file operations go through pyarrow.fs (core/dcp_storage.py); DCP wraps a rank's
    failure in its CheckpointException, and ``storage_failures`` raises the StorageError again.
    A load's failure to read ``.metadata`` DCP turns into text of its own: it still names the
    store and the file. ~0.1 s."""
    fs, state = s3(), {"weight": torch.ones(2)}
    named = r"cannot reach S3 endpoint http://127\.0\.0\.1:9 \(connection refused\) for "
    expected = f"^transient storage error .*{named}s3://b/run/ckpt"
    with pytest.raises(StorageError, match=expected), dcp_storage.storage_failures():
        # one process, no group: DCP saves without collectives
        dcp.save(state, storage_writer=dcp_storage.Writer(fs, "b/run/ckpt"))
    expected = f"^DCP failed on rank\\(s\\) \\[0\\]: .*{named}s3://b/run/ckpt/.metadata"
    with pytest.raises(RuntimeError, match=expected), dcp_storage.storage_failures():
        dcp.load(state, storage_reader=dcp_storage.Reader(fs, "b/run/ckpt"))


def test_any_other_dcp_failure_is_an_exception_the_attempt_catches():
    """DCP's CheckpointException is a BaseException: raised as it is, it skipped the attempt's
    ``except Exception`` (no wait for the seal in flight, no save on failure)."""
    failures = {1: (ConnectionError("peer closed the connection"), None)}
    expected = r"^DCP failed on rank\(s\) \[1\]: peer closed"
    with pytest.raises(Exception, match=expected) as caught, dcp_storage.storage_failures():
        raise CheckpointException("save", failures)
    assert isinstance(caught.value.__cause__, CheckpointException)


# ---- the pre-flight probe and the CLI --------------------------------------------------------
def test_the_probe_fails_fast_and_leaves_local_paths_alone(tmp_path):
    storage.check_reachable(str(tmp_path / "runs"), DOWN)  # local: nothing to ask
    started = time.monotonic()
    with pytest.raises(StorageError) as caught:
        storage.check_reachable("s3://bucket/runs", DOWN)
    assert caught.value.kind == StorageError.UNREACHABLE
    assert time.monotonic() - started < 10  # not the training back-off (~10-20 s)


UNREACHABLE_LINE = (
    "error: cannot reach S3 endpoint http://127.0.0.1:9 (connection refused) for "
    "s3://bucket/runs: check storage.endpoint_override / storage.scheme and that the store is up"
)
S3_DOWN = ["--set", f"storage.endpoint_override={CLOSED}", "--set", "storage.scheme=http"]


def test_train_on_an_unreachable_store_exits_2_with_one_line_before_ray(tmp_path):
    data = tmp_path / "d.parquet"
    assert run("demo-data", "--out", str(data)).exit_code == 0
    result = run("train", "--storage", "s3://bucket/runs", "--set", f"data.path={data}", *S3_DOWN)
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [UNREACHABLE_LINE]
    assert not ray.is_initialized()


def test_data_on_an_unreachable_store_is_named(tmp_path):
    result = run("train", "--storage", str(tmp_path), "--set", "data.path=s3://d/x", *S3_DOWN)
    assert result.exit_code == 2
    assert "cannot reach S3 endpoint http://127.0.0.1:9 (connection refused) for s3://d/x" in (
        result.output
    )
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize(
    "command", [["status"], ["verify", "--name", "x"], ["plot", "--name", "y"]]
)
def test_status_verify_and_plot_on_an_unreachable_store_exit_2(tmp_path, command):
    config = tmp_path / "c.yaml"
    config.write_text(
        f"storage: {{path: 's3://bucket/runs', endpoint_override: '{CLOSED}', scheme: http}}\n"
    )
    result = run(*command, "--config", str(config))
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [UNREACHABLE_LINE]


def test_the_resume_hint_only_when_there_is_a_checkpoint(tmp_path):
    cfg = parse_config({"storage": {"path": str(tmp_path)}, "run": {"name": "r"}})
    assert launch.resume_hint(cfg).startswith("Nothing to resume: run 'r' has no valid checkpoint")
    save(tmp_path / "r", 12)
    assert launch.resume_hint(cfg) == (
        "Run the same command again to resume run 'r' from its newest checkpoint (step 12)."
    )
    down = parse_config({"storage": DOWN.model_dump(), "run": {"name": "r"}})
    assert launch.resume_hint(down).startswith(
        "Cannot look for a checkpoint to resume from: cannot reach S3 endpoint"
    )


def test_a_failed_run_without_a_checkpoint_is_not_told_to_resume(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("the workers died")

    monkeypatch.setattr(launch, "train", fail)
    result = run("train", "--storage", str(tmp_path))
    assert result.exit_code == 1
    assert result.output.splitlines() == [
        "Training failed: RuntimeError: the workers died",
        "Nothing to resume: run 'demo' has no valid checkpoint. Fix the cause above, then run "
        "the same command again (it starts from step 0).",
    ]


def test_an_unreachable_store_after_a_failure_costs_one_line_not_the_error(tmp_path, capsys):
    cfg = parse_config({"storage": DOWN.model_dump()})
    fs, run_dir = storage.run_location(cfg.storage, cfg.run.name)
    run_state = launch.RunState(fs, run_dir, resume_from=None, existed=False)
    assert launch.stop_marker_after_failure(cfg, run_state) is None
    warning = capsys.readouterr().err.strip().splitlines()
    assert warning == [
        "warning: cannot read the run's stop marker: cannot reach S3 endpoint "
        "http://127.0.0.1:9 (connection refused) for s3://bucket/runs: check "
        "storage.endpoint_override / storage.scheme and that the store is up"
    ]


# ---- GPU pre-flight --------------------------------------------------------------------------
def gpu_config(min_workers: int = 2, use_gpu: bool = True):
    scaling = {"use_gpu": use_gpu, "min_workers": min_workers, "max_workers": 4}
    return parse_config({"scaling": scaling, "training": {"global_batch_size": 48}})


def test_gpu_shortfall_decision():
    assert launch.gpu_shortfall(gpu_config(use_gpu=False), 0, "here") is None
    assert launch.gpu_shortfall(gpu_config(2), 2, "here") is None
    assert launch.gpu_shortfall(gpu_config(2), 1, "the Ray cluster at x:6379") == (
        "scaling.use_gpu is true but the Ray cluster at x:6379 has 1 GPU(s); "
        "scaling.min_workers (2) x 1 GPU per worker needs 2: run where the GPUs are, lower "
        "scaling.min_workers, or set scaling.use_gpu: false"
    )


def test_use_gpu_without_a_gpu_exits_2_before_anything_starts(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 0)  # as on this CPU-only machine
    result = run("train", "--storage", str(tmp_path / "runs"), "--set", "scaling.use_gpu=true")
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: scaling.use_gpu is true but this machine (local Ray) has 0 GPU(s); "
        "scaling.min_workers (2) x 1 GPU per worker needs 2: run where the GPUs are, lower "
        "scaling.min_workers, or set scaling.use_gpu: false"
    ]
    assert not ray.is_initialized() and not (tmp_path / "runs").exists()


def test_a_remote_cluster_without_enough_gpus_is_refused_after_connecting(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "head:6379")
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: None)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0, "GPU": 1.0})
    with pytest.raises(launch.ConfigError, match="the Ray cluster at head:6379 has 1 GPU"):
        launch.connect_ray(gpu_config(2))
    launch.connect_ray(gpu_config(1))  # one worker fits one GPU


# A worker's error as Ray's WorkerGroupError carried it when the store went down mid-run
# (SeaweedFS stopped after checkpoint 10 of a real run; abridged).
WORKER_ERROR = (
    "Training failed due to worker errors:\n[Rank 0 Error Snippet]:\nTraceback (most recent "
    "call last):\n  ...\nOSError: When testing for existence of bucket 'training': AWS Error "
    "NETWORK_CONNECTION during HeadBucket operation: curlCode: 7, Could not connect to server; "
    "Details: Failed to connect to 127.0.0.1:9 after 0 ms: Could not connect to server"
)


def test_a_workers_storage_error_is_named_as_an_outage_after_the_failure(monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError(WORKER_ERROR)

    monkeypatch.setattr(launch, "train", fail)
    result = run("train", "--storage", "s3://training/runs", *S3_DOWN)
    assert result.exit_code == 1
    reachable = (
        "cannot reach S3 endpoint http://127.0.0.1:9 (connection refused) for s3://training%s: "
        "check storage.endpoint_override / storage.scheme and that the store is up"
    )
    assert result.output.splitlines()[-2:] == [
        "The cause was a transient storage error (outage): " + reachable % "",
        "Cannot look for a checkpoint to resume from: " + reachable % "/runs" + ". When storage "
        "is back, run the same command again: it resumes from the newest valid checkpoint, if "
        "there is one.",
    ]
    not_storage = parse_config({})
    assert launch.storage_cause(not_storage, RuntimeError("the loss is NaN")) is None
