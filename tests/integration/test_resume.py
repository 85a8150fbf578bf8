"""A run stopped mid-way and started again with the same name resumes from its checkpoint and
ends bitwise equal to an uninterrupted run of the same config (2 CPU workers, gloo)."""

from __future__ import annotations

from support.cli import train_cli
from support.runs import assert_bitwise_equal, events, final_state, write_config

from training.core import runlog

TOTAL_STEPS = 228  # 4 epochs x 57 steps: enough for the demo task to learn
EPOCHS = {"epochs": 4}


def test_stopped_run_resumes_bitwise_equal(tmp_path, ray_address):
    reference = write_config(
        tmp_path / "ref.yaml", tmp_path, run={"name": "reference"}, training=EPOCHS
    )
    result = train_cli(reference, address=ray_address)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Starting fresh run 'reference'" in result.stdout
    demo_task_learned(tmp_path, "reference")

    # Stop the second run at step 47 (rank 1 raises; no retries allowed): it checkpointed at 40.
    stopped = write_config(
        tmp_path / "stop.yaml",
        tmp_path,
        run={"name": "resumed"},
        training=EPOCHS,
        chaos={"faults": [{"kind": "raise", "rank": 1, "step": 47}]},
        checkpoint={"on_failure": False},  # about the periodic checkpoint
        failure={"max_failures": 0},
    )
    result = train_cli(stopped, address=ray_address)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Training failed" in result.stderr

    # Same run name again: resumes from step 40 (chaos markers make the fault fire only once).
    result = train_cli(stopped, address=ray_address)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Resuming run 'resumed' from step 40" in result.stdout
    assert f"steps:            {TOTAL_STEPS}" in result.stdout

    assert_bitwise_equal(final_state(tmp_path, "reference"), final_state(tmp_path, "resumed"))
    report = runlog.check_ledger(events(tmp_path, "resumed"))
    assert report.ok, report.errors
    assert report.attempts == 2 and report.resumed_from_steps == [None, 40]
    assert report.completed and report.final_step == TOTAL_STEPS

    # A finished run started again says so and starts nothing.
    result = train_cli(stopped, address=ray_address)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Run 'resumed' already finished at step {TOTAL_STEPS}" in result.stdout
    assert runlog.check_ledger(events(tmp_path, "resumed")).attempts == 2


def demo_task_learned(tmp_path, name: str) -> None:
    """The uninterrupted run learned: 4 classes, largest class < 45% of rows, so chance is far
    below these bounds (one run serves both checks: a run's start costs more than its steps)."""
    summary = runlog.summarize(events(tmp_path, name))
    steps = [e for e in events(tmp_path, name) if e["event"] == "step"]
    first_loss = next(e["loss"] for e in steps if "loss" in e)  # the first log interval
    assert summary["val"]["val_accuracy"] > 0.7, summary
    assert summary["val"]["val_loss"] < 0.6 * first_loss, (summary, first_loss)
