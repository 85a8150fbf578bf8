"""Per-step metrics to Ray's metrics system (Prometheus), without a report() barrier.

Ray exports them from every node's metrics agent (``--metrics-export-port``) as
``ray_elastic_trainer_*``; the dashboard's Grafana integration and any Prometheus can scrape them.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from ray.util import metrics as ray_metrics

GAUGES = {
    "loss": "Training loss of the last global step",
    "accuracy": "Training accuracy of the last global step",
    "samples_per_s": "Global samples per second of the last step",
    "global_step": "Global steps completed",
    "world_size": "Training workers in use",
    "lr": "Learning rate of the last step",
}


@lru_cache(maxsize=1)
def _gauges() -> dict[str, ray_metrics.Gauge]:
    return {
        name: ray_metrics.Gauge(f"elastic_trainer_{name}", description=text)
        for name, text in GAUGES.items()
    }


def record(step_metrics: dict[str, Any]) -> None:
    for name, gauge in _gauges().items():
        gauge.set(float(step_metrics[name]))
