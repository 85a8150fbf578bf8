"""A task's optimizer parameter groups (``Task.param_groups``) reach the optimizer, and a
grouping that leaves a parameter out is refused before training."""

from __future__ import annotations

import pytest
from two_head_task import write_csv

from training.driver.settings import parse_config
from training.worker.attempt import build_worker
from training.worker.context import Worker
from training.worker.runtime import LocalRuntime


def worker_for(tmp_path, task: str) -> Worker:
    write_csv(tmp_path / "points.csv")
    cfg = parse_config(
        {
            "task": {"name": f"two_head_task:{task}"},
            "data": {"path": str(tmp_path / "points.csv")},
            "training": {"global_batch_size": 32, "optimizer": {"weight_decay": 0.1}},
        }
    )
    return build_worker(cfg, cfg.model_dump(), LocalRuntime(cfg))


def test_the_tasks_groups_reach_the_optimizer(tmp_path):
    groups = worker_for(tmp_path, "NoDecayOnBiases").optimizer.param_groups
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert all(p.dim() == 1 for p in groups[1]["params"])  # the biases, no decay


def test_a_grouping_that_forgets_parameters_is_refused(tmp_path):
    with pytest.raises(ValueError, match="exactly once: 4 missing"):
        worker_for(tmp_path, "ForgetsTheHeads")
