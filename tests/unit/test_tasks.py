"""The task seam without Ray: the built-in tasks keep the contract, and bad data or a bad model
reference is refused on the driver with exit 2 and one line, before Ray starts or anything is
written."""

from __future__ import annotations

import mmap
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import ray
import torch
from click.testing import CliRunner

from training import tasks
from training.driver.cli import main
from training.tasks import image, tabular
from training.tasks.contract import run_contract

FS = pafs.LocalFileSystem()


def source(path: Path, val_fraction: float = 0.1) -> tasks.DataSource:
    return tasks.DataSource(FS, str(path), str(path), val_fraction)


@pytest.fixture(scope="module")
def demo_table(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tabular") / "demo.parquet"
    tabular.write_demo_dataset(FS, str(path), rows=512)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lm") / "corpus.txt"
    tasks.build("language_model", {"demo_max_bytes": 200_000}, source(path)).write_demo()
    return path


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("image") / "digits"
    image.write_digits(FS, str(path))
    return path


# ------------------------------------------------------------------ contract, every built-in


@pytest.mark.parametrize("name", ["tabular", "language_model", "image"])
def test_builtin_task_keeps_the_contract(name, request):
    path = request.getfixturevalue(
        {"tabular": "demo_table", "language_model": "corpus", "image": "digits"}[name]
    )
    assert run_contract(name, {}, source(path)) == []


def test_contract_catches_means_reported_as_totals(demo_table, tmp_path, monkeypatch):
    """A task whose totals are means (not sums) breaks the world-size invariance: caught."""
    (tmp_path / "mean_task.py").write_text(
        textwrap.dedent("""
        from training.tasks import StepOutput
        from training.tasks.tabular import TabularClassification

        class MeanTotals(TabularClassification):
            def step(self, model, batch):
                out = super().step(model, batch)
                return StepOutput(out.loss, {**out.totals, "loss": out.loss.detach()})
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    failures = run_contract("mean_task:MeanTotals", {}, source(demo_table))
    sys.modules.pop("mean_task", None)
    assert len(failures) == 1 and "totals['loss'] does not add up" in failures[0]


def test_contract_catches_an_impure_batch(digits, monkeypatch):
    monkeypatch.setattr(
        image, "derive_generator", lambda *parts: torch.Generator().manual_seed(torch.seed())
    )
    failures = run_contract("image", {}, source(digits))
    assert any("not pure" in f for f in failures)


def test_augmentation_depends_on_seed_and_id_only(digits):
    task = tasks.build("image", {}, source(digits))
    train = task.load().train
    ids = torch.tensor([5, 17, 40, 41])

    def images(ids, seed, training=True):
        return task.batch(train, ids, seed, training=training)[0]

    whole = images(ids, 11)
    # The same samples in another batch (another rank's split) get the same shift.
    assert torch.equal(whole, torch.cat([images(ids[:2], 11), images(ids[2:], 11)]))
    assert not torch.equal(whole, images(ids, 12))  # another epoch
    # Evaluation: the images as they are, whatever the seed.
    assert torch.equal(images(ids, 11, training=False), images(ids, 12, training=False))
    assert not torch.equal(whole, images(ids, 11, training=False))


def test_language_model_blocks_are_memory_mapped_and_held_out_at_the_tail(corpus):
    task = tasks.build("language_model", {"block_size": 64}, source(corpus, 0.1))
    loaded = task.load()
    train, val = loaded.train, loaded.val
    assert isinstance(train.files[0].base.obj, mmap.mmap)  # not read into memory
    raw = corpus.read_bytes()
    assert bytes(train.get(0)) == raw[:65] and bytes(train.get(3)) == raw[192:257]
    blocks = (len(raw) - 1) // 64
    assert len(train) + len(val) == blocks and len(val) == int(blocks * 0.1)
    assert bytes(val.get(0)) == raw[len(train) * 64 : len(train) * 64 + 65]
    # English bytes under byte frequencies: learned by load, reported by metrics.
    assert 5 < loaded.info.unigram_perplexity < 60
    metrics = task.metrics({"loss": 2.0, "count": 1.0}, loaded.info)
    assert metrics["unigram_perplexity"] == loaded.info.unigram_perplexity


def test_image_split_is_stable_and_covers_every_class(digits):
    task = tasks.build("image", {}, source(digits, 0.2))
    first = task.check()
    loaded = task.load()
    train, val = loaded.train, loaded.val
    assert loaded.info == image.ImageInfo(num_classes=10)
    assert first["train_samples"] == len(train) and first["val_samples"] == len(val)
    assert len(train) + len(val) == 1797 and 0.15 < len(val) / 1797 < 0.25
    assert set(val.labels.tolist()) == set(range(10))
    assert tasks.build("image", {}, source(digits, 0.2)).check() == first


def test_tabular_models_and_a_custom_factory(demo_table, tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(
        textwrap.dedent("""
        from torch import nn
        def linear(in_features, num_classes, bias=True):
            return nn.Linear(in_features, num_classes, bias=bias)
        def not_a_model(in_features, num_classes):
            return 42
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for model in ("mlp", "transformer"):
        task = tasks.build("tabular", {"model": model}, source(demo_table))
        loaded = task.load()
        assert loaded.info == tabular.TableInfo(tabular.DEMO_FEATURES, tabular.DEMO_CLASSES)
        logits = task.build_model(loaded.info)(loaded.train.features[:7])
        assert logits.shape == (7, tabular.DEMO_CLASSES)
    task = tasks.build(
        "tabular",
        {"model": "my_models:linear", "model_kwargs": {"bias": False}},
        source(demo_table),
    )
    assert task.build_model(task.load().info).bias is None
    task = tasks.build("tabular", {"model": "my_models:not_a_model"}, source(demo_table))
    with pytest.raises(TypeError, match=r"returned int, not nn\.Module"):
        task.build_model(task.load().info)
    sys.modules.pop("my_models", None)


def test_tabular_demo_dataset_is_deterministic(tmp_path):
    first, second = tmp_path / "a.parquet", tmp_path / "b.parquet"
    tabular.write_demo_dataset(FS, str(first), rows=500, seed=3)
    tabular.write_demo_dataset(FS, str(second), rows=500, seed=3)
    assert first.read_bytes() == second.read_bytes()
    loaded = tasks.build("tabular", {}, source(first, 0.2)).load()
    train, val = loaded.train, loaded.val
    assert len(train) == 400 and len(val) == 100
    shares = torch.bincount(train.labels).float() / len(train)
    assert shares.max() < 0.45  # no class dominates: a model must learn the boundary


# ------------------------------------------------------------------ bad input -> exit 2


def write_table(path: Path, **columns) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


def numeric(rows: int = 200, **extra) -> dict:
    rng = np.random.default_rng(0)
    return {
        "x0": rng.standard_normal(rows),
        "x1": rng.standard_normal(rows),
        "label": rng.integers(0, 3, rows),
        **extra,
    }


def bad_inputs(tmp: Path) -> list[tuple[str, list[str], str]]:
    good = write_table(tmp / "good.parquet", **numeric())
    (tmp / "notes.txt").write_text("not parquet\n")
    (tmp / "a_file").write_text("x")
    (tmp / "empty_dir").mkdir()
    (tmp / "oneclass" / "cats").mkdir(parents=True)
    rows = 200
    return [
        (
            "factory cannot be imported",
            [f"data.path={good}", "task.options.model=nowhere:net"],
            "task.options.model 'nowhere:net': no module 'nowhere' where this runs",
        ),
        (
            "factory not callable",
            [f"data.path={good}", "task.options.model=training.tasks.tabular:DEMO_FEATURES"],
            "task.options.model 'training.tasks.tabular:DEMO_FEATURES': 32 is not callable",
        ),
        (
            "missing label column",
            [f"data.path={good}", "task.options.label_column=target"],
            "task.options.label_column 'target' is not a column of",
        ),
        (
            "missing feature column",
            [f"data.path={good}", "task.options.feature_columns=[x0, x9]"],
            "task.options.feature_columns ['x9'] are not columns of",
        ),
        ("not parquet", [f"data.path={tmp / 'notes.txt'}"], "is not Parquet"),
        (
            "non-numeric features",
            [f"data.path={write_table(tmp / 's.parquet', **numeric(name=['a'] * rows))}"],
            "feature columns must be numeric (int, float or bool); not: name (string)",
        ),
        (
            "float labels",
            [f"data.path={write_table(tmp / 'f.parquet', **numeric(label=np.ones(rows)))}"],
            "label column 'label' has type double; labels must be integer class indices >= 0",
        ),
        (
            "negative labels",
            [f"data.path={write_table(tmp / 'n.parquet', **numeric(label=-np.ones(rows, int)))}"],
            "label column 'label' holds nulls or negative values",
        ),
        (
            "nan features",
            [f"data.path={write_table(tmp / 'nan.parquet', **numeric(x1=np.full(rows, np.nan)))}"],
            "feature column 'x1' holds NaN or infinite values",
        ),
        (
            "empty dataset",
            [f"data.path={write_table(tmp / 'e.parquet', **numeric(rows=0))}"],
            "holds no rows",
        ),
        (
            "smaller than one global batch",
            [f"data.path={write_table(tmp / 'small.parquet', **numeric(rows=40))}"],
            "has 36 training samples (after holding out data.val_fraction 0.1), fewer than one "
            "global batch (training.global_batch_size 64)",
        ),
        (
            "storage path is a file",
            [f"data.path={good}", f"storage.path={tmp / 'a_file'}"],
            "exists but is not a directory",
        ),
        (
            "text corpus without text",
            ["task.name=language_model", f"data.path={tmp / 'empty_dir'}"],
            "is a directory without .txt files",
        ),
        (
            "image folder with one class",
            ["task.name=image", f"data.path={tmp / 'oneclass'}"],
            "has 1 class subfolders; need >= 2",
        ),
    ]


BAD_INPUT_COUNT = 14


@pytest.mark.parametrize("case", range(BAD_INPUT_COUNT))
def test_bad_data_fails_on_the_driver_with_one_line(case, tmp_path):
    cases = bad_inputs(tmp_path)
    assert len(cases) == BAD_INPUT_COUNT
    name, overrides, expected = cases[case]
    storage = tmp_path / "runs"
    args = ["train", "--set", f"storage.path={storage}"]
    for item in overrides:
        args += ["--set", item]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, (name, result.output)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), (name, lines)
    assert expected in lines[0], (name, lines[0])
    assert not ray.is_initialized()
    assert not storage.exists()  # nothing written for a run that cannot start
