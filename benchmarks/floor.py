"""The floor under a checkpoint stall, measured in-process on the same machine and storage.

For a model + AdamW state of a given size: the time to copy the state in memory (what an async
snapshot must at least pay), to serialize it (``torch.save`` to memory), to write the bytes to
the storage directory (page cache, and with fsync: the device), and to load it back. On a GPU,
``device_to_host``: the copy of the same state from the device to pinned host memory.
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


def state_for(hidden_sizes: list[int], device: str = "cpu") -> dict[str, Any]:
    torch.manual_seed(0)
    model = MLP(DEMO_FEATURES, DEMO_CLASSES, MLPOptions(hidden_sizes=hidden_sizes)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = model(torch.randn(8, DEMO_FEATURES, device=device)).logsumexp(dim=1).mean()
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


def device_to_host(hidden_sizes: list[int], reps: int) -> dict[str, Any]:
    """The floor under a checkpoint pause on a GPU: copying the state (model + AdamW) from the
    device into pinned host buffers allocated beforehand, as the loop's stager reuses them,
    with one synchronize at the end. Without CUDA (the dry run) it copies host to host."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tensors = _tensors(state_for(hidden_sizes, device))
    buffers = [torch.empty_like(t, device="cpu", pin_memory=device == "cuda") for t in tensors]

    def copy() -> None:
        for buffer, tensor in zip(buffers, tensors, strict=True):
            buffer.copy_(tensor, non_blocking=True)
        if device == "cuda":
            torch.cuda.synchronize()

    copy()  # warm-up: first-touch of the host pages
    times = [_timed(copy) for _ in range(reps)]
    size = sum(t.numel() * t.element_size() for t in tensors)
    return {
        "hidden_sizes": hidden_sizes,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "state_mb": size / 1e6,
        "d2h_s": {
            "n": reps,
            "median": statistics.median(times),
            "min": min(times),
            "max": max(times),
        },
        "d2h_gb_per_s": size / 1e9 / statistics.median(times),
    }


def _tensors(tree: Any) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    values = tree.values() if isinstance(tree, dict) else tree if isinstance(tree, list) else []
    return [t for v in values for t in _tensors(v)]


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _write_fsync(path: Path, blob: bytes) -> None:
    with path.open("wb") as f:
        f.write(blob)
        f.flush()
        os.fsync(f.fileno())
