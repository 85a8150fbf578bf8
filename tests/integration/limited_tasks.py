"""Test-only task: the built-in tabular task, each worker moving itself into a memory cgroup of
its own (limit ``ELASTIC_TEST_MEMORY_LIMIT`` bytes, under ``ELASTIC_TEST_CGROUP_DIR``) just
before it loads data, so the kernel bounds all it allocates from then on."""

from __future__ import annotations

import os
from pathlib import Path

from memory_limit import join_new_cgroup

from training.tasks.tabular import TabularClassification


class MemoryLimitedTabular(TabularClassification):
    def load(self):
        join_new_cgroup(
            Path(os.environ["ELASTIC_TEST_CGROUP_DIR"]),
            int(os.environ["ELASTIC_TEST_MEMORY_LIMIT"]),
        )
        return super().load()
