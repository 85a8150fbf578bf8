"""The state a forward pass changes, captured at each step boundary for the save on failure."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from training import tasks


class StepBoundary:
    """The state a forward pass changes, as the last completed step left it.

    BatchNorm's running statistics and counters (any persistent buffer) move in the forward
    pass, before the step's gradients are all-reduced, and a task may change its own state in
    ``batch`` or ``step``. When a peer dies inside a step, rank 0 already holds the step in
    flight's buffers beside the last completed step's parameters and optimizer (those change
    only in the optimizer step, after every collective). The save on failure takes the buffers
    and the task state from here. Per step: one copy of the buffers into reused tensors on
    their device (no host sync), and a copy of the task state if the task keeps any; nothing
    at all for a model without buffers and a task without state.
    """

    def __init__(self, model: nn.Module, task: tasks.Task) -> None:
        self._model, self._task = model, task
        self._live = buffers_of(model)
        self._saved = {name: torch.empty_like(t) for name, t in self._live.items()}
        self._keeps_task_state = type(task).state_dict is not tasks.Task.state_dict
        self._task_state: dict[str, Any] = {}
        self.step = -1

    def capture(self, step: int) -> None:
        with torch.no_grad():
            for name, tensor in self._live.items():
                self._saved[name].copy_(tensor)
        if self._keeps_task_state:
            self._task_state = copy.deepcopy(self._task.state_dict())
        self.step = step

    def state_at(self, step: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(model state, task state) as step ``step`` ended; raises if this boundary cannot
        say (not captured at that step, or the model replaced a buffer object since)."""
        if step != self.step:
            raise RuntimeError(f"step {step} is not the captured boundary ({self.step})")
        live = buffers_of(self._model)
        if live.keys() != self._live.keys() or any(
            live[name] is not tensor for name, tensor in self._live.items()
        ):
            raise RuntimeError("the model replaced a buffer during training")
        model_state = {**self._model.state_dict(), **self._saved}
        task_state = self._task_state if self._keeps_task_state else self._task.state_dict()
        return model_state, task_state


def buffers_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """The persistent buffers of ``model`` by state-dict key (live tensors, not copies)."""
    params = {id(p) for p in model.parameters()}
    return {
        name: tensor
        for name, tensor in model.state_dict(keep_vars=True).items()
        if id(tensor) not in params
    }
