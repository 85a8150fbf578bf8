"""Training metrics to Ray's metrics system (Prometheus), without a report() barrier.

Ray exports them from every node's metrics agent (``--metrics-export-port``) as
``ray_elastic_trainer_<name>``: gauges ``loss``, ``global_step``, ``world_size``, ``lr``,
``samples_per_s`` and whatever else the task reports (``accuracy``, ``perplexity``, ...), and
counters ``steps_total``, ``samples_total``, ``attempts_total`` (restarts = attempts - 1). Every
series carries the tag ``ray_train_run_name`` (the run name), the tag Ray Train's own
``ray_train_*`` metrics and its Grafana dashboard filter by.

Why a holder actor: Ray's agent drops a gauge soon after the process that set it dies (~2 s
on a real scrape here), and a worker group restart kills every worker, so gauges set by rank 0
vanished for the whole restart (~20 s here); it also drops a gauge value that no export
refreshed for two export intervals (2 x 10 s). Rank 0 therefore sends each log interval's
values, fire-and-forget, to one detached actor per run that sets the gauges and counters in its
own process, which outlives worker-group restarts and re-sets its gauges every ``REFRESH_S``:
one series per metric for the run's whole life. A new attempt sets ``global_step`` (the step it
resumed from) and ``world_size`` at once. The holder exits ``LINGER_S`` after the run ends, or
after ``IDLE_EXIT_S`` without news (a run that failed for good). Counters are monotonic for the
holder's life; if its node dies they restart at 0 in a new holder: read them with
``increase()``/``rate()``, which treat a drop as a reset, as for any restarted process.
"""

from __future__ import annotations

import os
import re
import threading
import time
from functools import cache
from typing import Any

import ray
from ray.util import metrics as ray_metrics

from training.ray_internals import spares

RUN_TAG = "ray_train_run_name"  # = Ray Train's RUN_NAME_TAG_KEY
NAMESPACE = "elastic-trainer"  # every attempt of a run finds its holder here
IDLE_EXIT_S = 3600.0
REFRESH_S = 5.0  # re-set every gauge this often: Ray drops one not set for ~20 s
LINGER_S = 30.0  # after the run ends: one more Prometheus scrape (10-15 s) sees the final values
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


@ray.remote(num_cpus=0)
class Holder:
    """The run's gauges and counters, set in a process that outlives its worker groups."""

    def __init__(self, run: str):
        self.tags = {RUN_TAG: run}
        self.gauges: dict[str, float] = {}
        self.lock = threading.Lock()
        self.heard = time.monotonic()
        self.closed: float | None = None
        threading.Thread(target=self._refresh, daemon=True).start()

    def record(self, gauges: dict[str, float], counts: dict[str, float]) -> None:
        with self.lock:
            self.heard = time.monotonic()
            self.closed = None  # the same run started again before the holder left
            self.gauges.update(gauges)
            self._set_gauges(gauges)
            for name, amount in counts.items():
                _counter(name).inc(amount, tags=self.tags)

    def close(self) -> None:
        self.closed = time.monotonic()

    def _set_gauges(self, gauges: dict[str, float]) -> None:
        for name, value in gauges.items():
            _gauge(name).set(value, tags=self.tags)

    def _refresh(self) -> None:
        """Ray's agent evicts a gauge value that no export refreshed for two export intervals
        (2 x 10 s; ray/_private/telemetry/open_telemetry_metric_recorder.py). Re-setting the
        values keeps them fresh whatever the exporter does with unchanged ones: without it, one
        scraped run here lost every gauge for 4 s, 24 s after the last record (another did
        not). Exits once the run is over."""
        while True:
            time.sleep(REFRESH_S)
            with self.lock:
                self._set_gauges(self.gauges)
                now = time.monotonic()
            if (self.closed and now - self.closed > LINGER_S) or now - self.heard > IDLE_EXIT_S:
                os._exit(0)  # detached and never restarted: its series leave the scrape


@cache  # one handle per worker process; a restarted rank 0 looks it up again
def _holder(run: str) -> Any:
    return Holder.options(
        name=f"metrics:{run}",
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        runtime_env=spares.without_spares(),  # not a warm spare's job, nor torch's import
    ).remote(run)


def record(run: str, step_metrics: dict[str, Any], steps: int, samples: int) -> None:
    """Gauges from one log interval's metrics; ``steps`` and ``samples`` done in it."""
    gauges = {
        name: float(value)
        for name, value in step_metrics.items()
        if isinstance(value, (int, float)) and re.fullmatch(r"[a-z_][a-z0-9_]*", name)
    }
    _holder(run).record.remote(gauges, {"steps_total": steps, "samples_total": samples})


def attempt_started(run: str, global_step: int, world_size: int) -> None:
    gauges = {"global_step": float(global_step), "world_size": float(world_size)}
    _holder(run).record.remote(gauges, {"attempts_total": 1})


def run_ended(run: str) -> None:
    """The run is done: its series leave the scrape ``LINGER_S`` later."""
    _holder(run).close.remote()
