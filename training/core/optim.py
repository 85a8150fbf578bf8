"""Optimizer and LR schedule from the config (no Ray import: the torchrun baseline uses it too)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from training.core.config import LRScheduleSection, OptimizerSection


def build_optimizer(
    cfg: OptimizerSection, model: nn.Module, groups: list[dict[str, Any]] | None = None
) -> torch.optim.Optimizer:
    """``training.optimizer`` over ``model``'s parameters, or over a task's parameter ``groups``
    (a group's own ``lr`` or ``weight_decay`` overrides the config's)."""
    params: Any = model.parameters() if groups is None else _checked(groups, model)
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _checked(groups: list[dict[str, Any]], model: nn.Module) -> list[dict[str, Any]]:
    """Every parameter of the model in exactly one group: one left out would never train, one
    in two groups would be stepped twice."""
    seen = [id(p) for group in groups for p in group["params"]]
    expected = {id(p) for p in model.parameters()}
    if len(seen) != len(set(seen)) or set(seen) != expected:
        missing, extra = len(expected - set(seen)), len(set(seen) - expected)
        raise ValueError(
            "the task's param_groups must hold every parameter of the model exactly once: "
            f"{missing} missing, {extra} not the model's, {len(seen) - len(set(seen))} repeated"
        )
    return groups


def build_scheduler(
    cfg: LRScheduleSection, optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.name == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.name == "cosine" else 1 - progress
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
