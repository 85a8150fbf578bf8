"""The run log: JSON lines on storage, one file per attempt, and the exactly-once ledger check.

Rank 0 writes ``<run dir>/runlog/<attempt>.jsonl`` (on object stores: segments
``<attempt>-<n>.jsonl``). Events:
- ``start``: attempt id, world size, the checkpoint step and attempt it resumed from, and what
  the sample order is a function of: seed, training rows, global batch, data layout (streaming);
- ``step``: global step, epoch, step in epoch and world size: the step's sample ids are a pure
  function of these and the start's fields, so the log holds no ids (``consumed_ids`` recomputes
  them); on log steps also the task's metrics over the interval (loss, accuracy, ...), LR and
  throughput;
- ``checkpoint`` and ``eval``: what was saved and its pause, held-out metrics (``val_*``);
- ``stopped``: a non-finite loss stopped the run for good;
- ``end``: the attempt finished the run.

Ray Train's controller adds ``group_started`` (a worker group is training: world size, each
rank's pid, when the group was asked for) and ``failure_detected`` (Ray Train decided what a
failure means: retry or raise), each in a file of its own (``write_event``), named after Ray
Train's attempt; readers that look for the events above pass them by.

Rank 0 also mirrors every event into TensorBoard event files (training/core/tensorboard.py), flushed
with the run log.

"Exactly once" is about the effective history, the steps the final model contains: steps an
attempt ran after the checkpoint the next attempt resumed from were rolled back. Each ``start``
names the attempt that wrote the checkpoint it resumed from, so the history can be rebuilt by
walking that chain backwards from the final attempt.
"""

from __future__ import annotations

import json
import posixpath
import time
from collections import defaultdict
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import pyarrow.fs as pafs

from training.core import storage, tensorboard
from training.core.events import NOT_TASK_METRICS

if TYPE_CHECKING:  # torch (through data) only where a step's ids are recomputed (`verify`):
    import torch  # `status` reads the log without it, 2-3 s sooner

RUNLOG_DIR = "runlog"
# The run's resolved config, written when it first starts: what makes a directory a run.
RUN_CONFIG_FILE = "run_config.json"


class RunLog:
    """Append-only JSON-lines writer for one attempt (rank 0 only).

    A shared filesystem appends to ``<attempt>.jsonl``. An object store cannot append: each flush
    puts the lines written since the last one as a new segment object
    ``<attempt>-<n>.jsonl``, so the bytes written grow linearly with the run, not with its square.
    """

    def __init__(self, fs: pafs.FileSystem, run_dir: str, attempt: str):
        self.fs = fs
        self.directory = posixpath.join(run_dir, RUNLOG_DIR)
        self.path = posixpath.join(self.directory, f"{attempt}.jsonl")
        self.attempt = attempt
        fs.create_dir(self.directory, recursive=True)
        self._file = open(self.path, "a", buffering=1) if storage.is_local(fs) else None  # noqa: SIM115
        self._lines: list[str] = []
        self._segments = 0
        self._board = tensorboard.EventWriter(fs, run_dir, attempt)

    def write(self, event: str, **fields: Any) -> None:
        # 0.1 ms is finer than anything read from it (ordering, step-to-step gaps).
        record = {"event": event, "attempt": self.attempt, "time": round(time.time(), 4), **fields}
        line = json.dumps(record)
        if self._file is not None:
            self._file.write(line + "\n")
        else:
            self._lines.append(line)
        self._board.add(record)

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        elif self._lines:
            segment = posixpath.join(self.directory, f"{self.attempt}-{self._segments:06d}.jsonl")
            storage.write_bytes(self.fs, segment, ("\n".join(self._lines) + "\n").encode())
            self._segments += 1
            self._lines = []
        self._board.flush()

    def close(self) -> None:
        self._board.close()  # first: its final upload, then flush() has nothing left to do
        self.flush()
        if self._file is not None:
            self._file.close()


def write_event(fs: pafs.FileSystem, run_dir: str, name: str, event: str, **fields: Any) -> None:
    """One event in a file of its own, ``<run dir>/runlog/<name>.jsonl``, written whole: for a
    writer outside the attempts (Ray Train's controller), which then never shares a file with
    rank 0 and needs no append on an object store. ``fields`` must hold ``attempt``."""
    record = {"event": event, "time": round(time.time(), 4), **fields}
    path = posixpath.join(run_dir, RUNLOG_DIR, f"{name}.jsonl")
    storage.write_bytes(fs, path, (json.dumps(record) + "\n").encode())


def read_events(fs: pafs.FileSystem, run_dir: str) -> list[dict[str, Any]]:
    """Every event of every attempt, oldest first; a torn last line (crash mid-write) is skipped."""
    events = []
    # By name: an attempt's segments in the order written, so the stable sort below keeps that
    # order for events logged within the same 0.1 ms.
    entries = sorted(storage.list_dir(fs, posixpath.join(run_dir, RUNLOG_DIR)), key=_name)
    for entry in entries:
        if entry.base_name.endswith(".jsonl"):
            events += _parse_lines(storage.read_bytes(fs, entry.path).decode())
    return sorted(events, key=lambda e: e["time"])


def _name(entry: pafs.FileInfo) -> str:
    return entry.base_name


def _parse_lines(text: str) -> list[dict[str, Any]]:
    parsed = []
    for line in text.splitlines():
        try:
            parsed.append(json.loads(line))
        except ValueError:
            continue
    return parsed


@dataclass
class LedgerReport:
    ok: bool
    completed: bool
    attempts: int
    world_sizes: list[int]
    resumed_from_steps: list[int | None]
    final_step: int
    errors: list[str] = field(default_factory=list)
    # Steps of the history whose consumption the ranks witnessed (``consumed`` events): all but
    # those an attempt ran after its last log interval, kept by a save on failure.
    witnessed_steps: int = 0


def check_ledger(events: list[dict[str, Any]]) -> LedgerReport:
    """Check that the effective history consumed every sample of each epoch exactly once."""
    starts = [e for e in events if e["event"] == "start"]
    if not starts:
        return LedgerReport(False, False, 0, [], [], 0, ["the run log has no attempts"])
    history, errors = effective_history(events)
    by_attempt = {s["attempt"]: s for s in starts}
    witnessed = 0
    try:
        errors += _check_epochs(history, by_attempt, starts[-1])
        witness_errors, witnessed = _check_witness(history, by_attempt, events)
        errors += witness_errors
    except (KeyError, ValueError) as exc:  # a start or step record lacks what the ids need
        errors.append(f"the run log cannot say which samples were consumed: {exc!r}")
    final_step = max(history, default=0)
    return LedgerReport(
        ok=not errors,
        completed=any(
            e["event"] == "end" and e["attempt"] == starts[-1]["attempt"] for e in events
        ),
        attempts=len(starts),
        world_sizes=[s["world_size"] for s in starts],
        resumed_from_steps=[s["resumed_from_step"] for s in starts],
        final_step=final_step,
        errors=errors,
        witnessed_steps=witnessed,
    )


def effective_history(events: list[dict[str, Any]]) -> tuple[dict[int, dict[str, Any]], list[str]]:
    """Global step -> the step event the final model contains, walking resume links backwards."""
    starts = {e["attempt"]: e for e in events if e["event"] == "start"}
    steps: dict[str, dict[int, dict[str, Any]]] = defaultdict(dict)
    for e in events:
        if e["event"] == "step":
            steps[e["attempt"]][e["global_step"]] = e
    history: dict[int, dict[str, Any]] = {}
    errors: list[str] = []
    attempt: str | None = max(starts.values(), key=lambda s: s["time"])["attempt"]
    limit = float("inf")
    while attempt is not None:
        if attempt not in starts:
            errors.append(f"attempt {attempt} is referenced by a resume but has no log")
            break
        history.update({g: e for g, e in steps[attempt].items() if g <= limit and g not in history})
        limit = starts[attempt]["resumed_from_step"] or 0
        attempt = starts[attempt]["resumed_from_attempt"] if limit else None
    return history, errors


def _check_epochs(
    history: dict[int, dict[str, Any]], starts: dict[str, dict[str, Any]], last: dict[str, Any]
) -> list[str]:
    errors = []
    final = max(history, default=0)
    missing = sorted(set(range(1, final + 1)) - set(history))
    if missing:
        errors.append(f"steps missing from the effective history: {_abbreviate(missing)}")
    per_epoch: dict[int, list[int]] = defaultdict(list)
    steps_in_epoch: dict[int, int] = defaultdict(int)
    for event in history.values():
        start = starts[event["attempt"]]
        errors += _check_step(event, start)
        ids = consumed_ids(event, start)
        if len(ids) != start["global_batch_size"]:
            errors.append(f"step {event['global_step']} consumed {len(ids)} samples")
        per_epoch[event["epoch"]] += ids
        steps_in_epoch[event["epoch"]] += 1
    expected = last["steps_per_epoch"] * last["global_batch_size"]
    for epoch, ids in sorted(per_epoch.items()):
        unique = len(set(ids))
        if unique != len(ids):
            errors.append(f"epoch {epoch}: {len(ids) - unique} samples consumed more than once")
        if steps_in_epoch[epoch] == last["steps_per_epoch"] and unique != expected:
            errors.append(f"epoch {epoch}: {unique} distinct samples consumed, expected {expected}")
        if any(not 0 <= i < last["train_samples"] for i in ids):
            errors.append(f"epoch {epoch}: sample ids outside the training rows")
    return errors


def _check_witness(
    history: dict[int, dict[str, Any]],
    starts: dict[str, dict[str, Any]],
    events: list[dict[str, Any]],
) -> tuple[list[str], int]:
    """Each step's witness (the count and digest of the ids the ranks fed ``task.batch``,
    summed over the ranks) against the ids the schedule says it consumed; (errors, steps
    witnessed). This is what catches a loop that slices, drops or repeats ids wrongly: the
    schedule alone is a permutation by construction."""
    import torch

    from training.core import data

    witness = {
        (e["attempt"], step): (count, digest)
        for e in events
        if e["event"] == "consumed"
        for step, count, digest in zip(e["steps"], e["counts"], e["digests"], strict=True)
    }
    errors, witnessed = [], 0
    for step, event in sorted(history.items()):
        seen = witness.get((event["attempt"], step))
        if seen is None:
            continue
        witnessed += 1
        ids = consumed_ids(event, starts[event["attempt"]])
        expected = (len(ids), data.ids_digest(torch.tensor(ids, dtype=torch.int64)))
        if tuple(seen) != expected:
            errors.append(
                f"step {step}: the ranks fed the task {seen[0]} samples (digest {seen[1]}), the "
                f"schedule has {expected[0]} (digest {expected[1]}): samples dropped, repeated "
                "or swapped"
            )
    return errors, witnessed


def _check_step(event: dict[str, Any], start: dict[str, Any]) -> list[str]:
    """A step's record must agree with its attempt: the world size it ran on, and the position
    (epoch, step in epoch) that the global step has in the run's plan."""
    step, errors = event["global_step"], []
    if event.get("world_size", start["world_size"]) != start["world_size"]:
        errors.append(
            f"step {step} records world size {event['world_size']}, its attempt ran on "
            f"{start['world_size']}"
        )
    if "step_in_epoch" in event:  # run logs written before the ledger became (seed, position)
        position = (event["epoch"], event["step_in_epoch"] - 1)
        if position != divmod(step - 1, start["steps_per_epoch"]):
            errors.append(
                f"step {step} records epoch {position[0]} step {position[1] + 1}, not its "
                "position in the run"
            )
    return errors


def consumed_ids(event: dict[str, Any], start: dict[str, Any]) -> list[int]:
    """The sample ids a step's global batch fed to its ranks, recomputed from the step's
    (epoch, step in epoch, world size) and its attempt's (seed, data layout): the same pure
    functions the loop slices each rank's share from. Old run logs carry the ids themselves."""
    if "samples" in event:
        return event["samples"]
    from training.core import data

    batch_size = start["global_batch_size"]
    order = _epoch_order(
        start["seed"],
        event["epoch"],
        start["train_samples"],
        json.dumps(start.get("layout")),
        batch_size,
    )
    batch = data.global_batch(order, event["step_in_epoch"] - 1, batch_size)
    world = event["world_size"]
    return [i for rank in range(world) for i in data.rank_slice(batch, rank, world).tolist()]


@lru_cache(maxsize=4)  # a checker walks the history epoch by epoch
def _epoch_order(
    seed: int, epoch: int, train_samples: int, layout: str, batch_size: int
) -> torch.Tensor:
    from training.core import data

    shards = data.layout_from_record(json.loads(layout))
    if shards is not None and sum(shards.sizes) != train_samples:
        raise ValueError(f"the data layout holds {sum(shards.sizes)} samples, not {train_samples}")
    return data.epoch_order(seed, epoch, train_samples, shards, batch_size)


def _abbreviate(values: list[int], limit: int = 10) -> str:
    shown = ", ".join(map(str, values[:limit]))
    return shown + (f" ... ({len(values)} in all)" if len(values) > limit else "")


def summarize(events: list[dict[str, Any]]) -> dict[str, Any]:
    """The numbers a user wants after a run: steps, restarts, and the task's latest train and
    held-out metrics (whatever the task reports)."""
    steps = [e for e in events if e["event"] == "step"]
    logged = [e for e in steps if "loss" in e]
    evals = [e for e in events if e["event"] == "eval"]
    starts = [e for e in events if e["event"] == "start"]
    return {
        "final_step": max((e["global_step"] for e in steps), default=0),
        "total_steps": starts[-1].get("total_steps") if starts else None,
        "state": _state(events),
        "train": _metric_fields(logged[-1]) if logged else {},
        # The step the train metrics end at, and the steps they average over (a log interval).
        "train_steps": _interval(logged, steps),
        "val": _metric_fields(evals[-1]) if evals else {},
        "val_step": evals[-1]["global_step"] if evals else None,
        "attempts": len(starts),
        "restarts": max(len(starts) - 1, 0),
        "world_sizes": [s["world_size"] for s in starts],
    }


def _state(events: list[dict[str, Any]]) -> str:
    """finished, stopped (for good), or unfinished (training now, or interrupted)."""
    last = next((e["event"] for e in reversed(events) if e["event"] in ("end", "stopped")), None)
    starts = [e for e in events if e["event"] == "start"]
    if last is None or not starts:
        return "unfinished"
    ended = [e for e in events if e["event"] in ("end", "stopped")][-1]
    if ended["attempt"] != starts[-1]["attempt"]:
        return "unfinished"  # a later attempt started after it (a run extended, or resumed)
    return "finished" if last == "end" else "stopped"


def _interval(logged: list[dict[str, Any]], steps: list[dict[str, Any]]) -> list[int] | None:
    """[first, last] global step of the last logged interval."""
    if not logged:
        return None
    last = logged[-1]["global_step"]
    before = [e["global_step"] for e in logged[:-1] if e["attempt"] == logged[-1]["attempt"]]
    first = (
        (max(before) + 1)
        if before
        else min(e["global_step"] for e in steps if e["attempt"] == logged[-1]["attempt"])
    )
    return [first, last]


def _metric_fields(event: dict[str, Any]) -> dict[str, float]:
    return {
        k: v
        for k, v in event.items()
        if k not in NOT_TASK_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def list_runs(fs: pafs.FileSystem, root: str) -> list[str]:
    """Run directories under a storage path (those with a recorded config)."""
    return sorted(
        entry.path
        for entry in storage.list_dir(fs, root)
        if entry.type == pafs.FileType.Directory
        and storage.exists(fs, posixpath.join(entry.path, RUN_CONFIG_FILE))
    )
