"""Workloads through the task seam on a real Ray: the tabular refactor kept its exact result, the
language model resumes bitwise after a worker is SIGKILLed from outside, a user's task from a
module outside the package trains through the CLI, and a non-finite loss stops the run before
it can become a checkpoint."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pytest
import torch
from support.cli import REPO, start_cli, train_cli, wait_for
from support.runs import (
    alive_train_workers,
    assert_bitwise_equal,
    events,
    final_state,
    progress,
    redone_steps,
    write_config,
)

from training.core import checkpoint, data, runlog

# sha256 over the final model tensors (sorted by name) of the tabular demo below: the task
# refactor must not change a single bit of what the tabular task computes. torch's CPU kernels
# round differently per instruction set, so there is one reference per kernel level
# (torch.backends.cpu.get_cpu_capability()). AVX512: recorded from a run of the code *before* the
# refactor (commit e6a541d). AVX2: from commit 2d85199, which matched the AVX512 reference on an
# AVX512 host (its CI run), run on an AVX2-only host (2026-11-27).
GOLDEN_TABULAR = {
    "AVX512": "1108e8d269ab84371377563af548c1c59af34e49351c266a75807370505b47c5",
    "AVX2": "584156cd5c51f0a86e338348ecc3cd8fa6e7df4316bf2e0b71306f9956125c3c",
}


def model_hash(state: dict) -> str:
    digest = hashlib.sha256()
    for key, tensor in sorted(state["model"].items()):
        digest.update(key.encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


def test_tabular_demo_is_bit_identical_to_before_the_task_refactor(tmp_path, ray_address):
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in GOLDEN_TABULAR:
        pytest.skip(f"no reference result recorded for torch's {capability} CPU kernels")
    result = train_cli(
        REPO / "training" / "configs" / "local.yaml",
        "--name",
        "golden",
        "--storage",
        str(tmp_path / "runs"),
        "--set",
        f"data.path={tmp_path / 'demo.parquet'}",
        "--set",
        "training.max_steps=60",
        "--set",
        "checkpoint.every_n_steps=30",
        address=ray_address,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    state = final_state(tmp_path, "golden")
    assert state["progress"]["global_step"] == 60
    assert model_hash(state) == GOLDEN_TABULAR[capability]


LM_RUN = {
    "task": {
        "name": "language_model",
        "options": {"block_size": 64, "d_model": 128, "n_layers": 2, "demo_max_bytes": 300_000},
    },
    "data": {"path": "corpus.txt", "create_demo_if_missing": True},
    "training": {"max_steps": 240, "global_batch_size": 16, "log_every_n_steps": 20},
    "eval": {"batches": 2},
    "checkpoint": {"every_n_steps": 40, "num_to_keep": 2},
}


def lm_config(root: Path, name: str) -> Path:
    sections = {k: dict(v) for k, v in LM_RUN.items()}
    sections["data"]["path"] = str(root / "corpus.txt")
    return write_config(root / f"{name}.yaml", root, run={"name": name}, **sections)


def test_language_model_killed_from_outside_resumes_bitwise(tmp_path, ray_address):
    reference = tmp_path / "reference"
    reference.mkdir()
    result = train_cli(lm_config(reference, "lm"), address=ray_address)
    assert result.returncode == 0, result.stdout + result.stderr

    log = tmp_path / "lm.log"
    proc = start_cli(lm_config(tmp_path, "lm"), log, address=ray_address)
    try:
        step = wait_for(
            lambda: progress(tmp_path, "lm")[1] >= 60 and progress(tmp_path, "lm")[1],
            240,
            "60 language-model steps",
            proc,
        )
        victims = alive_train_workers(ray_address)
        assert len(victims) == 2
        rank0 = next(e["pid"] for e in events(tmp_path, "lm") if e["event"] == "start")
        os.kill(next(v.pid for v in victims if v.pid != rank0), signal.SIGKILL)  # rank 1
        assert proc.wait(timeout=300) == 0, log.read_text()[-5000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    report = runlog.check_ledger(events(tmp_path, "lm"))
    assert report.ok and report.completed, report.errors
    assert report.attempts == 2 and report.resumed_from_steps[1] > 0
    assert redone_steps(events(tmp_path, "lm")) == [0]  # rank 1 died: rank 0 saved its state
    assert_bitwise_equal(final_state(reference, "lm"), final_state(tmp_path, "lm"))
    summary = runlog.summarize(events(tmp_path, "lm"))
    # Far below the unigram baseline even on this short run.
    assert summary["val"]["val_perplexity"] < 0.8 * summary["val"]["val_unigram_perplexity"]
    print(
        f"language model: killed at step {step}, resumed from {report.resumed_from_steps}, "
        f"val perplexity {summary['val']['val_perplexity']:.2f} vs unigram "
        f"{summary['val']['val_unigram_perplexity']:.2f}; bitwise equal to the reference"
    )


USER_TASK = textwrap.dedent('''
    """A regression on a CSV file, written as the README shows."""
    import pyarrow.csv as csv
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    from training.tasks import Loaded, Options, StepOutput, Task, TaskError


    class RegressionOptions(Options):
        target: str = "y"
        hidden: int = 32
        poison_id: int | None = None  # tests: this sample makes the loss NaN


    class CsvRegression(Task):
        Options = RegressionOptions

        def _read(self):
            with self.data.fs.open_input_stream(self.data.path) as stream:
                return csv.read_csv(stream)

        def check(self):
            table = self._read()
            if self.options.target not in table.column_names:
                raise TaskError(f"task.options.target '{self.options.target}' is not a column")
            rows = table.num_rows
            return {"rows": rows, "columns": table.column_names,
                    "train_samples": rows - int(rows * self.data.val_fraction)}

        def load(self):
            table = self._read()
            y = torch.tensor(table[self.options.target].to_numpy(), dtype=torch.float32)
            x = torch.stack([torch.tensor(table[c].to_numpy(), dtype=torch.float32)
                             for c in table.column_names if c != self.options.target], dim=1)
            n = len(y) - int(len(y) * self.data.val_fraction)
            return Loaded(TensorDataset(x[:n], y[:n]), TensorDataset(x[n:], y[n:]), x.shape[1])

        def build_model(self, inputs):
            return nn.Sequential(nn.Linear(inputs, self.options.hidden), nn.ReLU(),
                                 nn.Linear(self.options.hidden, 1))

        def batch(self, samples, ids, seed, *, training):
            x, y = samples[ids]
            poison = self.options.poison_id
            poisoned = poison is not None and training and bool((ids == poison).any())
            return x, y, poisoned

        def step(self, model, batch):
            x, y, poisoned = batch
            loss = nn.functional.mse_loss(model(x).squeeze(1), y)
            if poisoned:  # (torch.where would make every step's gradient NaN: 0 * nan)
                loss = loss * float("nan")
            return StepOutput(loss, {"loss": loss.detach() * len(y),
                                     "count": torch.tensor(float(len(y)))})
''')


def user_task_run(root: Path, name: str, retries: int = 2, **options) -> tuple[Path, Path]:
    """A module outside the package and a CSV file in ``root``; the config that uses them."""
    (root / "my_tasks.py").write_text(USER_TASK)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((600, 3))
    y = x @ np.array([1.5, -2.0, 0.5]) + 0.1 * rng.standard_normal(600)
    pacsv.write_csv(
        pa.table({"a": x[:, 0], "b": x[:, 1], "c": x[:, 2], "y": y}), str(root / "points.csv")
    )
    config = write_config(
        root / f"{name}.yaml",
        root,
        run={"name": name},
        task={"name": "my_tasks:CsvRegression", "options": options},
        data={"path": str(root / "points.csv"), "create_demo_if_missing": False},
        training={
            "epochs": 10,
            "global_batch_size": 32,
            "log_every_n_steps": 5,
            "optimizer": {"lr": 0.01},
        },
        checkpoint={"every_n_steps": 5, "num_to_keep": 2},
        failure={"max_failures": retries},
    )
    return config, root


def user_cli(config: Path, root: Path, address: str) -> subprocess.CompletedProcess:
    """The CLI run from the user's directory with it on PYTHONPATH, as the README says."""
    return train_cli(config, address=address, cwd=root, env={"PYTHONPATH": str(root)})


def test_users_own_task_from_outside_the_package_trains(tmp_path, ray_address):
    config, root = user_task_run(tmp_path, "regression")
    result = user_cli(config, root, ray_address)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = runlog.summarize(events(tmp_path, "regression"))
    first = next(e["loss"] for e in events(tmp_path, "regression") if "loss" in e)
    assert summary["val"]["val_loss"] < 0.2 * first, (summary, first)
    assert "val loss:" in result.stdout  # the summary prints the task's own metrics
    assert runlog.check_ledger(events(tmp_path, "regression")).ok


def test_non_finite_loss_stops_the_run_before_a_checkpoint(tmp_path, ray_address):
    poison = 7
    order = data.epoch_order(0, 0, 540)  # 600 rows, 10% held out; seed 0, epoch 0
    bad_step = int((order == poison).nonzero()) // 32 + 1
    assert bad_step <= 16  # within epoch 0's 16 steps (the run has 10 epochs)
    config, root = user_task_run(tmp_path, "diverges", retries=1, poison_id=poison)
    result = user_cli(config, root, ray_address)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"became NaN/infinite at step {bad_step}" in result.stderr
    state_steps = [c["progress"]["global_step"] for c in _valid_states(tmp_path, "diverges")]
    assert all(s < bad_step for s in state_steps), (state_steps, bad_step)
    again = user_cli(config, root, ray_address)  # refused before Ray, with what to do
    assert again.returncode == 1
    assert "run 'diverges' was stopped: the loss or the gradients became NaN" in again.stderr
    assert f"NaN/infinite at step {bad_step}" in again.stderr
    assert "start a new run.name" in again.stderr and "Resuming run" not in again.stdout


def _valid_states(storage: Path, name: str) -> list[dict]:
    fs = pafs.LocalFileSystem()
    run = str(storage / "runs" / name)
    return [checkpoint.load(fs, c.path) for c in checkpoint.scan(fs, run) if c.valid]


def test_tensor_helpers_agree():
    # Guards the hash helper itself: equal states hash equal, a one-bit change does not.
    a = {"model": {"w": torch.zeros(3)}}
    b = {"model": {"w": torch.tensor([0.0, 0.0, 1e-45])}}
    assert model_hash(a) == model_hash({"model": {"w": torch.zeros(3)}})
    assert model_hash(a) != model_hash(b)
