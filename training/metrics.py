"""Training metrics to Ray's metrics system (Prometheus), without a report() barrier.

Ray exports them from every node's metrics agent (``--metrics-export-port``) as
``ray_elastic_trainer_<name>``: ``loss``, ``global_step``, ``world_size``, ``lr``,
``samples_per_s`` and whatever else the task reports (``accuracy``, ``perplexity``, ...).
The dashboard's Grafana integration and any Prometheus can scrape them.
"""

from __future__ import annotations

import re
from functools import cache
from typing import Any

from ray.util import metrics as ray_metrics

DESCRIPTIONS = {
    "loss": "Training loss over the last log interval",
    "samples_per_s": "Global samples per second over the last log interval",
    "global_step": "Global steps completed",
    "world_size": "Training workers in use",
    "lr": "Learning rate of the last step",
}


@cache
def _gauge(name: str) -> ray_metrics.Gauge:
    description = DESCRIPTIONS.get(name, f"Task metric '{name}' over the last log interval")
    return ray_metrics.Gauge(f"elastic_trainer_{name}", description=description)


def record(step_metrics: dict[str, Any]) -> None:
    for name, value in step_metrics.items():
        if isinstance(value, (int, float)) and re.fullmatch(r"[a-z_][a-z0-9_]*", name):
            _gauge(name).set(float(value))
