"""Fault injection: let users prove fault tolerance on their own cluster.

Each configured fault fires once per run, whatever the restarts: before firing, the failing
rank writes a marker ``<run dir>/chaos/fault-<i>.fired`` to shared storage, and a fault whose
marker exists is never fired again (a re-run of the same step after resume passes through).
"""

from __future__ import annotations

import logging
import os
import posixpath
import signal
import time

import pyarrow.fs as pafs
import torch

from training.core import storage
from training.core.config import Fault

# Not print(): Ray Train shows a worker's print twice (its logger and the raw stream).
log = logging.getLogger(__name__)


class InjectedFault(RuntimeError):
    """The exception a ``raise`` fault throws."""


# Test-only faults that change which sample ids one step feeds ``task.batch`` on one rank
# (no marker: they do not stop the run): the ledger check (``verify``) must name that step.
TAMPERING = ("drop_sample", "repeat_sample")


def tampers(faults: list[Fault], rank: int) -> bool:
    return any(f.kind in TAMPERING and f.rank == rank for f in faults)


def tamper(faults: list[Fault], rank: int, global_step: int, ids: torch.Tensor) -> torch.Tensor:
    """``drop_sample``: the step's last id is left out; ``repeat_sample``: it is replaced by a
    second copy of the first."""
    for fault in faults:
        if (fault.rank, fault.step) != (rank, global_step) or fault.kind not in TAMPERING:
            continue
        log.warning("chaos: %s on rank %d at step %d", fault.kind, rank, global_step)
        ids = ids[:-1] if fault.kind == "drop_sample" else torch.cat([ids[:-1], ids[:1]])
    return ids


def maybe_inject(
    faults: list[Fault],
    fs: pafs.FileSystem,
    run_dir: str,
    rank: int,
    global_step: int,
    during: str,
) -> None:
    for index, fault in enumerate(faults):
        if (fault.rank, fault.step, fault.during) != (rank, global_step, during):
            continue
        if fault.kind in TAMPERING:
            continue
        marker = posixpath.join(run_dir, "chaos", f"fault-{index}.fired")
        if storage.exists(fs, marker):
            continue
        storage.write_bytes(fs, marker, f"{fault.model_dump_json()}\n".encode())
        _fire(fault, rank, global_step)


def _fire(fault: Fault, rank: int, global_step: int) -> None:
    what = f"chaos: {fault.kind} on rank {rank} at step {global_step} ({fault.during})"
    log.warning(what)  # handlers flush each record: it is out before a kill
    if fault.kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault.kind == "raise":
        raise InjectedFault(what)
    else:
        time.sleep(fault.seconds)
