"""TensorBoard event files from the run log, read back with TensorBoard's own loader."""

from __future__ import annotations

import os

import pyarrow.fs as pafs
import pytest
from synthetic_runs import loss, two_attempt_run, write_attempt
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from training.core.tensorboard import TENSORBOARD_DIR


def scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] as TensorBoard shows them (purge markers applied)."""
    acc = EventAccumulator(logdir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_a_rolled_back_and_redone_step_draws_one_curve(tmp_path):
    run_dir = str(tmp_path / "run")
    two_attempt_run(pafs.LocalFileSystem(), run_dir)

    shown = scalars(os.path.join(run_dir, TENSORBOARD_DIR))
    steps = [s for s, _ in shown["train/loss"]]
    assert steps == list(range(1, 41))  # no step twice, never backwards: no zig-zag
    values = dict(shown["train/loss"])
    # Steps 21..30 ran twice; the curve holds the redo (attempt b), not the rolled-back run.
    assert values[25] == pytest.approx(loss("b", 25))
    assert values[15] == pytest.approx(loss("a", 15))
    assert shown["run/world_size"] == [(1, 2.0), (21, 1.0)]
    assert [s for s, _ in shown["checkpoint/blocked_s"]] == [20, 40]
    assert dict(shown["eval/val_loss"])[20] == pytest.approx(loss("a", 20) + 0.5)


def test_every_numeric_field_is_a_metric_and_bookkeeping_is_not(tmp_path):
    run_dir = str(tmp_path / "run")
    two_attempt_run(pafs.LocalFileSystem(), run_dir)

    tags = set(scalars(os.path.join(run_dir, TENSORBOARD_DIR)))
    assert {"train/loss", "train/perplexity", "train/lr", "train/world_size"} <= tags
    leaked = {"epoch", "step_in_epoch", "samples", "converged", "extra", "time", "global_step"}
    assert not {t.split("/", 1)[1] for t in tags} & leaked


def test_sparse_step_events_keep_their_global_steps(tmp_path):
    run_dir = str(tmp_path / "run")
    two_attempt_run(pafs.LocalFileSystem(), run_dir, every=5)

    steps = [s for s, _ in scalars(os.path.join(run_dir, TENSORBOARD_DIR))["train/loss"]]
    assert steps == list(range(5, 41, 5))


def test_object_store_gets_a_new_segment_at_every_flush(tmp_path):
    # Not a LocalFileSystem, so the writer takes the object-store path (S3 in production):
    # events are staged in a local temp dir and each flush uploads them as a new event file.
    store = tmp_path / "bucket"
    store.mkdir()
    fs = pafs.SubTreeFileSystem(str(store), pafs.LocalFileSystem())
    log = write_attempt(fs, "runs/r", "a", world_size=2, resumed_from=None, last_step=20)
    # write_attempt flushed at step 20 (its checkpoint): the steps so far are on the store.
    uploaded = store / "runs" / "r" / TENSORBOARD_DIR
    assert [s for s, _ in scalars(str(uploaded))["train/loss"]] == list(range(1, 21))
    before = sorted(p.name for p in uploaded.iterdir())
    local_dir = log._board._logdir
    log.close()
    after = sorted(p.name for p in uploaded.iterdir())
    # Nothing re-uploaded: the close added one segment (the checkpoint event) to the old ones.
    assert after[: len(before)] == before and len(after) == len(before) + 1
    assert all(name.endswith(f".a-{i:06d}") for i, name in enumerate(after))
    assert not os.path.exists(local_dir), "the local staging dir is removed at close"
    assert [s for s, _ in scalars(str(uploaded))["checkpoint/blocked_s"]] == [20]


def test_segments_of_two_attempts_still_draw_one_curve(tmp_path):
    store = tmp_path / "bucket"
    store.mkdir()
    fs = pafs.SubTreeFileSystem(str(store), pafs.LocalFileSystem())
    two_attempt_run(fs, "runs/r")

    shown = scalars(str(store / "runs" / "r" / TENSORBOARD_DIR))
    assert [s for s, _ in shown["train/loss"]] == list(range(1, 41))
    assert dict(shown["train/loss"])[25] == pytest.approx(loss("b", 25))
