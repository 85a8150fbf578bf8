"""Sharded checkpoints (``training/worker/sharded.py``, FSDP2 + DCP) on real gloo ranks: a
checkpoint
written by 2 ranks reloads at 1 and at 3 ranks with every model and optimizer tensor equal, and
a torn or unfinished one is refused by its manifest."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
import torch.distributed as dist
from in_process import run_function, tensors
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

from training.core.checkpoint import MANIFEST_FILE, InvalidCheckpoint
from training.worker import sharded

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


class Blocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.ReLU()) for _ in range(3))
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _build(seed: int):
    dist.init_process_group(
        "gloo",
        init_method=os.environ["INIT_METHOD"],
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
    )
    torch.manual_seed(seed)
    model = Blocks()
    sharded.shard(model, model.blocks, "cpu")
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _full_state(model, optimizer) -> dict:
    return {
        "model": sharded.full_model_state(model),
        "optimizer": get_optimizer_state_dict(model, optimizer, options=FULL),
    }


def _train_and_save(directory: str, reference: str) -> None:
    model, optimizer = _build(seed=0)
    rank = dist.get_rank()
    for step in range(3):
        x = torch.randn(8, 16, generator=torch.Generator().manual_seed(100 * step + rank))
        model(x).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    sharded.save(directory, model, optimizer)
    state = _full_state(model, optimizer)
    if rank == 0:
        torch.save(state, reference)
    dist.destroy_process_group()


def _load_and_dump(directory: str, out: str) -> None:
    model, optimizer = _build(seed=1)  # other initial weights: what it holds must come from disk
    sharded.load(directory, model, optimizer)
    state = _full_state(model, optimizer)
    if dist.get_rank() == 0:
        torch.save(state, out)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def saved_at_two(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    directory, reference = root / "checkpoint_000000003", root / "reference.pt"
    assert run_function(_train_and_save, 2, 60, str(directory), str(reference)) == [0, 0]
    return directory, torch.load(reference, weights_only=True)


@pytest.mark.parametrize("world_size", [1, 3])
def test_a_checkpoint_saved_by_two_ranks_loads_at_another_world_size(
    saved_at_two, tmp_path, world_size
):
    directory, reference = saved_at_two
    out = tmp_path / "loaded.pt"
    exit_codes = run_function(_load_and_dump, world_size, 60, str(directory), str(out))
    assert exit_codes == [0] * world_size
    loaded = torch.load(out, weights_only=True)
    expected, got = dict(tensors(reference)), dict(tensors(loaded))
    assert expected.keys() == got.keys() and any("exp_avg" in k for k in expected)
    for key, tensor in expected.items():
        assert torch.equal(tensor, got[key]), key


def test_each_rank_wrote_its_shards_and_the_manifest_lists_them(saved_at_two):
    directory, _ = saved_at_two
    manifest = sharded.validate(directory)
    assert manifest["world_size"] == 2
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= set(manifest["files"])


@pytest.mark.parametrize("damage", ["torn shard", "no manifest"])
def test_a_torn_or_unfinished_checkpoint_is_refused(saved_at_two, tmp_path, damage):
    copy = tmp_path / "copy"
    shutil.copytree(saved_at_two[0], copy)
    if damage == "torn shard":
        shard = copy / "__1_0.distcp"
        shard.write_bytes(shard.read_bytes()[:-10])
        match = "__1_0.distcp has"
    else:
        (copy / MANIFEST_FILE).unlink()
        match = "no manifest"
    with pytest.raises(InvalidCheckpoint, match=match):
        sharded.validate(copy)
