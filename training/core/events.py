"""The run log read as metrics: which fields are scalars, and which points a restart rolled back.

Readers (TensorBoard, ``plot``) treat events generically, so a task can log any metric it likes:
every numeric field of a ``step`` or ``eval`` event is a metric, except the bookkeeping below.
``start`` events mark (re)starts (``world_size``, ``resumed_from_step``) and ``checkpoint``
events mark checkpoints (``global_step``, ``blocked_s``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

METRIC_EVENTS = ("step", "eval")
# A step's place in the run (with its world size, what the ledger recomputes its ids from).
POSITION = ("global_step", "epoch", "step_in_epoch")
# Identify an event or its place in time; never plotted as a metric.
BOOKKEEPING = frozenset({"event", "attempt", "time", *POSITION, "samples"})
# The framework's own figures in a step event, beside the task's metrics.
FRAMEWORK_METRICS = ("lr", "samples_per_s", "step_s", "world_size")
# Everything in a step or eval event that is not one of the task's metrics.
NOT_TASK_METRICS = BOOKKEEPING | frozenset(FRAMEWORK_METRICS)


def scalar_fields(event: dict[str, Any]) -> dict[str, float]:
    """The event's numeric fields that are metrics (bools, lists and dicts are not)."""
    return {
        key: float(value)
        for key, value in event.items()
        if key not in BOOKKEEPING and isinstance(value, int | float) and not isinstance(value, bool)
    }


def first_step(start: dict[str, Any]) -> int:
    """The first global step an attempt runs: the one after the checkpoint it resumed from."""
    return (start.get("resumed_from_step") or 0) + 1


@dataclass
class Point:
    step: int
    attempt: str
    time: float
    values: dict[str, float]


@dataclass
class Series:
    """Metric points of one kind of event, split into the kept history and the rolled back."""

    kept: list[Point]
    rolled_back: list[Point]


def split_history(events: list[dict[str, Any]], kind: str) -> Series:
    """Points of ``kind`` events, replayed in time order: a ``start`` that resumes from step S
    rolls back every earlier point after S, the same rule TensorBoard's purge_step applies."""
    kept: list[Point] = []
    rolled_back: list[Point] = []
    for event in events:
        if event["event"] == "start":
            cut = first_step(event)
            rolled_back += [p for p in kept if p.step >= cut]
            kept = [p for p in kept if p.step < cut]
        elif event["event"] == kind and "global_step" in event:
            values = scalar_fields(event)
            if values:
                kept.append(Point(event["global_step"], event["attempt"], event["time"], values))
    return Series(kept, rolled_back)
