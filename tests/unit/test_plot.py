"""`python -m training plot`: what the figure shows, computed from a real run log, and the PNG."""

from __future__ import annotations

import sys

import pyarrow.fs as pafs
import pytest
from click.testing import CliRunner
from synthetic_runs import loss, two_attempt_run

from training.core import runlog
from training.driver.cli import main
from training.observability import plot

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def events(tmp_path):
    run_dir = str(tmp_path / "runs" / "r")
    two_attempt_run(pafs.LocalFileSystem(), run_dir)
    return runlog.read_events(pafs.LocalFileSystem(), run_dir)


def test_kept_history_is_one_value_per_step_and_the_redo_wins(events):
    picture = plot.describe(events)
    kept = {p.step: p for p in picture.train.kept}
    assert sorted(kept) == list(range(1, 41))
    assert kept[25].attempt == "b" and kept[25].values["loss"] == pytest.approx(loss("b", 25))
    assert sorted(p.step for p in picture.train.rolled_back) == list(range(21, 31))
    assert {p.attempt for p in picture.train.rolled_back} == {"a"}


def test_panels_are_the_task_metrics_loss_first_and_evals_join_their_metric(events):
    picture = plot.describe(events)
    # The task's metrics first (loss leading), the framework's own fields after them.
    assert picture.panels == ["loss", "perplexity", "lr", "world_size"]
    assert picture.eval_panel == {"val_loss": "loss"}


def test_restarts_resizes_and_checkpoints_are_marked(events):
    picture = plot.describe(events)
    assert [(r.step, r.world_before, r.world_after, r.is_resize) for r in picture.restarts] == [
        (20, 2, 1, True)
    ]
    assert [p.step for p in picture.checkpoints.kept] == [20, 40]


def test_plot_command_writes_a_png(tmp_path):
    two_attempt_run(pafs.LocalFileSystem(), str(tmp_path / "runs" / "r"))
    out = tmp_path / "r.png"
    result = CliRunner().invoke(
        main, ["plot", "--storage", str(tmp_path / "runs"), "--name", "r", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == PNG_MAGIC and out.stat().st_size > 20_000
    assert "4 metrics (loss, perplexity, lr, world_size)" in result.output
    assert "1 restarts" in result.output and "2 checkpoints" in result.output


def test_plot_without_matplotlib_says_which_extra_to_install(tmp_path, monkeypatch):
    two_attempt_run(pafs.LocalFileSystem(), str(tmp_path / "runs" / "r"))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    result = CliRunner().invoke(main, ["plot", "--storage", str(tmp_path / "runs"), "--name", "r"])
    assert result.exit_code == 2
    assert "pip install 'elastic-trainer[plot]'" in result.output


def test_plot_of_a_run_without_a_log_fails_clearly(tmp_path):
    result = CliRunner().invoke(main, ["plot", "--storage", str(tmp_path), "--name", "nope"])
    assert result.exit_code == 1
    assert "No run log under" in result.output
