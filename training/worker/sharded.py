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

Alongside the shards, rank 0 writes ``loop_state.pt`` (LR schedule, progress, resolved config,
grad scaler and task state: small, the same on every rank). The manifest has the project's
format plus ``"layout": "dcp"``, so ``status``, ``verify``, ``prune`` and resume's scan read it
like any other checkpoint.

Every file goes through ``pyarrow.fs`` (``fs``, ``directory`` as the DDP checkpoints take them):
DCP's own files through ``training/core/dcp_storage.py``, the rest through ``core/storage.py``,
so a local or shared path and S3 take one code path. The loop uses this under
``training.parallelism: fsdp`` (``training/worker/sharded_checkpointer.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import posixpath
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from typing import Any

import pyarrow.fs as pafs
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from training.core import checkpoint, dcp_storage, storage
from training.core.checkpoint import InvalidCheckpoint
from training.worker.collectives import Collectives

LAYOUT = "dcp"
LOOP_STATE_FILE = "loop_state.pt"


def shard(
    model: nn.Module,
    units: Iterable[nn.Module],
    device_type: str,
    mp_policy: MixedPrecisionPolicy | None = None,
) -> nn.Module:
    """``fully_shard`` each unit (a transformer block, say: its parameters are gathered for its
    forward and freed after) and then the root, over all ranks of the process group."""
    if not dist.is_initialized():  # one process alone: FSDP2 and DCP still need a group
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    policy = mp_policy or MixedPrecisionPolicy()
    # Only the model's output is cast to output_dtype: a unit's output cast to fp32 would meet
    # the root's own bf16 parameters (the language model's final LayerNorm: "mixed dtype").
    inner = dataclasses.replace(policy, output_dtype=None)
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=inner)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def prepare(
    model: nn.Module, units: list[nn.Module] | None, precision: str, device: torch.device
) -> nn.Module:
    """The task's model on ``device``, sharded over every rank: ``units`` (the task's, else
    ``default_units``) and the root. bf16: FSDP2's own policy (parameters gathered and computed
    in bf16, gradients reduced and kept in fp32) in place of autocast. A model built under
    ``parameters_on_meta`` gets storage for this rank's shards only, values not yet set
    (``load_full`` or a checkpoint sets them)."""
    on_meta = any(p.is_meta for p in model.parameters())
    if not on_meta:
        model = model.to(device)
    policy = MixedPrecisionPolicy()
    if precision == "bf16":
        policy = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32, output_dtype=torch.float32
        )
    chosen = default_units(model) if units is None else units
    model = shard(model, chosen, device.type, policy)
    if on_meta:
        allocate(model, device)
    return model


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside register their parameters on the meta device (shapes, no storage):
    a model larger than one worker can be built, then sharded. A parameter's storage exists
    only until it is registered (``nn.Linear`` allocates its weight, registering swaps in a
    meta copy, and its initialisation then runs on meta), so the peak is one parameter, not
    the model. Buffers stay real: a non-persistent one (a
    causal mask) is in no state dict, so no checkpoint or broadcast could restore it."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:  # a meta one is shared (tied weights)
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def allocate(model: nn.Module, device: torch.device) -> None:
    """Storage on ``device`` for this rank's shards of a meta model; the buffers keep their
    values (``to_empty`` would leave them undefined too)."""
    buffers = dict(model.named_buffers())
    model.to_empty(device=device)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(buffers[name])


def load_full(model: nn.Module, build_full: Callable[[], nn.Module]) -> None:
    """Every rank calls this: rank 0 alone builds the whole model (``build_full``), and each
    rank receives its shards of its parameters and buffers, one tensor at a time (torch's
    broadcast from rank 0), so peers never hold the whole model. The values are rank 0's
    bit for bit, the same as if every rank had built it."""
    state = build_full().state_dict() if dist.get_rank() == 0 else {}
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, state, options=options)


def default_units(model: nn.Module) -> list[nn.Module]:
    """Where a task names none: the entries of the outermost ``nn.ModuleList`` s (transformer
    blocks, in most models), else the direct children that hold parameters."""
    found: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside:
            continue
        if isinstance(module, nn.ModuleList):
            found += [m for m in module if any(True for _ in m.parameters())]
            inside |= {id(m) for m in module.modules()}
    if found:
        return found
    return [c for c in model.children() if any(True for _ in c.parameters())]


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def full_norm(norm: torch.Tensor) -> torch.Tensor:
    """``clip_grad_norm_`` over DTensor gradients returns a DTensor: its value, on every rank."""
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def save(
    fs: pafs.FileSystem,
    directory: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loop_state: dict[str, Any] | None = None,
    before_manifest: Callable[[], None] = lambda: None,
) -> None:
    """Every rank calls this: each writes its shards (rank 0 also ``loop_state``, the part of
    the state that is not sharded), then rank 0 the manifest, last."""
    started = start_save(fs, directory, model, optimizer, loop_state)
    comm = Collectives(torch.device("cpu"))
    seal(fs, directory, comm, loop_state, started.entries(), before_manifest)


@dataclasses.dataclass
class Started:
    """A save under way. ``written``: the size and SHA-256 of each file this rank wrote, by path,
    filled as the files close (``dcp_storage.Files``); ``future`` (an asynchronous save) ends
    once every rank's shards and ``.metadata`` are written."""

    written: dict[str, dict[str, Any]]
    future: Future | None = None

    def wait(self) -> None:
        if self.future is not None:
            self.future.result()

    def entries(self) -> dict[str, dict[str, Any]]:
        """This rank's manifest entries, by file name (once ``wait`` returned)."""
        return {posixpath.basename(path): meta for path, meta in self.written.items()}


def start_save(
    fs: pafs.FileSystem,
    directory: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loop_state: dict[str, Any] | None,
    group: dist.ProcessGroup | None = None,
) -> Started:
    """Every rank calls this: rank 0 writes ``loop_state`` (small), every rank its shards. No
    ``group``: written when this returns (DCP's synchronous save). With one: staged (a copy of
    this rank's shards in host memory: the caller's pause) and written by a background thread
    whose collectives use ``group``, not the training thread's. ``seal`` follows either way,
    after ``Started.wait``, with ``Started.entries``."""
    writer = dcp_storage.Writer(fs, directory)
    written = writer.fs.written  # filled as DCP closes this rank's files
    if dist.get_rank() == 0 and loop_state is not None:
        buffer = io.BytesIO()
        torch.save(loop_state, buffer)
        blob = buffer.getvalue()
        path = posixpath.join(directory, LOOP_STATE_FILE)
        storage.write_bytes(fs, path, blob)
        written[path] = {"size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    with dcp_storage.storage_failures():
        if group is None:
            # DCP's save ends once .metadata is written, after every rank's shards.
            dcp.save(state, storage_writer=writer)
            return Started(written)
        future = dcp.async_save(state, storage_writer=writer, process_group=group)
        return Started(written, future)


def seal(
    fs: pafs.FileSystem,
    directory: str,
    comm: Collectives,
    loop_state: dict[str, Any] | None,
    mine: dict[str, dict[str, Any]],
    before_manifest: Callable[[], None] = lambda: None,
) -> None:
    """Every rank calls this once its shards are written, with the manifest entries of the
    files it wrote (``Started.entries``: hashed as they were written, so nothing is read
    back); rank 0 writes the manifest (last) once it has every rank's, and nobody returns
    before."""
    expected = {".metadata"} if comm.rank == 0 else set()
    if comm.rank == 0 and loop_state is not None:
        expected.add(LOOP_STATE_FILE)
    shards = [name for name in mine if name.startswith(f"__{comm.rank}_")]
    if not shards or not expected <= mine.keys():  # a manifest must list every file
        raise RuntimeError(f"rank {comm.rank} recorded no entry of some file it wrote: {mine}")
    before_manifest()
    every = comm.gather_objects(mine)
    if comm.rank == 0:
        files = {name: meta for rank_files in every for name, meta in rank_files.items()}
        manifest = {
            "format": checkpoint.FORMAT_VERSION,
            "layout": LAYOUT,
            "world_size": comm.world_size,
            "progress": (loop_state or {}).get("progress"),
            "files": files,
        }
        text = json.dumps(manifest, indent=1, sort_keys=True).encode()
        storage.write_bytes(fs, posixpath.join(directory, checkpoint.MANIFEST_FILE), text)
    comm.barrier()  # nobody treats the checkpoint as written before its manifest is


def validate(fs: pafs.FileSystem, directory: str) -> dict[str, Any]:
    """The manifest, if it is a sharded checkpoint's and every file it lists is there with its
    size; else InvalidCheckpoint. The checksums: ``corrupted_files``."""
    manifest = checkpoint.validate(fs, directory, full=False)
    if manifest.get("layout") != LAYOUT:
        raise InvalidCheckpoint(f"{directory}: not a sharded (DCP) checkpoint")
    return manifest


def corrupted_files(fs: pafs.FileSystem, directory: str, rank: int, world_size: int) -> list[str]:
    """This rank's share of the checksum check (every ``world_size``-th file of the manifest):
    the files whose SHA-256 differs from it. The ranks split the reading; the caller gathers."""
    manifest = validate(fs, directory)
    bad = []
    for name in sorted(manifest["files"])[rank::world_size]:
        try:
            checkpoint.check_file(fs, directory, name, manifest["files"][name])
        except InvalidCheckpoint:
            bad.append(name)
    return bad


def load(
    fs: pafs.FileSystem, directory: str, model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Every rank calls this, at any world size: each reads the slices its shards need.
    Returns ``loop_state`` (empty if the checkpoint has none)."""
    manifest = validate(fs, directory)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    with dcp_storage.storage_failures():
        dcp.load(state, storage_reader=dcp_storage.Reader(fs, directory))
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
    )
    if LOOP_STATE_FILE not in manifest["files"]:
        return {}
    data = storage.read_bytes(fs, posixpath.join(directory, LOOP_STATE_FILE))
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's tensors, gathered to CPU on rank 0 (empty on the others; for tests
    and small models)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, broadcast_from_rank0=False)
    return get_model_state_dict(model, options=options)
