"""Staging: the copy of a training state that a checkpoint writes while training goes on."""

from __future__ import annotations

import copy
from typing import Any

import torch


class Stager:
    """Reusable CPU buffers that a state is copied into: the only part of a checkpoint that
    blocks training. Serialising, checksumming and uploading the staged copy happen in the
    background while the live tensors change again (``checkpointer.py``)."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[Any, ...], torch.Tensor] = {}
        self._copying_from: set[torch.device] = set()

    def stage(self, tree: Any) -> Any:
        """A copy of ``tree`` whose tensors live in this stager's CPU buffers. GPU tensors are
        copied into pinned buffers without a sync per tensor; one sync per device at the end,
        since the buffers must hold this step's values before training goes on."""
        staged = self._stage(tree, ())
        for device in self._copying_from:
            torch.cuda.current_stream(device).synchronize()
        self._copying_from.clear()
        return staged

    def _stage(self, tree: Any, path: tuple[Any, ...]) -> Any:
        if isinstance(tree, torch.Tensor):
            return self._copy(tree, path)
        if isinstance(tree, dict):
            return {k: self._stage(v, (*path, k)) for k, v in tree.items()}
        if isinstance(tree, (list, tuple)):
            return type(tree)(self._stage(v, (*path, i)) for i, v in enumerate(tree))
        return copy.deepcopy(tree)

    def _copy(self, tensor: torch.Tensor, path: tuple[Any, ...]) -> torch.Tensor:
        buffer = self._buffers.get(path)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            buffer = torch.empty_like(tensor, device="cpu", pin_memory=tensor.is_cuda)
            self._buffers[path] = buffer
        if tensor.is_cuda:  # into pinned memory: asynchronous, synced once in stage()
            self._copying_from.add(tensor.device)
            return buffer.copy_(tensor.detach(), non_blocking=True)
        return buffer.copy_(tensor.detach())
