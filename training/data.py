"""The exact global sample order: which sample ids a global step and a rank use.

The global order of an epoch is a pure function of (seed, epoch). Global step g of an epoch
takes positions [g*B, (g+1)*B) of that order, and rank r of W takes the r-th of W equal
slices. So which samples a step consumes never depends on how often the run restarted or on
how many workers it had when it did: resume only needs (epoch, step-in-epoch).
"""

from __future__ import annotations

import hashlib

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
