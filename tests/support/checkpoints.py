"""A small model's training state, and a checkpoint of it on local storage, for the unit tests
of checkpoints and of storage errors."""

import torch

from training.core import checkpoint
from training.core.checkpoint import Progress
from training.core.config import Config
from training.core.optim import build_optimizer, build_scheduler
from training.tasks.tabular import MLP, MLPOptions


def make_state(seed=0, steps=1):
    torch.manual_seed(seed)
    cfg = Config()
    model = MLP(8, 3, MLPOptions(hidden_sizes=[16]))
    optimizer = build_optimizer(cfg.training.optimizer, model)
    scheduler = build_scheduler(cfg.training.lr_schedule, optimizer, total_steps=50)
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(4, 8)).sum().backward()
        optimizer.step()
        scheduler.step()
    return cfg, model, optimizer, scheduler


def save(run_dir, step, seed=0):
    """A checkpoint three steps in: its schedule differs from a fresh state's (one step)."""
    cfg, model, optimizer, scheduler = make_state(seed, steps=3)
    path = run_dir / checkpoint.dir_name(step)
    path.mkdir(parents=True)
    progress = Progress(global_step=step, epoch=1, step_in_epoch=step - 10, attempt="a1")
    extra = {"scaler": {"scale": 8.0}, "task": {"ema": [1.0]}}
    checkpoint.write(path, model, optimizer, scheduler, progress, cfg.model_dump(), extra)
    return str(path), model, optimizer, scheduler
