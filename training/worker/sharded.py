"""Sharded models and checkpoints: FSDP2 (``fully_shard``) and Distributed Checkpoint (DCP).

Under FSDP2 no rank holds the whole model: parameters, gradients and optimizer state are
DTensors sharded over the ranks. A checkpoint is therefore written by every rank (its own
shards, ``__<rank>_0.distcp``) plus DCP's ``.metadata``, which says where every shard of every
tensor lives; loading reads the slices the new layout needs, so a checkpoint saved by W ranks
loads at any other world size (the elastic case: a node lost, then regained).

The validity rule of the project's checkpoints holds here too: ``manifest.json`` (the size and
SHA-256 of every file) is written last, by rank 0, once every rank's files are complete; a
directory without it, or with a file of the wrong size, is never loaded. Each rank hashes the
files it wrote itself (no rank reads another's shards), and the digests travel to rank 0 through
the collectives seam.

Local and shared paths only (DCP's ``FileSystemWriter``); S3 needs a DCP storage writer over
``pyarrow.fs``, not written yet. This module is the base for ``training.parallelism: fsdp``
(issue 26); the loop does not use it yet.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from training.core.checkpoint import MANIFEST_FILE, InvalidCheckpoint
from training.worker.collectives import Collectives

_READ_CHUNK = 16 << 20


def shard(model: nn.Module, units: Iterable[nn.Module], device_type: str) -> nn.Module:
    """``fully_shard`` each unit (a transformer block, say: its parameters are gathered for its
    forward and freed after) and then the root, over all ranks of the process group."""
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    for unit in units:
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def save(directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank calls this: each writes its shards, then rank 0 the manifest, last."""
    directory = Path(directory)
    comm = Collectives(torch.device("cpu"))
    model_state, optimizer_state = get_state_dict(model, optimizer)
    # DCP's save ends once the coordinator has written .metadata after every rank's writes.
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(directory))
    mine = _describe_own_files(directory, dist.get_rank())
    every = comm.gather_objects(mine)
    if dist.get_rank() == 0:
        files = {name: meta for rank_files in every for name, meta in rank_files.items()}
        files[".metadata"] = _describe(directory / ".metadata")
        manifest = {"format": "dcp", "world_size": dist.get_world_size(), "files": files}
        (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    comm.barrier()  # nobody treats the checkpoint as written before its manifest is


def validate(directory: str | Path) -> dict[str, Any]:
    """The manifest, if every file it lists is there with its size; else InvalidCheckpoint. The
    checksums are checked where the files are read (``verify`` may hash them all)."""
    directory = Path(directory)
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise InvalidCheckpoint(f"{directory}: no manifest (a partial write)")
    manifest = json.loads(path.read_text())
    for name, meta in manifest["files"].items():
        file = directory / name
        if not file.is_file() or file.stat().st_size != meta["size"]:
            size = file.stat().st_size if file.is_file() else None
            raise InvalidCheckpoint(
                f"{directory}: {name} has {size} bytes, the manifest says {meta['size']}"
            )
    return manifest


def load(directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank calls this, at any world size: each reads the slices its shards need."""
    validate(directory)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
    )


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's tensors, gathered to CPU on every rank (for tests and small models)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, broadcast_from_rank0=False)
    return get_model_state_dict(model, options=options)


def _describe_own_files(directory: Path, rank: int) -> dict[str, dict[str, Any]]:
    return {
        p.name: _describe(p)
        for p in sorted(directory.iterdir())
        if p.name.startswith(f"__{rank}_") and p.suffix == ".distcp"
    }


def _describe(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(_READ_CHUNK):
            digest.update(chunk)
    return {"size": os.path.getsize(path), "sha256": digest.hexdigest()}
