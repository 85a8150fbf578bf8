"""The task seam has no hidden order: what ``load`` learns reaches ``build_model`` and
``metrics`` as an argument (``Loaded.info``), evaluation is ``batch(..., training=False)``, and a
task written for the interface before 2026-12-03 is refused on the driver with one line that
says what changed, before Ray starts."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import ray
from click.testing import CliRunner

from training import tasks
from training.driver.cli import main
from training.tasks import image, tabular
from training.tasks.contract import run_contract

FS = pafs.LocalFileSystem()

# The README's example as it was written for the old interface: load() sets self.inputs for
# build_model() to read, and evaluation was batch(..., seed=None).
OLD_TASK = textwrap.dedent("""
    import pyarrow.csv as csv
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset
    from training import tasks
    from training.tasks import StepOutput, Task

    class CsvRegression(Task):
        def check(self):
            return {"train_samples": 270}

        def load(self):
            table = csv.read_csv(self.data.fs.open_input_stream(self.data.path))
            x = torch.tensor(table["a"].to_numpy(), dtype=torch.float32)[:, None]
            y = torch.tensor(table["y"].to_numpy(), dtype=torch.float32)
            self.inputs, n = x.shape[1], 270
            return TensorDataset(x[:n], y[:n]), TensorDataset(x[n:], y[n:])

        def build_model(self):
            return nn.Linear(self.inputs, 1)

        def batch(self, samples, ids, seed):
            return samples[ids]

        def step(self, model, batch):
            x, y = batch
            loss = nn.functional.mse_loss(model(x).squeeze(1), y)
            return StepOutput(loss, {"loss": loss.detach() * len(y), "count": torch.tensor(len(y))})

    class HalfMigrated(CsvRegression):  # new signatures, but load still returns a tuple
        def build_model(self, info):
            return nn.Linear(1, 1)

        def batch(self, samples, ids, seed, *, training):
            return samples[ids]

    class MutableInfo(HalfMigrated):
        def load(self):
            train, val = super().load()
            return tasks.Loaded(train, val, {"inputs": 1})
""")


@pytest.fixture
def old_tasks(tmp_path, monkeypatch) -> Path:
    (tmp_path / "old_tasks.py").write_text(OLD_TASK)
    (tmp_path / "points.csv").write_text("a,y\n" + "".join(f"{i},{2 * i}\n" for i in range(300)))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("old_tasks", None)


@pytest.mark.parametrize("command", ["check-task", "train"])
def test_a_task_for_the_old_interface_is_refused_on_the_driver_saying_what_changed(
    old_tasks, command
):
    storage = old_tasks / "runs"
    args = [command, "--set", "task.name=old_tasks:CsvRegression"]
    args += ["--set", f"data.path={old_tasks / 'points.csv'}", "--set", f"storage.path={storage}"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, lines
    assert "CsvRegression is written for the task interface before 2026-12-03" in lines[0]
    assert "build_model(self) must be build_model(self, info)" in lines[0]
    assert (
        "batch(self, samples, ids, seed) must be batch(self, samples, ids, seed, *, training)"
        in (lines[0])
    )
    assert lines[0].count("must be") == 2  # metrics is the base class's: not named
    assert "load() returns Loaded(train, val, info)" in lines[0]
    assert not ray.is_initialized()
    assert not storage.exists()


@pytest.mark.parametrize(
    ("task", "expected"),
    [
        ("HalfMigrated", "HalfMigrated.load() returned tuple, not Loaded(train, val, info)"),
        ("MutableInfo", "MutableInfo.load() returned Loaded.info of type dict, which can be"),
    ],
)
def test_check_task_says_what_load_must_return(old_tasks, task, expected):
    source = tasks.DataSource(FS, str(old_tasks / "points.csv"), "points.csv", 0.1)
    failures = run_contract(f"old_tasks:{task}", {}, source)
    assert len(failures) == 1 and expected in failures[0], failures


@pytest.mark.parametrize("name", ["tabular", "language_model", "image"])
def test_builtin_load_leaves_the_task_as_it_was(name, tmp_path):
    """Nothing reaches build_model or metrics through ``self``: load sets no attribute."""
    path = tmp_path / "data"
    write = {
        "tabular": lambda: tabular.write_demo_dataset(FS, str(path), rows=256),
        "language_model": lambda: path.write_text("Some English text to learn from. " * 40),
        "image": lambda: image.write_digits(FS, str(path)),
    }
    write[name]()
    task = tasks.build(name, {}, tasks.DataSource(FS, str(path), str(path), 0.1))
    before = dict(vars(task))
    loaded = tasks.load(task)
    assert vars(task) == before
    assert loaded.info is not None  # every built-in learns something the model or metrics use


def test_contract_catches_a_task_that_augments_in_evaluation(tmp_path, monkeypatch):
    digits = tmp_path / "digits"
    image.write_digits(FS, str(digits))

    def always_augment(self, samples, ids, seed, *, training):
        return original(self, samples, ids, seed, training=True)

    original = image.ImageClassification.batch
    monkeypatch.setattr(image.ImageClassification, "batch", always_augment)
    failures = run_contract("image", {}, tasks.DataSource(FS, str(digits), str(digits), 0.1))
    assert failures == [
        "batch(ids, seed, training=False) depends on the seed: evaluation batches must not be "
        "augmented"
    ]
