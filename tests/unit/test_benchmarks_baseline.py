"""The torchrun baseline runs the project's own step and evaluation (``step.train_step``,
``evaluation.evaluate``): under plain ``torchrun`` it ends bitwise where the project's loop ends at
the same world size, so a Ray/torchrun ratio compares launchers, not two copies of a step. The
plain FSDP2 script (``torchrun_plain.py``) shares none of the worker package's code and still
ends bitwise where the project's fsdp loop ends."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs
import torch
from in_process import run_ranks
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from training import tasks
from training.core import checkpoint
from training.driver.settings import load_config
from training.tasks import tabular

REPO = Path(__file__).resolve().parents[2]
STEPS = 30
FSDP_STEPS = 3


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


def test_the_plain_fsdp2_script_ends_bitwise_where_the_project_fsdp_loop_ends(tmp_path):
    """``benchmarks/torchrun_plain.py``: a user's FSDP2 loop (``fully_shard`` per block and on
    the root, every rank building the model under the seed) against the project's (built on the
    meta device, rank 0's values broadcast, DCP checkpoints): the same final model, bit for bit."""
    corpus = tmp_path / "corpus.txt"
    source = tasks.DataSource(pafs.LocalFileSystem(), str(corpus), str(corpus), 0.1)
    tasks.build("language_model", {"demo_max_bytes": 60_000}, source).write_demo()
    overrides = [
        f"data.path={corpus}",
        f"storage.path={tmp_path / 'runs'}",
        "run.name=same",
        "task.options.block_size=32",
        "task.options.d_model=32",
        "task.options.n_heads=2",
        "training.parallelism=fsdp",
        "training.global_batch_size=8",
        f"training.max_steps={FSDP_STEPS}",
        f"checkpoint.every_n_steps={FSDP_STEPS}",
        "eval.batches=1",
    ]
    config = REPO / "training" / "configs" / "language_model.yaml"
    final = tmp_path / "plain.pt"
    output = tmp_path / "plain.out"
    with output.open("w") as out:
        plain = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
             "2", str(REPO / "benchmarks" / "torchrun_plain.py"), "--config", str(config),
             *(arg for o in overrides for arg in ("--set", o)), "--run-dir", str(tmp_path / "tr"),
             "--save-final", str(final)],
            stdout=out, stderr=subprocess.STDOUT, timeout=180,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
    assert plain.returncode == 0, output.read_text()[-3000:]
    assert run_ranks(load_config(str(config), overrides).model_dump()) == [0, 0]

    newest = checkpoint.newest_valid(pafs.LocalFileSystem(), str(tmp_path / "runs" / "same"))
    assert newest is not None and newest.step == FSDP_STEPS
    dcp_to_torch_save(newest.path, tmp_path / "ours.pt")
    ours = torch.load(tmp_path / "ours.pt", weights_only=False)["model"]
    theirs = torch.load(final, weights_only=True)
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert torch.equal(tensor, ours[name]), name
