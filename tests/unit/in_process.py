"""Run the real training loop (``attempt.train_in_process``) in plain processes, no Ray: N ranks on
gloo over loopback (a file rendezvous), as ``torchrun`` would start them. Seconds instead of a
Ray cluster's start-up.

``guard=True`` first wraps every public ``torch.distributed`` collective in each rank: a call
that does not come from ``training.worker.collectives`` (the seam), or a tensor that is not on the
device the seam says the backend needs, fails the rank with ``CollectiveOutsideSeam``.
"""

from __future__ import annotations

import functools
import inspect
import multiprocessing
import os
import sys
import tempfile
import traceback
from typing import Any

import torch
import torch.distributed as dist

COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_object",
    "all_gather_into_tensor",
    "all_to_all",
    "barrier",
    "broadcast",
    "broadcast_object_list",
    "gather",
    "gather_object",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "scatter",
    "scatter_object_list",
)
SEAM = "training.worker.collectives"


class CollectiveOutsideSeam(AssertionError):
    pass


def run_ranks(
    config: dict[str, Any], world_size: int = 2, guard: bool = False, timeout_s: float = 30.0
) -> list[int]:
    """Start ``world_size`` ranks of one attempt, wait for all; their exit codes by rank
    (0: finished, 1: raised, -9: SIGKILLed)."""
    return run_function(_train, world_size, timeout_s, config, guard, timeout_s)


def run_function(function, world_size: int, timeout_s: float, *args: Any) -> list[int]:
    """``function(*args)`` in each of ``world_size`` spawned ranks (a module-level function),
    ``RANK`` etc. set as torchrun sets them and ``INIT_METHOD`` naming a file rendezvous (a free
    TCP port can be taken between choosing and binding it); exit codes by rank."""
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as rendezvous:
        init = f"file://{rendezvous}/store"
        ranks = [
            context.Process(target=_rank_main, args=(rank, world_size, init, function, args))
            for rank in range(world_size)
        ]
        for process in ranks:
            process.start()
        for process in ranks:
            process.join(timeout=timeout_s * 10)
            if process.is_alive():
                process.kill()
                process.join()
    return [process.exitcode for process in ranks]


def _rank_main(rank: int, world_size: int, init: str, function, args: tuple) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        INIT_METHOD=init,
        OMP_NUM_THREADS="1",  # as Ray gives a 1-CPU worker: two ranks share 2 cores
    )
    torch.set_num_threads(1)
    code = 0
    try:
        function(*args)
    except Exception:  # exit 1 says it; the traceback goes to stderr
        traceback.print_exc()
        code = 1
    # Leave without the interpreter's teardown, where a C++ thread of a broken gloo group can
    # abort the process (exit -6: seen in CI after a clean run, and here after a raise).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _train(config: dict[str, Any], guard: bool, timeout_s: float) -> None:
    if guard:
        install_guard()
    from training.worker import attempt

    attempt.train_in_process(config, timeout_s=timeout_s, init_method=os.environ["INIT_METHOD"])


def install_guard() -> None:
    for name in COLLECTIVES:
        setattr(dist, name, _guarded(getattr(dist, name), name))


def _guarded(collective, name: str):
    @functools.wraps(collective)
    def call(*args, **kwargs):
        caller = inspect.getmodule(inspect.currentframe().f_back)
        where = caller.__name__ if caller else "?"
        if where != SEAM:
            raise CollectiveOutsideSeam(f"dist.{name} called from {where}, not {SEAM}")
        expected = _seam_device()
        for tensor in _tensors(args, kwargs):
            if tensor.device != expected:
                raise CollectiveOutsideSeam(
                    f"dist.{name} got a tensor on {tensor.device}; the backend needs {expected}"
                )
        return collective(*args, **kwargs)

    return call


def _seam_device() -> torch.device:
    from training.worker.collectives import device_for

    return device_for(str(dist.get_backend()), _training_device())


def _training_device() -> torch.device:
    local_rank = int(os.environ["LOCAL_RANK"])
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def _tensors(args, kwargs):
    for value in [*args, *kwargs.values()]:
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from (v for v in value if isinstance(v, torch.Tensor))


def tensors(tree, prefix=""):
    """(path, tensor) for every tensor in a nested state dict, in a fixed order: two states
    compare tensor for tensor."""
    if isinstance(tree, torch.Tensor):
        yield prefix, tree
    elif isinstance(tree, dict):
        for key in sorted(tree, key=str):
            yield from tensors(tree[key], f"{prefix}/{key}")


TWO_HEAD_STEPS = 14  # one epoch of two_head_task's 512 rows: 461 training rows // 32


def two_heads_under_fsdp(points, storage, name: str, faults=(), **training) -> dict:
    """The config of a user's task whose forward moves buffers (two_head_task: BatchNorm),
    sharded per child module, checkpointed at step 7 and 14 (synchronously: step 7's checkpoint
    is sealed before step 8 begins; async, a kill at step 9 on a loaded machine came before its
    seal and the run resumed from step 0)."""
    from training.driver.settings import parse_config

    return parse_config(
        {
            "run": {"name": name},
            "storage": {"path": str(storage)},
            "task": {"name": "two_head_task:TwoHeadRegression", "options": {"hidden": 16}},
            "data": {"path": str(points), "val_fraction": 0.1},
            "training": {"parallelism": "fsdp", "global_batch_size": 32, "log_every_n_steps": 7},
            "eval": {"batches": 1, "every_n_steps": 7},
            "checkpoint": {"every_n_steps": 7, "upload": "sync"},
            "chaos": {"faults": list(faults)},
        }
    ).model_dump()
