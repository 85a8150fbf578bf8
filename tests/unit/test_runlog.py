"""The run log on an object store: append-only segments, read back in order, bytes written
linear in the run's length (each flush used to re-put the whole attempt file)."""

from __future__ import annotations

import pyarrow.fs as pafs
import pytest

from training.core import runlog, storage


@pytest.fixture
def object_store(monkeypatch):
    """A local filesystem treated like S3 by the run log: no appends, whole objects only."""
    monkeypatch.setattr(storage, "is_local", lambda fs: False)
    return pafs.LocalFileSystem()


def write_run(fs, run_dir: str, steps: int, flush_every: int = 10) -> None:
    log = runlog.RunLog(fs, run_dir, "a1")
    log.write("start", world_size=2)
    for step in range(1, steps + 1):
        log.write("step", global_step=step, samples=list(range(8)))
        if step % flush_every == 0:
            log.flush()
    log.write("end", global_step=steps)
    log.close()


def bytes_on_storage(path) -> int:
    return sum(p.stat().st_size for p in (path / runlog.RUNLOG_DIR).iterdir())


def test_segments_are_read_back_in_order(object_store, tmp_path):
    write_run(object_store, str(tmp_path), steps=35)
    names = sorted(p.name for p in (tmp_path / runlog.RUNLOG_DIR).iterdir())
    assert names == [f"a1-{i:06d}.jsonl" for i in range(4)]
    events = runlog.read_events(object_store, str(tmp_path))
    steps = [e["global_step"] for e in events if e["event"] == "step"]
    assert steps == list(range(1, 36))
    assert events[0]["event"] == "start" and events[-1]["event"] == "end"


def test_bytes_written_grow_linearly(object_store, tmp_path):
    write_run(object_store, str(tmp_path / "short"), steps=100)
    write_run(object_store, str(tmp_path / "long"), steps=1000)
    short, long = bytes_on_storage(tmp_path / "short"), bytes_on_storage(tmp_path / "long")
    # Each line is written once: 10x the steps, ~10x the bytes (step numbers get longer).
    assert 9.5 < long / short < 11, (short, long)
    print(f"run log bytes written: {short} for 100 steps, {long} for 1000 steps")


def _events(ended: str | None):
    start = {"event": "start", "attempt": "a1", "time": 0.0, "world_size": 2, "total_steps": 10}
    steps = [
        {"event": "step", "attempt": "a1", "time": float(g), "global_step": g}
        | ({"loss": 1.0 / g} if g % 4 == 0 else {})
        for g in range(1, 10)
    ]
    evals = [{"event": "eval", "attempt": "a1", "time": 8.5, "global_step": 8, "val_loss": 0.3}]
    end = [{"event": ended, "attempt": "a1", "time": 20.0, "global_step": 9}] if ended else []
    return [start, *steps, *evals, *end]


@pytest.mark.parametrize(
    "ended,state", [("end", "finished"), ("stopped", "stopped"), (None, "unfinished")]
)
def test_the_summary_says_how_the_run_ended_and_which_steps_its_metrics_cover(ended, state):
    summary = runlog.summarize(_events(ended))
    assert summary["state"] == state and summary["total_steps"] == 10
    assert summary["train_steps"] == [5, 8]  # the last log interval, not the whole run
    assert summary["train"] == {"loss": 0.125}
    assert summary["val_step"] == 8 and summary["val"] == {"val_loss": 0.3}


def test_a_run_resumed_after_it_ended_is_unfinished():
    later = {"event": "start", "attempt": "a2", "time": 30.0, "world_size": 2, "total_steps": 20}
    assert runlog.summarize([*_events("end"), later])["state"] == "unfinished"


def test_an_event_from_outside_the_attempts_is_a_file_of_its_own(object_store, tmp_path):
    """Ray Train's controller writes ``group_started`` and ``failure_detected`` beside rank 0's
    log; the ledger and the summary read past them."""
    write_run(object_store, str(tmp_path), steps=12)
    runlog.write_event(object_store, str(tmp_path), "ray-r1-group_started", "group_started",
                       attempt="r1", world_size=2)  # fmt: skip
    names = sorted(p.name for p in (tmp_path / runlog.RUNLOG_DIR).iterdir())
    assert names[-1] == "ray-r1-group_started.jsonl"
    events = runlog.read_events(object_store, str(tmp_path))
    assert [e["event"] for e in events][-1] == "group_started"
    assert runlog.summarize(events)["attempts"] == 1
    assert runlog.summarize(events)["state"] == "finished"
