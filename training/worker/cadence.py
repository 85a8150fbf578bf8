"""What happens at a global step besides training it: which of log, report, evaluation and
checkpoint are due (``Due``), the interval's totals reduced over the ranks once per due step
(with the drain flag and the ledger's witness in the same all-gather), and the run log's step
line."""

from __future__ import annotations

import functools
import logging
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from training.core import data, events, stops
from training.core.config import Config
from training.observability import pace
from training.worker.collectives import Collectives

if TYPE_CHECKING:
    from training.worker.context import Worker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Due:
    """What a global step does after training: each from its own setting."""

    checkpoint: bool
    report: bool
    evaluate: bool
    log: bool

    @classmethod
    def at(cls, cfg: Config, global_step: int, last_step: int) -> Due:
        checkpoint_due = global_step % cfg.checkpoint.every_n_steps == 0 or global_step == last_step
        every_report = cfg.training.report_every_n_steps
        return cls(
            checkpoint=checkpoint_due,
            report=every_report is not None and global_step % every_report == 0,
            evaluate=cfg.eval.due(global_step, checkpoint_due),
            log=global_step % cfg.training.log_every_n_steps == 0,
        )

    @property
    def closes_interval(self) -> bool:
        """The ranks meet (one all-gather) on every due step: metrics, a non-finite loss and a
        node drain are agreed there, so a drain is seen within one log interval."""
        return self.checkpoint or self.report or self.evaluate or self.log


@dataclass
class Interval:
    """The task's totals since the last log line, kept on the device (no host sync per step),
    and the first step whose loss or gradient norm was not finite (inf: none)."""

    totals: dict[str, torch.Tensor] = field(default_factory=dict)
    first_bad_step: torch.Tensor | None = None
    # The ledger's witness: per step, how many ids this rank fed ``task.batch`` and their digest.
    consumed: dict[int, list[int]] = field(default_factory=dict)
    steps: int = 0
    samples: int = 0
    started: float = field(default_factory=time.perf_counter)

    def add(self, totals: dict[str, torch.Tensor]) -> None:
        for key, value in totals.items():
            self.totals[key] = self.totals[key] + value if key in self.totals else value

    def consume(self, global_step: int, ids: torch.Tensor) -> None:
        count_and_digest = self.consumed.setdefault(global_step, [0, 0])
        count_and_digest[0] += len(ids)
        count_and_digest[1] += data.ids_digest(ids)

    def consumed_row(self) -> list[float]:
        return [float(v) for step in sorted(self.consumed) for v in self.consumed[step]]

    def watch(self, global_step: int, *values: torch.Tensor) -> None:
        if values[0].device.type == "cpu":  # reading a CPU tensor syncs nothing: check in Python
            if self.first_bad_step is None and not all(
                math.isfinite(x) for v in values for x in v.detach().float().flatten().tolist()
            ):
                self.first_bad_step = torch.tensor(float(global_step))
            return
        finite = torch.stack([torch.isfinite(v.detach().float()).all() for v in values]).all()
        step = torch.where(finite, math.inf, float(global_step)).to(values[0].device)
        if self.first_bad_step is None:
            self.first_bad_step = step
        else:
            self.first_bad_step = torch.minimum(self.first_bad_step, step)


def reduce_totals(
    comm: Collectives,
    totals: dict[str, torch.Tensor],
    first_bad: torch.Tensor | None,
    flag: bool = False,
    extra: list[float] | None = None,
) -> tuple[dict[str, float], float, bool, list[float]]:
    """Sum the totals over all ranks, find the earliest non-finite step, whether any rank
    raised ``flag``, and sum ``extra`` (the same length on every rank) over the ranks: one
    all-gather of a small tensor (``collectives``), one host sync."""
    keys, extra = sorted(totals), extra or []
    bad = first_bad if first_bad is not None else torch.tensor(math.inf)
    # A task may count on the CPU while its loss lives on the GPU: the seam moves each to the
    # device the backend needs.
    head = torch.stack(
        [*(totals[k].detach().to(comm.device).double() for k in keys), bad.to(comm.device).double()]
    )
    tail = torch.tensor([float(flag), *extra], dtype=torch.float64, device=comm.device)
    gathered = comm.gather_rows(torch.cat([head, tail])).cpu()
    n = len(keys)
    sums = gathered[:, :n].sum(dim=0).tolist()
    first = float(gathered[:, n].min())
    extra_sums = gathered[:, n + 2 :].sum(dim=0).tolist()
    return dict(zip(keys, sums, strict=True)), first, bool(gathered[:, n + 1].max() > 0), extra_sums


def close_interval(worker: Worker, global_step: int, lr: float) -> tuple[dict[str, Any], bool]:
    """Metrics of the steps since the last log line, over all ranks, and whether the ranks
    agree that a node is being drained; raises NonFiniteLoss."""
    interval = worker.interval
    totals, first_bad, draining, consumed = reduce_totals(
        worker.comm,
        interval.totals,
        interval.first_bad_step,
        worker.runtime.drain_requested(),
        interval.consumed_row(),
    )
    if math.isfinite(first_bad):
        raise stops.NonFiniteLoss(int(first_bad))
    elapsed = time.perf_counter() - interval.started
    epoch, step_in_epoch = worker.plan.position(global_step)
    step_metrics = {
        "global_step": global_step,
        "epoch": epoch,
        "step_in_epoch": step_in_epoch + 1,
        **(worker.task.metrics(totals, worker.info) if totals else {}),
        "lr": lr,
        "samples_per_s": interval.samples / elapsed if elapsed > 0 else 0.0,
        "world_size": worker.world_size,
    }
    if worker.runlog is not None:
        steps = sorted(interval.consumed)
        log_progress(worker, step_metrics, first_step=steps[0] if steps else global_step)
        worker.runlog.write(  # what the ranks fed task.batch; `verify` checks it
            "consumed",
            steps=steps,
            counts=[int(c) for c in consumed[0::2]],
            digests=[int(d) for d in consumed[1::2]],
        )
        # An actor call under Ray: off this thread.
        worker.reporter.submit(
            functools.partial(
                worker.runtime.metrics.record,
                worker.cfg.run.name,
                dict(step_metrics),
                interval.steps,
                interval.samples,
            )
        )
    worker.interval = Interval()
    return step_metrics, draining


def record_step(
    worker: Worker, global_step: int, step_s: float, step_metrics: dict[str, Any]
) -> None:
    """The ledger: the step's position and world size, from which the sample ids its global
    batch held are recomputed (``runlog.consumed_ids``, with the start event's seed and data
    layout): a line of constant size, whatever the batch; on log steps also the interval's
    metrics."""
    epoch, step_in_epoch = worker.plan.position(global_step)
    worker.runlog.write(
        "step",
        global_step=global_step,
        epoch=epoch,
        step_in_epoch=step_in_epoch + 1,
        world_size=worker.world_size,
        step_s=round(step_s, 6),
        **{k: v for k, v in step_metrics.items() if k not in LEDGER_FIELDS},
    )


LEDGER_FIELDS = (*events.POSITION, "world_size")  # written by record_step itself


def log_progress(worker: Worker, step_metrics: dict[str, Any], first_step: int) -> None:
    """The interval's metrics in one line; one that covers fewer steps than
    ``training.log_every_n_steps`` (the first after a resume, one closed by a checkpoint off
    the log cadence) says which steps it covers."""
    global_step = step_metrics["global_step"]
    shown = " ".join(
        f"{k} {v:.4g}" for k, v in step_metrics.items() if k not in events.NOT_TASK_METRICS
    )
    if global_step - first_step + 1 != worker.cfg.training.log_every_n_steps:
        shown = f"(over steps {first_step}-{global_step} only) {shown}"
    log.info(
        "step %d/%d epoch %d %s lr %.2e %.0f samples/s world %d, %s",
        global_step,
        worker.plan.total_steps,
        step_metrics["epoch"],
        shown,
        step_metrics["lr"],
        step_metrics["samples_per_s"],
        worker.world_size,
        pace.describe(step_metrics["global_step"], worker.plan.total_steps),
    )
