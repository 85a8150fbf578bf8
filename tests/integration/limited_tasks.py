"""Test-only task: the built-in tabular task, each worker moving itself into a memory cgroup of
its own (limit ``ELASTIC_TEST_MEMORY_LIMIT`` bytes, under ``ELASTIC_TEST_CGROUP_DIR``) just
before it first touches the data, so the kernel bounds all it allocates from then on: in
``load`` for a whole-table read; at the start of the prefetch plan when streaming (``load``
then reads only the Parquet footers).

What came before is the worker's baseline, logged (``memory limit: baseline RSS``): Python,
torch and Ray, the model, DDP, and one forward/backward/AdamW step of a tiny model, which
loads torch's autograd engine, optimizer code and thread pools (lazily loaded, ~40 MB here).
The limit is then a budget for what grows with the data and the run: the reader and its
decoded row groups, each step's batch, activations, gradients, optimizer state, checkpoints,
evaluation and S3 reads."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from memory_limit import join_new_cgroup

from training.tasks.tabular import TabularClassification

log = logging.getLogger(__name__)


class MemoryLimitedTabular(TabularClassification):
    limited = False

    def load(self):
        if not self.options.stream:
            self.enter_limit()
        return super().load()

    def prefetch(self, samples, upcoming):
        self.enter_limit()
        super().prefetch(samples, upcoming)

    def enter_limit(self) -> None:
        if self.limited:
            return
        pay_fixed_costs()
        log.info("memory limit: baseline RSS %.0f MB before entering the cgroup", rss_mb())
        join_new_cgroup(
            Path(os.environ["ELASTIC_TEST_CGROUP_DIR"]),
            int(os.environ["ELASTIC_TEST_MEMORY_LIMIT"]),
        )
        self.limited = True


def pay_fixed_costs() -> None:
    """Touch torch's lazily loaded training machinery once, with no data at all."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters())
    loss = torch.nn.functional.cross_entropy(model(torch.randn(8, 4)), torch.zeros(8).long())
    loss.backward()
    optimizer.step()


def rss_mb() -> float:
    """This process's resident set size now (Linux: VmRSS in KiB)."""
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) / 1024
