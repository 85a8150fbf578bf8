"""The floor under a checkpoint stall, measured in-process on the same machine and storage.

For a model + AdamW state of a given size: the time to copy the state in memory (what an async
snapshot must at least pay), to serialize it (``torch.save`` to memory), to write the bytes to
the storage directory (page cache, and with fsync: the device), and to load it back.
"""

from __future__ import annotations

import copy
import io
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from training.tasks.tabular import DEMO_CLASSES, DEMO_FEATURES, MLP, MLPOptions


def state_for(hidden_sizes: list[int]) -> dict[str, Any]:
    torch.manual_seed(0)
    model = MLP(DEMO_FEATURES, DEMO_CLASSES, MLPOptions(hidden_sizes=hidden_sizes))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = model(torch.randn(8, DEMO_FEATURES)).logsumexp(dim=1).mean()
    loss.backward()
    optimizer.step()  # materialise AdamW's two moments
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict()}


def measure(hidden_sizes: list[int], directory: Path, reps: int) -> dict[str, Any]:
    state = state_for(hidden_sizes)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / "floor.bin"
    timings: dict[str, list[float]] = {
        "copy_s": [],
        "serialize_s": [],
        "write_s": [],
        "write_fsync_s": [],
        "load_s": [],
    }
    size = 0
    for _ in range(reps):
        timings["copy_s"].append(_timed(lambda: copy.deepcopy(state)))
        buffer = io.BytesIO()
        timings["serialize_s"].append(_timed(lambda b=buffer: torch.save(state, b)))
        blob = buffer.getvalue()
        size = len(blob)
        timings["write_s"].append(_timed(lambda b=blob: target.write_bytes(b)))
        timings["write_fsync_s"].append(_timed(lambda b=blob: _write_fsync(target, b)))
        timings["load_s"].append(
            _timed(lambda: torch.load(target, map_location="cpu", weights_only=True))
        )
        target.unlink()
    medians = {k: statistics.median(v) for k, v in timings.items()}
    return {
        "hidden_sizes": hidden_sizes,
        "state_mb": size / 1e6,
        **{
            k: {"n": len(v), "median": medians[k], "min": min(v), "max": max(v)}
            for k, v in timings.items()
        },
        "write_mb_per_s": size / 1e6 / medians["write_s"],
        "write_fsync_mb_per_s": size / 1e6 / medians["write_fsync_s"],
        "copy_mb_per_s": size / 1e6 / medians["copy_s"],
    }


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _write_fsync(path: Path, blob: bytes) -> None:
    with path.open("wb") as f:
        f.write(blob)
        f.flush()
        os.fsync(f.fileno())
