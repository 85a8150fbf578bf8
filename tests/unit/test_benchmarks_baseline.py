"""The torchrun baseline runs the project's own step and evaluation (``step.train_step``,
``evaluation.evaluate``): under plain ``torchrun`` it ends bitwise where the project's loop ends at
the
same world size, so a Ray/torchrun ratio compares launchers, not two copies of a step."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs
import torch
from in_process import run_ranks

from training.core import checkpoint
from training.driver.settings import load_config
from training.tasks import tabular

REPO = Path(__file__).resolve().parents[2]
STEPS = 30


def test_the_baseline_ends_bitwise_where_the_project_loop_ends(tmp_path):
    table = tmp_path / "demo.parquet"
    tabular.write_demo_dataset(pafs.LocalFileSystem(), str(table), rows=2000)
    overrides = [
        f"data.path={table}",
        f"storage.path={tmp_path / 'runs'}",
        f"training.max_steps={STEPS}",
        "eval.every_n_steps=10",
        "training.micro_batch_size=8",  # what the old copy of the step left out
        "run.name=same",
    ]
    output = tmp_path / "baseline.out"
    with output.open("w") as out:
        # Output to a file, not a pipe: a rank that outlives torchrun (they run in sessions of
        # their own) cannot keep the test waiting on the pipe after the timeout.
        baseline = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
             "2", str(REPO / "benchmarks" / "torchrun_baseline.py"), "--config",
             str(REPO / "training" / "configs" / "local.yaml"),
             *(arg for o in overrides for arg in ("--set", o)), "--run-dir", str(tmp_path / "tr")],
            stdout=out, stderr=subprocess.STDOUT, timeout=180,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
    assert baseline.returncode == 0, output.read_text()[-3000:]
    cfg = load_config(str(REPO / "training" / "configs" / "local.yaml"), overrides)
    assert run_ranks(cfg.model_dump()) == [0, 0]

    ours = checkpoint.load_newest(pafs.LocalFileSystem(), str(tmp_path / "runs" / "same"))
    theirs = torch.load(tmp_path / "tr" / "ckpt" / f"checkpoint_{STEPS:09d}.pt", weights_only=True)
    assert ours is not None and ours[0].step == STEPS == theirs["global_step"]
    for name, tensor in ours[1]["model"].items():
        assert torch.equal(tensor, theirs["model"][name]), name
