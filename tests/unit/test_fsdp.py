"""``training.parallelism: fsdp`` on the real loop in plain processes (gloo ranks, ``in_process``):
the built-in language model sharded with FSDP2, checkpointed through DCP by every rank.

- killed half way and resumed at the same world size: bitwise equal to an uninterrupted run;
- a checkpoint written by 2 ranks resumed by 3 and by 1: the ledger shows every sample once and
  the loss continues where it was;
- a torn shard: that checkpoint is skipped for the one before it;
- on S3 (the session's SeaweedFS server) as on a local path: the kill during an async save and
  the torn shard (``store``);
- a rank killed inside forward or backward (a user's task with a BatchNorm): resumed from the
  periodic checkpoint, bitwise equal;
- the model is built without any peer of rank 0 building all of it, with the values a seeded
  build on every rank gives, and a resume does not build it at all.

Each run is a few seconds (spawned ranks import torch). The S3 variants cost about what their
local twins do (measured at load average 3-27 on the 2-core VM: the kill during an async save
18 s vs 13 s, the torn shard 14 s vs 11 s), plus the session's S3 server if nothing else started
it (~4 s)."""

from __future__ import annotations

import dataclasses
import os
import posixpath
import shutil
import uuid
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch
from in_process import TWO_HEAD_STEPS, run_function, run_ranks, tensors, two_heads_under_fsdp
from support.s3 import CREDENTIALS, s3
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from two_head_task import write_csv

from training import tasks
from training.core import checkpoint, runlog, storage
from training.core.config import ConfigError, identity_diff, read_raw, validate_sections
from training.driver.settings import parse_config

FS = pafs.LocalFileSystem()
STEPS = 12


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("fsdp") / "corpus.txt"
    data = tasks.DataSource(FS, str(path), str(path), 0.1)
    tasks.build("language_model", {"demo_max_bytes": 60_000}, data).write_demo()
    return path


@dataclasses.dataclass(frozen=True)
class Store:
    """Runs on S3: the config's storage section, and the filesystem and root to read them back
    through. A local store is a plain directory (a Path)."""

    section: dict
    fs: pafs.FileSystem
    root: str


def where(storage: Path | Store) -> tuple[pafs.FileSystem, str]:
    return (storage.fs, storage.root) if isinstance(storage, Store) else (FS, str(storage))


def run_dir(storage: Path | Store, name: str) -> str:
    return posixpath.join(where(storage)[1], name)


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path, monkeypatch) -> Path | Store:
    """Where a test's runs live: ``tmp_path``, or a fresh prefix on the session's S3 server."""
    if request.param == "local":
        return tmp_path
    endpoint = request.getfixturevalue("s3_endpoint")
    for variable, value in CREDENTIALS.items():
        monkeypatch.setenv(variable, value)  # the spawned ranks inherit them
    prefix = f"training/fsdp-{uuid.uuid4().hex[:8]}"
    section = {"path": f"s3://{prefix}", "endpoint_override": endpoint, "scheme": "http"}
    return Store(section, s3(endpoint), prefix)


def config(corpus, storage: Path | Store, name: str, faults=()) -> dict:
    return parse_config(
        {
            "run": {"name": name},
            "storage": storage.section if isinstance(storage, Store) else {"path": str(storage)},
            "scaling": {"min_workers": 1, "max_workers": 3},
            "task": {
                "name": "language_model",
                "options": {"block_size": 32, "d_model": 32, "n_heads": 2, "dropout": 0.1},
            },
            "data": {"path": str(corpus), "val_fraction": 0.1},
            "training": {
                "parallelism": "fsdp",
                "max_steps": STEPS,
                "global_batch_size": 12,
                "micro_batch_size": 3,  # accumulation: FSDP2 reduce-scatters on the last only
                "log_every_n_steps": 3,
            },
            "eval": {"batches": 1, "every_n_steps": 6},
            "checkpoint": {"every_n_steps": 6},
            "chaos": {"faults": list(faults)},
        }
    ).model_dump()


def full_state(storage, name: str, tmp_path, steps: int = STEPS) -> dict:
    """The newest checkpoint's whole model and optimizer, read without a process group (from a
    local copy, when it is on S3)."""
    fs = where(storage)[0]
    newest = checkpoint.newest_valid(fs, run_dir(storage, name))
    assert newest is not None and newest.step == steps
    source = newest.path
    if fs is not FS:
        source = str(tmp_path / f"{name}-newest")
        copy_dir(fs, newest.path, FS, source)
    out = tmp_path / f"{name}.pt"
    dcp_to_torch_save(source, out)
    return torch.load(out, weights_only=False)


def copy_dir(fs: pafs.FileSystem, path: str, to_fs: pafs.FileSystem, to_path: str) -> None:
    to_fs.create_dir(to_path)
    pafs.copy_files(path, to_path, source_filesystem=fs, destination_filesystem=to_fs)


def ledger(storage, name: str) -> runlog.LedgerReport:
    report = runlog.check_ledger(runlog.read_events(where(storage)[0], run_dir(storage, name)))
    assert report.ok, report.errors
    assert report.completed and report.final_step == STEPS
    return report


def losses(storage, name: str) -> dict[int, float]:
    """The training loss of each log interval, by its last step (the final attempt's value)."""
    events = runlog.read_events(where(storage)[0], run_dir(storage, name))
    return {e["global_step"]: e["loss"] for e in events if e["event"] == "step" and "loss" in e}


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory):
    storage = tmp_path_factory.mktemp("runs")
    assert run_ranks(config(corpus, storage, "whole")) == [0, 0]
    assert ledger(storage, "whole").resumed_from_steps == [None]
    # verify --deep's check reads DCP checkpoints like any other: every file's SHA-256
    assert [(i.step, i.valid) for i in checkpoint.scan(FS, str(storage / "whole"), full=True)] == [
        (12, True),
        (6, True),
    ]
    return storage, full_state(storage, "whole", storage)


@pytest.fixture(scope="module")
def stopped_at_step_7(corpus, tmp_path_factory):
    """Two ranks, rank 0 raises before step 7: the run's newest checkpoint is step 6's."""
    storage = tmp_path_factory.mktemp("runs")
    fault = {"kind": "raise", "rank": 0, "step": 7}
    raised, peer = run_ranks(config(corpus, storage, "split", [fault]))
    assert raised == 1 and peer != 0
    assert checkpoint.newest_valid(FS, str(storage / "split")).step == 6
    return storage


def resumed_copy(stopped, tmp_path, corpus, world_size: int) -> dict:
    shutil.copytree(stopped / "split", tmp_path / "split")
    fault = {"kind": "raise", "rank": 0, "step": 7}  # fired already: recorded in the run
    assert run_ranks(config(corpus, tmp_path, "split", [fault]), world_size) == [0] * world_size
    return ledger(tmp_path, "split")


def test_killed_and_resumed_at_the_same_world_size_is_bitwise_equal(
    corpus, stopped_at_step_7, uninterrupted, tmp_path
):
    report = resumed_copy(stopped_at_step_7, tmp_path, corpus, 2)
    assert report.resumed_from_steps == [None, 6]
    expected = dict(tensors(uninterrupted[1]))
    got = dict(tensors(full_state(tmp_path, "split", tmp_path)))
    assert expected.keys() == got.keys() and any("exp_avg" in k for k in expected)
    for key, tensor in expected.items():
        assert torch.equal(tensor, got[key]), key


@pytest.mark.parametrize("world_size", [3, 1])
def test_a_checkpoint_of_two_ranks_resumes_at_another_world_size_exactly_once(
    corpus, stopped_at_step_7, uninterrupted, tmp_path, world_size
):
    report = resumed_copy(stopped_at_step_7, tmp_path, corpus, world_size)
    assert report.world_sizes == [2, world_size] and report.resumed_from_steps == [None, 6]
    # The loss continues where it was: as the uninterrupted run's at every later interval,
    # up to the order in which another number of ranks sums the gradients.
    whole, resumed = losses(uninterrupted[0], "whole"), losses(tmp_path, "split")
    assert whole.keys() == resumed.keys() == {3, 6, 9, 12}
    for step in (9, 12):
        assert resumed[step] == pytest.approx(whole[step], rel=1e-3), step
    assert resumed[9] < whole[3]  # and it had learnt something by step 6


def test_a_rank_killed_during_an_async_save_leaves_the_previous_checkpoint_newest(
    corpus, uninterrupted, store, tmp_path
):
    """Rank 1 dies after its shards of step 12 are written, before rank 0 has its digests: no
    manifest, so step 6 stays the newest valid checkpoint, and the run resumes from it to the
    uninterrupted run's bits (``checkpoint.upload: async``, the default, saves in the
    background). On S3 too: the uninterrupted run is local, the bits are the same."""
    fault = {"kind": "kill", "rank": 1, "step": STEPS, "during": "checkpoint"}
    cfg = config(corpus, store, "killed", [fault])
    assert cfg["checkpoint"]["upload"] == "async"
    assert run_ranks(cfg) == [1, -9]
    fs, killed = where(store)[0], run_dir(store, "killed")
    assert checkpoint.newest_valid(fs, killed).step == 6
    unsealed = [i for i in checkpoint.scan(fs, killed) if i.step == STEPS]
    assert [i.valid for i in unsealed] == [False]  # its shards, no manifest
    assert run_ranks(cfg) == [0, 0]
    assert ledger(store, "killed").resumed_from_steps == [None, 6]
    expected = dict(tensors(uninterrupted[1]))
    got = dict(tensors(full_state(store, "killed", tmp_path)))
    for key, tensor in expected.items():
        assert torch.equal(tensor, got[key]), key


def test_a_torn_shard_is_skipped_for_the_previous_checkpoint(corpus, uninterrupted, store):
    fs, whole = where(store)[0], run_dir(store, "whole")
    copy_dir(FS, str(uninterrupted[0] / "whole"), fs, whole)
    newest = checkpoint.newest_valid(fs, whole)
    shard = posixpath.join(newest.path, "__1_0.distcp")
    storage.write_bytes(fs, shard, storage.read_bytes(fs, shard)[:100])
    assert checkpoint.newest_valid(fs, whole).step == 6
    assert run_ranks(config(corpus, store, "whole")) == [0, 0]
    assert ledger(store, "whole").resumed_from_steps == [None, 6]


def test_a_corrupted_shard_of_the_right_size_is_skipped(corpus, uninterrupted, tmp_path):
    """Sizes hold, a byte differs: the ranks' split checksum check refuses it."""
    shutil.copytree(uninterrupted[0] / "whole", tmp_path / "whole")
    newest = checkpoint.newest_valid(FS, str(tmp_path / "whole"))
    with open(f"{newest.path}/__0_0.distcp", "r+b") as shard:
        shard.seek(200)
        byte = shard.read(1)
        shard.seek(200)
        shard.write(bytes([byte[0] ^ 0xFF]))
    assert run_ranks(config(corpus, tmp_path, "whole")) == [0, 0]
    assert ledger(tmp_path, "whole").resumed_from_steps == [None, 6]


def test_bf16_trains_under_fsdp(corpus, tmp_path):
    """FSDP2's policy computes in bf16 and casts the model's output, not each block's, to fp32
    (a block's fp32 output met the final LayerNorm's bf16 weights: the run failed at step 1)."""
    cfg = config(corpus, tmp_path, "bf16")
    cfg["training"].update(precision="bf16", max_steps=3)
    assert run_ranks(cfg) == [0, 0]
    assert 0 < losses(tmp_path, "bf16")[3] < 6  # ln 256 = 5.5 at the start


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["training.parallelism=zero3"], "training.parallelism: Input should be 'ddp' or 'fsdp'"),
        (
            ["training.parallelism=fsdp", "checkpoint.on_failure=true"],
            "checkpoint.on_failure: true is not possible with training.parallelism: fsdp",
        ),
        (["training.parallelism=fsdp", "training.precision=fp16"], "fp16 is not supported"),
    ],
)
def test_fsdp_settings_that_cannot_work_are_refused_in_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate_sections(read_raw(None, overrides))


def test_on_failure_defaults_to_what_the_parallelism_can_do():
    assert validate_sections(read_raw(None, [])).checkpoint.on_failure is True
    fsdp = validate_sections(read_raw(None, ["training.parallelism=fsdp"]))
    assert fsdp.checkpoint.on_failure is False


def test_a_run_cannot_switch_parallelism_its_checkpoints_would_be_unreadable():
    ddp = validate_sections(read_raw(None, [])).model_dump()
    fsdp = validate_sections(read_raw(None, ["training.parallelism=fsdp"])).model_dump()
    assert identity_diff(ddp, fsdp) == ["training.parallelism: 'ddp' -> 'fsdp'"]
    del ddp["training"]["parallelism"]  # a run saved before the field existed was ddp
    assert identity_diff(ddp, fsdp) == ["training.parallelism: 'ddp' -> 'fsdp'"]
    assert identity_diff(ddp, validate_sections(read_raw(None, [])).model_dump()) == []


def _build_save_resume(config: dict, out: str) -> None:
    """One spawned rank: build the worker (peers of rank 0 may not build the whole model),
    checkpoint it, then resume it (no rank may build the whole model); rank 0 dumps what each
    held and what a plain seeded build gives."""
    from training.core.checkpoint import Progress, dir_name
    from training.core.config import Config
    from training.worker import sharded, sharded_checkpointer
    from training.worker.attempt import build_worker
    from training.worker.context import initial_model
    from training.worker.runtime import LocalRuntime

    def refused(*_):
        raise AssertionError("the whole model was built")

    cfg, rank = Config.model_validate(config), int(os.environ["RANK"])
    runtime = LocalRuntime(cfg, timeout_s=30, init_method=os.environ["INIT_METHOD"])
    if rank != 0:
        sharded_checkpointer.initial_model = refused
    worker = build_worker(cfg, config, runtime)
    built = sharded.full_model_state(worker.model)
    causal = worker.model.causal.clone()  # a non-persistent buffer: in no state dict
    progress = Progress(1, 0, 1, "a1")
    path = f"{runtime.run_dir}/{dir_name(1, 'a1')}"
    state = sharded_checkpointer.loop_state(worker, progress)
    sharded.save(runtime.fs, path, worker.model, worker.optimizer, state)
    sharded_checkpointer.initial_model = refused
    again = build_worker(cfg, config, runtime, initialise=False, attempt="b2")
    resumed_progress, _ = sharded_checkpointer.resume(again)
    resumed = sharded.full_model_state(again.model)  # a collective: every rank
    if rank == 0:
        reference = initial_model(cfg, worker.task, worker.info)
        torch.save(
            {
                "built": built,
                "resumed": resumed,
                "reference": reference.state_dict(),
                "causal": [causal, again.model.causal, reference.causal],
                "step": resumed_progress.global_step,
            },
            out,
        )


def test_initial_values_are_a_seeded_builds_and_a_resume_builds_nothing(corpus, tmp_path):
    """The model is built on the meta device and sharded; rank 0 alone builds it whole."""
    out = tmp_path / "states.pt"
    cfg = config(corpus, tmp_path, "init")
    assert run_function(_build_save_resume, 2, 30, cfg, str(out)) == [0, 0]
    states = torch.load(out, weights_only=True)
    assert states["step"] == 1
    reference = dict(tensors(states["reference"]))
    for which in ("built", "resumed"):
        got = dict(tensors(states[which]))
        assert got.keys() == reference.keys()
        for key, tensor in reference.items():
            assert torch.equal(tensor, got[key]), (which, key)
    causal, resumed_causal, reference_causal = states["causal"]
    assert torch.equal(causal, reference_causal) and torch.equal(resumed_causal, reference_causal)


@pytest.fixture(scope="module")
def two_heads_whole(tmp_path_factory):
    storage = tmp_path_factory.mktemp("two_heads")
    write_csv(storage / "points.csv")
    assert run_ranks(two_heads_under_fsdp(storage / "points.csv", storage, "whole")) == [0, 0]
    state = full_state(storage, "whole", storage, TWO_HEAD_STEPS)
    assert "body.1.num_batches_tracked" in state["model"]  # the buffers this is about
    return storage, state


@pytest.mark.parametrize("during", ["forward", "backward"])
def test_a_rank_killed_inside_a_step_resumes_bitwise_equal(two_heads_whole, tmp_path, during):
    """Rank 1 is SIGKILLed inside step 9's forward or backward (its hooks on sharded
    parameters fire); the run resumes from step 7's checkpoint to the uninterrupted bits."""
    storage, expected = two_heads_whole
    fault = {"kind": "kill", "rank": 1, "step": 9, "during": during}
    cfg = two_heads_under_fsdp(storage / "points.csv", tmp_path, "killed", [fault])
    assert run_ranks(cfg) == [1, -9]
    assert checkpoint.newest_valid(FS, str(tmp_path / "killed")).step == 7
    assert run_ranks(cfg) == [0, 0]
    report = runlog.check_ledger(runlog.read_events(FS, str(tmp_path / "killed")))
    assert report.ok and report.resumed_from_steps == [None, 7], report.errors
    got = dict(tensors(full_state(tmp_path, "killed", tmp_path, TWO_HEAD_STEPS)))
    for key, tensor in dict(tensors(expected)).items():
        assert torch.equal(tensor, got[key]), key
