"""Training metrics to Ray's metrics system (Prometheus), without a report() barrier.

Ray exports them from every node's metrics agent (``--metrics-export-port``) as
``ray_elastic_trainer_<name>``: gauges ``loss``, ``global_step``, ``world_size``, ``lr``,
``samples_per_s`` and whatever else the task reports (``accuracy``, ``perplexity``, ...), and
counters ``steps_total``, ``samples_total``, ``attempts_total`` (restarts = attempts - 1). Every
series carries the tag ``ray_train_run_name`` (the run name), the tag Ray Train's own
``ray_train_*`` metrics and its Grafana dashboard filter by.
"""

from __future__ import annotations

import re
from functools import cache
from typing import Any

from ray.util import metrics as ray_metrics

RUN_TAG = "ray_train_run_name"  # = Ray Train's RUN_NAME_TAG_KEY
DESCRIPTIONS = {
    "loss": "Training loss over the last log interval",
    "samples_per_s": "Global samples per second over the last log interval",
    "global_step": "Global steps completed",
    "world_size": "Training workers in use",
    "lr": "Learning rate of the last step",
}
COUNTERS = {
    "steps_total": "Global steps completed (redone steps after a restart count again)",
    "samples_total": "Samples consumed (global batch x steps)",
    "attempts_total": "Attempts started (the first, then one per restart or resize)",
}


@cache
def _gauge(name: str) -> ray_metrics.Gauge:
    description = DESCRIPTIONS.get(name, f"Task metric '{name}' over the last log interval")
    return ray_metrics.Gauge(f"elastic_trainer_{name}", description, tag_keys=(RUN_TAG,))


@cache
def _counter(name: str) -> ray_metrics.Counter:
    return ray_metrics.Counter(f"elastic_trainer_{name}", COUNTERS[name], tag_keys=(RUN_TAG,))


def record(run: str, step_metrics: dict[str, Any], steps: int, samples: int) -> None:
    """Gauges from one log interval's metrics; ``steps`` and ``samples`` done in it."""
    tags = {RUN_TAG: run}
    for name, value in step_metrics.items():
        if isinstance(value, (int, float)) and re.fullmatch(r"[a-z_][a-z0-9_]*", name):
            _gauge(name).set(float(value), tags=tags)
    _counter("steps_total").inc(steps, tags=tags)
    _counter("samples_total").inc(samples, tags=tags)


def attempt_started(run: str) -> None:
    _counter("attempts_total").inc(1, tags={RUN_TAG: run})
