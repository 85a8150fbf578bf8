"""Graceful drain: when Ray says a node of this run is going away, checkpoint at once and stop.

How the news arrives (Ray 2.60): `ray start --block` answers SIGTERM (`docker compose stop`,
`kubectl drain`, a spot reclaim) by asking the GCS to drain its node, reason PREEMPTION, with a
deadline `RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S` (30 s) away, and only then stops its processes.
Ray Train's PreemptionWatcher actor polls the GCS drain state every
`RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S` (the driver sets 1 s) and pushes the news into every
worker's train context. Reading it there is a memory read, which is all `requested()` does on
most steps: the public `ray.train.get_preemption_info()` is a barrier across workers, far too
dear to call per step.

Ranks hear the news at slightly different steps, and a checkpoint is collective (every rank
reports), so the ranks agree: each rank's flag rides the loop's one reduction per log interval
(``cadence.close_interval``), and the drain begins where any rank has heard the news.

After the drain checkpoint the workers `hold()`: a further step would only be redone. Ray Train
waits until the drain deadline, then restarts the worker group from that checkpoint on the
nodes that remain (or waits for `min_workers`), charging the preemption budget, not
`failure.max_failures`.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)

# Past Ray's drain deadline the group is torn down; if nothing has come after this long, the
# drain was cancelled or lost: fail the attempt so that training goes on from the checkpoint.
HOLD_LIMIT_S = 300.0


def local_flag() -> bool:
    """Whether Ray told this worker that a node of the group is being drained."""
    try:  # Ray internals: the attribute `mark_preempt` writes (no RPC)
        from ray.train.v2._internal.execution.context import get_train_context

        return get_train_context().preemption_context.preemption_info is not None
    except (ImportError, AttributeError, RuntimeError):
        return False


def hold(global_step: int, limit_s: float = HOLD_LIMIT_S) -> None:
    """Wait, doing nothing, for Ray Train to replace this worker group after the drain."""
    log.warning(
        "node drain: checkpoint at step %d saved; waiting for Ray Train to restart the run "
        "on the remaining nodes (no further steps, so none is redone)",
        global_step,
    )
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        time.sleep(1.0)  # torn down by Ray Train, not woken: nothing to poll for
    raise RuntimeError(f"node drain: no restart within {limit_s:.0f}s of the drain checkpoint")
