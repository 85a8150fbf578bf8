"""Parquet data, the exact global sample order, and the demo dataset.

The global order of an epoch is a pure function of (seed, epoch). Global step g of an epoch
takes positions [g*B, (g+1)*B) of that order, and rank r of W takes the r-th of W equal
slices. So which samples a step consumes never depends on how often the run restarted or on
how many workers it had when it did: resume only needs (epoch, step-in-epoch).
"""

from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from training import storage
from training.config import DataSection, StorageSection

DEMO_FEATURES = 32
DEMO_CLASSES = 4


@dataclass(frozen=True)
class Dataset:
    features: torch.Tensor  # float32 [N, F]
    labels: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Splits:
    train: Dataset
    val: Dataset
    num_classes: int

    @property
    def num_features(self) -> int:
        return self.train.features.shape[1]


def load_splits(cfg: DataSection, storage_cfg: StorageSection) -> Splits:
    """Read the Parquet data; the last ``val_fraction`` of rows is held out for evaluation."""
    fs, path = storage.resolve(cfg.path, storage_cfg)
    table = pq.read_table(path, filesystem=fs)
    features, labels = _to_tensors(table, cfg)
    n_train = len(labels) - int(len(labels) * cfg.val_fraction)
    return Splits(
        train=Dataset(features[:n_train], labels[:n_train]),
        val=Dataset(features[n_train:], labels[n_train:]),
        num_classes=int(labels.max()) + 1,
    )


def _to_tensors(table: pa.Table, cfg: DataSection) -> tuple[torch.Tensor, torch.Tensor]:
    names = table.column_names
    if cfg.label_column not in names:
        raise ValueError(f"data.label_column '{cfg.label_column}' not in columns {names}")
    columns = cfg.feature_columns or [n for n in names if n != cfg.label_column]
    missing = [c for c in columns if c not in names]
    if missing:
        raise ValueError(f"data.feature_columns {missing} not in columns {names}")
    matrix = np.stack([table[c].to_numpy().astype(np.float32) for c in columns], axis=1)
    labels = table[cfg.label_column].to_numpy().astype(np.int64)
    if labels.min() < 0:
        raise ValueError(f"labels in '{cfg.label_column}' must be class indices >= 0")
    return torch.from_numpy(matrix), torch.from_numpy(labels)


def steps_per_epoch(num_samples: int, global_batch_size: int) -> int:
    """Full global batches per epoch; the remainder of each epoch's order is dropped."""
    steps = num_samples // global_batch_size
    if steps == 0:
        raise ValueError(
            f"training.global_batch_size ({global_batch_size}) exceeds the {num_samples} "
            "training rows"
        )
    return steps


def epoch_order(seed: int, epoch: int, num_samples: int) -> torch.Tensor:
    """The global sample order of one epoch: a pure function of (seed, epoch)."""
    generator = torch.Generator().manual_seed(derive_seed(seed, "epoch", epoch))
    return torch.randperm(num_samples, generator=generator)


def global_batch(order: torch.Tensor, step_in_epoch: int, batch_size: int) -> torch.Tensor:
    return order[step_in_epoch * batch_size : (step_in_epoch + 1) * batch_size]


def rank_slice(batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    per_rank = len(batch) // world_size
    return batch[rank * per_rank : (rank + 1) * per_rank]


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts; stable across processes and Python versions."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def write_demo_dataset(
    path: str, storage_cfg: StorageSection, rows: int = 8192, seed: int = 0
) -> None:
    """A learnable 4-class task: labels come from a fixed random 2-layer teacher network.

    A linear model cannot fit it well, an MLP learns it within a few hundred steps, and the
    same (rows, seed) always gives byte-identical data.
    """
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, DEMO_FEATURES)).astype(np.float32)
    # Scaled so the teacher's tanh units are not saturated: a smooth, learnable boundary.
    w1 = rng.standard_normal((DEMO_FEATURES, 8)).astype(np.float32) / np.sqrt(DEMO_FEATURES)
    w2 = rng.standard_normal((8, DEMO_CLASSES)).astype(np.float32)
    labels = np.argmax(np.tanh(x @ w1) @ w2, axis=1).astype(np.int64)
    columns = {f"x{i}": x[:, i] for i in range(DEMO_FEATURES)}
    table = pa.table({**columns, "label": labels})
    fs, target = storage.resolve(path, storage_cfg)
    fs.create_dir(posixpath.dirname(target), recursive=True)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.write_bytes(fs, target, sink.getvalue().to_pybytes())
