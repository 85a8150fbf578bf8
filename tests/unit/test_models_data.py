"""Models build and run; the demo dataset is deterministic and readable back."""

import sys
import textwrap

import pyarrow.parquet as pq
import pytest
import torch

from training import data
from training.config import Config, DataSection, ModelSection, StorageSection
from training.models import build_model


@pytest.mark.parametrize("name", ["mlp", "transformer"])
def test_builtin_models_map_features_to_logits(name):
    model = build_model(ModelSection(name=name), in_features=30, num_classes=5)
    assert model(torch.randn(7, 30)).shape == (7, 5)


def test_custom_model_from_import_string(tmp_path, monkeypatch):
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
    model = build_model(
        ModelSection(name="my_models:linear", kwargs={"bias": False}), in_features=4, num_classes=2
    )
    assert model.bias is None and model(torch.randn(3, 4)).shape == (3, 2)
    with pytest.raises(TypeError, match=r"returned int, not nn\.Module"):
        build_model(ModelSection(name="my_models:not_a_model"), 4, 2)
    with pytest.raises(ValueError, match="cannot import 'nowhere'"):
        build_model(ModelSection(name="nowhere:f"), 4, 2)
    sys.modules.pop("my_models", None)


def test_demo_dataset_is_deterministic_and_learnable_shape(tmp_path):
    first, second = tmp_path / "a.parquet", tmp_path / "b.parquet"
    data.write_demo_dataset(str(first), StorageSection(), rows=500, seed=3)
    data.write_demo_dataset(str(second), StorageSection(), rows=500, seed=3)
    assert first.read_bytes() == second.read_bytes()
    table = pq.read_table(first)
    assert table.num_rows == 500 and "label" in table.column_names
    splits = data.load_splits(DataSection(path=str(first), val_fraction=0.2), StorageSection())
    assert len(splits.train) == 400 and len(splits.val) == 100
    assert splits.num_features == data.DEMO_FEATURES and splits.num_classes == data.DEMO_CLASSES
    # No class dominates: a model must learn the boundary to beat chance.
    shares = torch.bincount(splits.train.labels).float() / len(splits.train)
    assert shares.max() < 0.45


def test_unknown_columns_are_named(tmp_path):
    path = tmp_path / "d.parquet"
    data.write_demo_dataset(str(path), StorageSection(), rows=50)
    with pytest.raises(ValueError, match="label_column 'target' not in columns"):
        data.load_splits(DataSection(path=str(path), label_column="target"), StorageSection())
    with pytest.raises(ValueError, match=r"feature_columns \['nope'\] not in columns"):
        data.load_splits(DataSection(path=str(path), feature_columns=["nope"]), StorageSection())


def test_default_config_plan():
    cfg = Config()
    assert cfg.training.global_batch_size % cfg.scaling.max_workers == 0
