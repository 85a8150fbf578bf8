"""Every collective the package issues between ranks, in one place that knows the backend.

Ray Train gives GPU workers an NCCL-only process group, and NCCL accepts only tensors on the
worker's own CUDA device; gloo (CPU workers) accepts CPU tensors. A tensor built without a
device lands on the CPU, works in every CPU test and breaks the first multi-GPU run, so nothing
else in the package calls ``torch.distributed`` collectives (``tests/unit/test_collectives.py``
keeps it that way): callers hand tensors to :class:`Collectives`, which puts them where the
backend needs them.

DDP's own gradient all-reduce is not here: it is issued by DDP's reducer, on the device the
model lives on.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


class Collectives:
    """The process group as the training loop sees it: its size and the device its tensors go on."""

    def __init__(
        self, training_device: torch.device, group: dist.ProcessGroup | None = None
    ) -> None:
        self.active = dist.is_available() and dist.is_initialized()
        self.group = group  # None: the default group
        self.world_size = dist.get_world_size(group) if self.active else 1
        self.rank = dist.get_rank(group) if self.active else 0
        self.backend = str(dist.get_backend(group)) if self.active else "none"
        self.device = device_for(self.backend, training_device)

    @classmethod
    def side_group(cls) -> Collectives:
        """A second group of the same ranks, on gloo (CPU tensors), for a background thread
        (an asynchronous checkpoint's): collectives of two threads on one group could be
        issued in different orders on different ranks and pair up wrongly. Every rank must
        call this at the same point, as for any collective."""
        return cls(torch.device("cpu"), dist.new_group(backend="gloo"))

    @property
    def talks(self) -> bool:
        """Whether there is anyone to talk to (a group of one needs no collective)."""
        return self.active and self.world_size > 1

    def gather_rows(self, row: torch.Tensor) -> torch.Tensor:
        """Every rank's 1-D ``row`` stacked by rank: shape (world size, len(row)), on
        ``self.device``. One all-gather of a small tensor; the caller decides when to read it."""
        row = row.detach().to(self.device, torch.float64)
        if not self.talks:
            return row.unsqueeze(0)
        gathered = [torch.empty_like(row) for _ in range(self.world_size)]
        dist.all_gather(gathered, row, group=self.group)
        return torch.stack(gathered)

    def broadcast_object(self, value: Any) -> Any:
        """Rank 0's (picklable) ``value`` on every rank."""
        if not self.talks:
            return value
        box = [value]
        # The pickled bytes travel as a tensor: on NCCL it must be on this rank's GPU, which
        # torch would otherwise guess from the current CUDA device.
        dist.broadcast_object_list(box, src=0, group=self.group, device=self.device)
        return box[0]

    def broadcast_in_place(self, tensors: list[torch.Tensor]) -> None:
        """Rank 0's values copied into every other rank's ``tensors`` (any dtypes, shapes and
        devices), in one broadcast of their bytes packed into one tensor on ``self.device``."""
        if not self.talks or not tensors:
            return
        # Widest elements first: each tensor then starts at a multiple of its element size in
        # the packed bytes, so its slice can be viewed as its own dtype again.
        ordered = sorted(tensors, key=lambda t: t.element_size(), reverse=True)
        sizes = [t.numel() * t.element_size() for t in ordered]
        if self.rank == 0:
            packed = torch.cat([t.detach().reshape(-1).view(torch.uint8) for t in ordered])
            packed = packed.to(self.device)
        else:
            packed = torch.empty(sum(sizes), dtype=torch.uint8, device=self.device)
        dist.broadcast(packed, src=0, group=self.group)
        if self.rank == 0:
            return
        with torch.no_grad():
            for tensor, piece in zip(ordered, packed.split(sizes), strict=True):
                tensor.copy_(piece.view(tensor.dtype).view(tensor.shape))

    def gather_objects(self, value: Any) -> list[Any]:
        """Every rank's (picklable) ``value``, by rank, on every rank."""
        if not self.talks:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        # On NCCL: the current CUDA device, ours.
        dist.all_gather_object(gathered, value, group=self.group)
        return gathered

    def barrier(self) -> None:
        if not self.talks:
            return
        if self.device.type == "cuda":  # NCCL's barrier runs on a device: name ours, not 0
            dist.barrier(group=self.group, device_ids=[self.device.index])
        else:
            dist.barrier(group=self.group)


def device_for(backend: str, training_device: torch.device) -> torch.device:
    """Where a backend needs its tensors: NCCL on the training GPU, gloo on the CPU, even beside
    a GPU model (gloo's all-gather takes CPU tensors only)."""
    if training_device.type != "cpu" and "nccl" in backend:  # also "cpu:gloo,cuda:nccl"
        return training_device
    if backend == "nccl":
        raise ValueError(f"the nccl backend needs a CUDA training device, not {training_device}")
    return torch.device("cpu")
