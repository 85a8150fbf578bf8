"""The exact global sample order: which sample ids a global step and a rank use.

The global order of an epoch is a pure function of (seed, epoch). Global step g of an epoch
takes positions [g*B, (g+1)*B) of that order, and rank r of W takes the r-th of W equal
slices. So which samples a step consumes never depends on how often the run restarted or on
how many workers it had when it did: resume only needs (epoch, step-in-epoch).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
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
    seed: int,
    epoch: int,
    num_samples: int,
    layout: ShardLayout | None = None,
    batch_size: int = 1,
) -> torch.Tensor:
    """The global sample order of one epoch: a pure function of (seed, epoch) and, for a
    sharded (streamed) dataset, of its layout and the global batch size (fixed for a run);
    never of the world size."""
    if layout is not None:
        return shard_order(seed, epoch, layout, batch_size)
    generator = torch.Generator().manual_seed(derive_seed(seed, "epoch", epoch))
    return torch.randperm(num_samples, generator=generator)


def shard_order(seed: int, epoch: int, layout: ShardLayout, batch_size: int = 1) -> torch.Tensor:
    """Shards permuted per epoch, then cut into consecutive windows of ``window`` shards whose
    samples are interleaved (``_window_order``). Inside each global batch the samples are then
    grouped by their shard's slot in its window: a rank takes a contiguous slice of the batch,
    so at every step it needs only about 1/world of the window's shards, always the same ones
    for a window (a rank reads only those). Regrouping inside a batch changes which rank
    computes a sample, not which step consumes it: the set each step trains on, the ledger and
    exactly-once are untouched, and the order still does not depend on the world size."""
    starts = torch.tensor((0, *layout.sizes)).cumsum(0)
    shuffled = torch.Generator().manual_seed(derive_seed(seed, "epoch", epoch, "shards"))
    shards = torch.randperm(len(layout.sizes), generator=shuffled).tolist()
    ids, slots = [], []
    for first in range(0, len(shards), layout.window):
        mixer = torch.Generator().manual_seed(derive_seed(seed, "epoch", epoch, "window", first))
        window_ids, window_slots = _window_order(
            shards[first : first + layout.window], starts, mixer
        )
        ids.append(window_ids)
        slots.append(window_slots)
    order, slot = torch.cat(ids), torch.cat(slots)
    del ids, slots  # the order is held by every worker: keep its transient copies few
    # A batch that straddles two windows is grouped by slot alone: the rank that reads slots
    # 0..k of one window reads the same slots of the next. The remainder is never trained on.
    body = len(order) // batch_size * batch_size
    grouped = torch.argsort(slot[:body].view(-1, batch_size), dim=1, stable=True)
    order[:body] = order[:body].view(-1, batch_size).gather(1, grouped).view(-1)
    return order


def _window_order(
    shards: list[int], starts: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, slot of each id's shard) for one window. Each shard's samples are shuffled and
    spread evenly over the window's stretch (a random phase per shard), so any run of
    positions holds each shard in proportion to its size, within one sample: every batch is a
    stratified draw from the window's shards."""
    ids, keys, slots = [], [], []
    for slot, shard in enumerate(shards):
        begin, size = int(starts[shard]), int(starts[shard + 1] - starts[shard])
        ids.append(begin + torch.randperm(size, generator=generator))
        phase = torch.rand(1, generator=generator, dtype=torch.float64)
        keys.append((torch.arange(size, dtype=torch.float64) + phase) / size)
        slots.append(torch.full((size,), slot, dtype=torch.int32))
    spread = torch.argsort(torch.cat(keys), stable=True)
    return torch.cat(ids)[spread], torch.cat(slots)[spread]


def global_batch(order: torch.Tensor, step_in_epoch: int, batch_size: int) -> torch.Tensor:
    return order[step_in_epoch * batch_size : (step_in_epoch + 1) * batch_size]


def rank_slice(batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    per_rank = len(batch) // world_size
    return batch[rank * per_rank : (rank + 1) * per_rank]


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts; stable across processes and Python versions."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def seed_step(seed: int, device: torch.device) -> None:
    """Seed the generator a step's random ops (dropout) draw from on ``device``.

    Not ``torch.manual_seed``: while CUDA is not initialised (every CPU run) that also queues a
    lazy CUDA seeding together with a formatted Python stack, which cost 0.2-1.4 ms a call here
    (the deeper the stack, the more; a Ray worker's is deep), as long as a whole MLP step."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)  # this process's device, already initialised


# The consumption digest (the run log's witness of what the loop fed ``task.batch``): a sum of
# a non-linear hash of each id modulo a prime above any dataset's row count, so a dropped,
# repeated or swapped id changes it, ranks' digests add up to the global batch's, and every
# partial sum stays an exact integer in a float64 (< 2^31 per id, < 2^22 ids per step).
_DIGEST_PRIME = 2_147_483_647  # 2^31 - 1
_DIGEST_MIX = 1_103_515_245


def ids_digest(ids: torch.Tensor) -> int:
    """Order-free digest of a set of sample ids (with multiplicity); additive over disjoint
    parts. Numpy on the CPU ids a step already holds: ~20 us for 64 ids (torch's small-tensor
    ops cost twice that)."""
    v = ids.numpy().astype(np.int64, copy=False)
    x = v % _DIGEST_PRIME + 1
    x = x * x % _DIGEST_PRIME  # < 2^62: no int64 overflow
    return int(((x * _DIGEST_MIX + v) % _DIGEST_PRIME).sum())
