"""Sharded checkpoints (``training/worker/sharded.py``, FSDP2 + DCP) on real gloo ranks: a
checkpoint written by 2 ranks reloads at 1 and at 3 ranks with every model and optimizer tensor
equal, and a torn, unfinished or corrupted one is refused by its manifest; on a local path and on
S3 (the session's SeaweedFS server, ``tests/conftest.py``), through one code path."""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch
import torch.distributed as dist
from counting_fs import recording_fs
from in_process import run_function, tensors
from support.s3 import s3
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

from training.core import storage
from training.core.checkpoint import MANIFEST_FILE, InvalidCheckpoint
from training.worker import sharded

FS = pafs.LocalFileSystem()

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


def _train_and_save(fs, directory: str, reference: str) -> None:
    model, optimizer = _build(seed=0)
    rank = dist.get_rank()
    for step in range(3):
        x = torch.randn(8, 16, generator=torch.Generator().manual_seed(100 * step + rank))
        model(x).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    sharded.save(fs, directory, model, optimizer)
    state = _full_state(model, optimizer)
    if rank == 0:
        torch.save(state, reference)
    dist.destroy_process_group()


def _load_and_dump(fs, directory: str, out: str) -> None:
    model, optimizer = _build(seed=1)  # other initial weights: what it holds must come from disk
    sharded.load(fs, directory, model, optimizer)
    state = _full_state(model, optimizer)
    if dist.get_rank() == 0:
        torch.save(state, out)
    dist.destroy_process_group()


def _save_at_two(fs, root: str, local: Path) -> tuple[pafs.FileSystem, str, dict]:
    """2 ranks train 3 steps and save to ``root`` on ``fs``: (fs, the checkpoint, its state)."""
    directory, reference = posixpath.join(root, "checkpoint_000000003"), local / "reference.pt"
    assert run_function(_train_and_save, 2, 60, fs, directory, str(reference)) == [0, 0]
    return fs, directory, torch.load(reference, weights_only=True)


@pytest.fixture(scope="module")
def saved_at_two(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    return _save_at_two(FS, str(root), root)


@pytest.fixture(scope="module")
def saved_at_two_on_s3(tmp_path_factory, s3_endpoint):
    """The same on S3 (SeaweedFS): DCP's files through ``core/dcp_storage.py``."""
    root = f"training/sharded-{uuid.uuid4().hex[:8]}"
    return _save_at_two(s3(s3_endpoint), root, tmp_path_factory.mktemp("sharded-s3"))


def saved(request, where: str) -> tuple[pafs.FileSystem, str, dict]:
    return request.getfixturevalue("saved_at_two" if where == "local" else "saved_at_two_on_s3")


@pytest.mark.parametrize(
    "where,world_size",
    [
        ("local", 1),
        ("local", 3),
        # The save on S3 (shared by the tests below) and one load: about what ("local", 1)
        # costs with its save (15.7 s vs 15.2 s at load average ~9); W=3 adds nothing new here
        ("s3", 1),
    ],
)
def test_a_checkpoint_saved_by_two_ranks_loads_at_another_world_size(
    request, tmp_path, where, world_size
):
    fs, directory, reference = saved(request, where)
    out = tmp_path / "loaded.pt"
    exit_codes = run_function(_load_and_dump, world_size, 60, fs, directory, str(out))
    assert exit_codes == [0] * world_size
    loaded = torch.load(out, weights_only=True)
    expected, got = dict(tensors(reference)), dict(tensors(loaded))
    assert expected.keys() == got.keys() and any("exp_avg" in k for k in expected)
    for key, tensor in expected.items():
        assert torch.equal(tensor, got[key]), key


@pytest.mark.parametrize("where", ["local", "s3"])  # < 0.1 s each (the save is shared)
def test_each_rank_wrote_its_shards_and_the_manifest_lists_them(request, where):
    fs, directory, _ = saved(request, where)
    manifest = sharded.validate(fs, directory)
    assert manifest["world_size"] == 2
    assert set(manifest["files"]) == {"__0_0.distcp", "__1_0.distcp", ".metadata"}
    # every file's SHA-256 as the manifest says (both ranks' shares of the check)
    assert sharded.corrupted_files(fs, directory, 0, 2) == []
    assert sharded.corrupted_files(fs, directory, 1, 2) == []
    # .metadata went through a temporary name: on S3 a copy and a delete, nothing left over
    assert sorted(i.base_name for i in storage.list_dir(fs, directory)) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp", MANIFEST_FILE,
    ]  # fmt: skip


def _save_and_count_reads(directory: str, out: str) -> None:
    model, optimizer = _build(seed=0)
    fs, handler = recording_fs()
    sharded.save(fs, directory, model, optimizer, {"progress": {"global_step": 3}})
    Path(f"{out}.{dist.get_rank()}").write_text(json.dumps(dict(handler.bytes_read)))
    dist.destroy_process_group()


def test_sealing_a_checkpoint_reads_nothing_back(tmp_path):
    """Each file's SHA-256 is taken as it is written: the seal used to read every shard back
    (on S3 a download of the whole checkpoint at every checkpoint). The hashes are those of
    what is on storage (the test above checks every file against its manifest entry). ~5 s."""
    directory, out = str(tmp_path / "checkpoint"), str(tmp_path / "reads")
    assert run_function(_save_and_count_reads, 2, 60, directory, out) == [0, 0]
    reads = [json.loads(Path(f"{out}.{rank}").read_text()) for rank in (0, 1)]
    assert reads == [{}, {}], reads
    manifest = sharded.validate(FS, directory)
    assert set(manifest["files"]) == {"__0_0.distcp", "__1_0.distcp", ".metadata",
                                      sharded.LOOP_STATE_FILE}  # fmt: skip
    assert sharded.corrupted_files(FS, directory, 0, 1) == []


@pytest.mark.parametrize("where", ["local", "s3"])  # < 0.3 s each: no ranks, copies and reads
@pytest.mark.parametrize("damage", ["torn shard", "no manifest", "a flipped byte"])
def test_a_torn_unfinished_or_corrupted_checkpoint_is_refused(request, where, damage):
    fs, directory, _ = saved(request, where)
    copy = f"{directory}-copy-{uuid.uuid4().hex[:8]}"
    fs.create_dir(copy)  # a local copy_files needs it
    pafs.copy_files(directory, copy, source_filesystem=fs, destination_filesystem=fs)
    shard = posixpath.join(copy, "__1_0.distcp")
    data = storage.read_bytes(fs, shard)
    if damage == "torn shard":
        storage.write_bytes(fs, shard, data[:-10])
    elif damage == "no manifest":
        fs.delete_file(posixpath.join(copy, MANIFEST_FILE))
    else:
        storage.write_bytes(fs, shard, data[:200] + bytes([data[200] ^ 0xFF]) + data[201:])
        assert sharded.validate(fs, copy)  # the sizes hold: only the checksum tells
        shares = [sharded.corrupted_files(fs, copy, rank, 2) for rank in (0, 1)]
        assert sorted(shares) == [[], ["__1_0.distcp"]]  # found in one rank's share
        return
    match = "__1_0.distcp has" if damage == "torn shard" else "no manifest"
    with pytest.raises(InvalidCheckpoint, match=match):
        sharded.validate(fs, copy)
