"""The exact global sample order: which sample ids a global step and a rank use.

The global order of an epoch is a pure function of (seed, epoch). Global step g of an epoch
takes positions [g*B, (g+1)*B) of that order, and rank r of W takes the r-th of W equal
slices. So which samples a step consumes never depends on how often the run restarted or on
how many workers it had when it did: resume only needs (epoch, step-in-epoch).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


def steps_per_epoch(num_samples: int, global_batch_size: int) -> int:
    """Full global batches per epoch; the remainder of each epoch's order is dropped."""
    steps = num_samples // global_batch_size
    if steps == 0:
        raise ValueError(
            f"training.global_batch_size ({global_batch_size}) exceeds the {num_samples} "
            "training samples"
        )
    return steps


@dataclass(frozen=True)
class ShardLayout:
    """How a task's samples sit in storage: ``sizes[k]`` consecutive sample ids per shard (a
    Parquet row group), in id order; ``window`` shards are shuffled together."""

    sizes: tuple[int, ...]
    window: int


def layout_record(layout: ShardLayout | None) -> dict | None:
    """The layout as the run log stores it: shard sizes run-length encoded ([size, count]
    pairs), since row groups are mostly the same size; a few bytes per attempt."""
    if layout is None:
        return None
    runs: list[list[int]] = []
    for size in layout.sizes:
        if runs and runs[-1][0] == size:
            runs[-1][1] += 1
        else:
            runs.append([size, 1])
    return {"sizes": runs, "window": layout.window}


def layout_from_record(record: dict | None) -> ShardLayout | None:
    if record is None:
        return None
    sizes = tuple(size for size, count in record["sizes"] for _ in range(count))
    return ShardLayout(sizes, record["window"])


def epoch_order(
    seed: int, epoch: int, num_samples: int, layout: ShardLayout | None = None
) -> torch.Tensor:
    """The global sample order of one epoch: a pure function of (seed, epoch) and, for a
    sharded (streamed) dataset, of its layout."""
    if layout is not None:
        return shard_order(seed, epoch, layout)
    generator = torch.Generator().manual_seed(derive_seed(seed, "epoch", epoch))
    return torch.randperm(num_samples, generator=generator)


def shard_order(seed: int, epoch: int, layout: ShardLayout) -> torch.Tensor:
    """Shards permuted per epoch, then consecutive groups of ``window`` shards; the samples of
    each group are shuffled together. A step therefore touches at most the shards of the one or
    two groups it straddles, so a reader needs about two windows in memory; a sample's position
    is uniform within its group, and groups are a fresh random draw of shards every epoch."""
    starts = torch.tensor((0, *layout.sizes)).cumsum(0)
    shuffled = torch.Generator().manual_seed(derive_seed(seed, "epoch", epoch, "shards"))
    shards = torch.randperm(len(layout.sizes), generator=shuffled).tolist()
    parts = []
    for first in range(0, len(shards), layout.window):
        group = shards[first : first + layout.window]
        ids = torch.cat([torch.arange(starts[k], starts[k + 1]) for k in group])
        mixer = torch.Generator().manual_seed(derive_seed(seed, "epoch", epoch, "window", first))
        parts.append(ids[torch.randperm(len(ids), generator=mixer)])
    return torch.cat(parts)


def global_batch(order: torch.Tensor, step_in_epoch: int, batch_size: int) -> torch.Tensor:
    return order[step_in_epoch * batch_size : (step_in_epoch + 1) * batch_size]


def rank_slice(batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    per_rank = len(batch) // world_size
    return batch[rank * per_rank : (rank + 1) * per_rank]


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts; stable across processes and Python versions."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
