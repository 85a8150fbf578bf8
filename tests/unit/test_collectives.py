"""The collectives seam: only ``training.worker.collectives`` calls ``torch.distributed``
collectives,
and on NCCL every tensor it hands over is on the training device (checked against a stand-in
NCCL group whose device is not the CPU). ``test_in_process.py`` runs the real loop with every
collective wrapped."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from in_process import COLLECTIVES

from training.worker import collectives
from training.worker.collectives import Collectives, device_for

PACKAGE = Path(collectives.__file__).resolve().parent


def direct_collective_calls(path: Path) -> list[str]:
    """``dist.X(...)`` / ``torch.distributed.X(...)`` calls and ``from torch.distributed import
    X`` of a collective X in one source file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch.distributed"):
            found += [f"import {a.name}" for a in node.names if a.name in COLLECTIVES]
        if isinstance(node, ast.Attribute) and node.attr in COLLECTIVES:
            owner = ast.unparse(node.value)
            if owner in ("dist", "torch.distributed", "distributed_c10d"):
                found.append(f"{owner}.{node.attr} (line {node.lineno})")
    return found


def test_no_module_but_the_seam_calls_a_collective():
    offenders = {
        str(path.relative_to(PACKAGE.parent)): calls
        for path in PACKAGE.rglob("*.py")
        if path.name != "collectives.py" and (calls := direct_collective_calls(path))
    }
    assert offenders == {}
    assert direct_collective_calls(PACKAGE / "collectives.py")  # the scan finds real calls


class StandInNccl:
    """What NCCL enforces, on a machine without GPUs: a group of 2 on an accelerator (the meta
    device stands in for ``cuda:1``) that rejects any tensor elsewhere."""

    def __init__(self, monkeypatch, device: torch.device) -> None:
        self.device, self.calls = device, []
        dist = collectives.dist
        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
        monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
        monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
        monkeypatch.setattr(dist, "all_gather", self.all_gather)
        monkeypatch.setattr(dist, "broadcast_object_list", self.broadcast_object_list)
        monkeypatch.setattr(dist, "barrier", self.barrier)

    def check(self, name: str, *tensors: torch.Tensor) -> None:
        for tensor in tensors:
            if tensor.device != self.device:
                raise RuntimeError(f"NCCL {name}: tensor on {tensor.device}, not {self.device}")
        self.calls.append(name)

    def all_gather(self, outputs, tensor, group=None):
        self.check("all_gather", *outputs, tensor)

    def broadcast_object_list(self, objects, src, group=None, device=None):
        self.check("broadcast_object_list", torch.empty(0, device=device))

    def barrier(self, group=None, device_ids=None):
        self.calls.append("barrier")


def test_on_nccl_every_tensor_goes_to_the_training_device(monkeypatch):
    nccl = StandInNccl(monkeypatch, torch.device("meta"))
    comm = Collectives(torch.device("meta"))
    assert comm.device == torch.device("meta") and comm.talks
    rows = comm.gather_rows(torch.tensor([1.0, 2.0]))  # built on the CPU, as a caller would
    assert rows.shape == (2, 2) and rows.device == torch.device("meta")
    comm.broadcast_object("attempt-id")
    comm.barrier()
    assert nccl.calls == ["all_gather", "broadcast_object_list", "barrier"]
    # What the drain agreement did before the seam: a CPU tensor straight to the backend.
    with pytest.raises(RuntimeError, match="tensor on cpu"):
        collectives.dist.all_gather([torch.empty(1)] * 2, torch.tensor([1.0]))


def test_each_backend_gets_tensors_where_it_needs_them():
    gpu = torch.device("cuda", 1)
    assert device_for("nccl", gpu) == gpu
    assert device_for("cpu:gloo,cuda:nccl", gpu) == gpu
    assert device_for("cpu:gloo,cuda:nccl", torch.device("cpu")) == torch.device("cpu")
    assert device_for("gloo", gpu) == torch.device("cpu")  # gloo's all-gather: CPU only
    with pytest.raises(ValueError, match="nccl backend needs a CUDA training device"):
        device_for("nccl", torch.device("cpu"))


def test_a_group_of_one_talks_to_nobody():
    comm = Collectives(torch.device("cpu"))  # no process group in this process
    assert not comm.talks
    assert comm.gather_rows(torch.tensor([3.0])).tolist() == [[3.0]]
    assert comm.broadcast_object({"a": 1}) == {"a": 1}
    comm.barrier()
