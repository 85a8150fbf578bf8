"""Run logs written through the real RunLog (and so the real TensorBoard writer), no Ray needed.

The two-attempt run: attempt "a" (world size 2) trains steps 1..30 with a checkpoint at 20 and
dies; attempt "b" (world size 1, a resize) resumes from 20 and finishes at 40. Each attempt's
losses carry its own offset, so a test can tell whose value a reader kept for steps 21..30.
"""

from __future__ import annotations

import pyarrow.fs as pafs

from training.core.runlog import RunLog

OFFSET = {"a": 0.0, "b": 100.0}


def loss(attempt: str, step: int) -> float:
    return OFFSET[attempt] + 10.0 - 0.1 * step


def write_attempt(
    fs: pafs.FileSystem,
    run_dir: str,
    attempt: str,
    *,
    world_size: int,
    resumed_from: int | None,
    last_step: int,
    every: int = 1,
) -> RunLog:
    """One attempt's events; returns the RunLog still open (close it, or let it 'crash')."""
    log = RunLog(fs, run_dir, attempt)
    log.write(
        "start",
        world_size=world_size,
        resumed_from_step=resumed_from,
        resumed_from_attempt="a" if resumed_from else None,
    )
    for step in range((resumed_from or 0) + 1, last_step + 1):
        if step % every:
            continue
        log.write(
            "step",
            global_step=step,
            epoch=0,
            step_in_epoch=step,
            world_size=world_size,  # the framework's fields come first, as the loop writes them
            loss=loss(attempt, step),
            perplexity=2.0 * step,  # a task-defined metric nobody told the readers about
            lr=0.001,
            samples=[1, 2, 3],
            converged=False,
            extra={"nested": 1.0},
        )
        if step % 20 == 0:
            log.write("eval", global_step=step, val_loss=loss(attempt, step) + 0.5)
            log.flush()
            log.write("checkpoint", global_step=step, blocked_s=0.25, path=f"ckpt_{step}")
    return log


def two_attempt_run(fs: pafs.FileSystem, run_dir: str, every: int = 1) -> None:
    first = write_attempt(
        fs, run_dir, "a", world_size=2, resumed_from=None, last_step=30, every=every
    )
    # Closed, so steps 21..30 reach storage: the rolled-back points readers must drop.
    first.close()
    second = write_attempt(
        fs, run_dir, "b", world_size=1, resumed_from=20, last_step=40, every=every
    )
    second.write("end", global_step=40)
    second.close()
