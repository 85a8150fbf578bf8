"""The full training state on storage, and how to tell a trustworthy checkpoint from a broken one.

A checkpoint is a directory ``checkpoint_<global step, 9 digits>`` holding ``train_state.pt``
(model unwrapped from DDP, optimizer, LR schedule, progress, resolved config) and
``manifest.json`` (size and SHA-256 of every file), written last. A directory without a
manifest, or whose files do not match it, is a partial or corrupted write: it is skipped on
resume with a warning, and cleaned up so storage does not grow without bound.

Reading a multi-GB state is the expensive part (minutes on S3), so a checkpoint's bytes are read
once per rank, where they are loaded: ``load`` checks the SHA-256 as the bytes stream in. Every
other check (the driver's ``newest_valid``, ``scan``, ``prune``, ``status``) reads manifests and
file sizes only, which catches a partial or torn write but not a same-size corruption; rank 0
resumes through ``load_newest``, which skips that too. ``validate``/``scan`` with ``full=True``
(``verify --deep``) hash every file on demand.

Ray can drop a checkpoint reported just before a crash from its registry while the files are
complete on storage. Resume therefore scans storage for the newest *valid* checkpoint instead of
trusting only the one Ray registered.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import posixpath
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.fs as pafs

from training.core import storage

if TYPE_CHECKING:  # torch is imported where a state is written or read, not at load time:
    import torch  # `status` and a checkpoint scan need none of it (a 2-3 s import)

log = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1
_DIR_PATTERN = re.compile(r"^checkpoint_(\d{9})(_[0-9a-f]+)?$")
# Ray Train's record of the checkpoints it registered (read only; Ray owns this file).
RAY_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"
_READ_CHUNK = 16 << 20  # bytes hashed per read while a file streams in


class InvalidCheckpoint(Exception):
    """A checkpoint directory that must not be loaded; the message says why."""


@dataclass(frozen=True)
class Progress:
    """Where training stands after ``global_step`` completed steps."""

    global_step: int
    epoch: int
    step_in_epoch: int  # steps of ``epoch`` already done
    attempt: str  # the attempt that wrote this state, for the sample ledger


@dataclass(frozen=True)
class CheckpointInfo:
    path: str
    step: int
    valid: bool
    reason: str = ""


def dir_name(global_step: int, attempt: str = "") -> str:
    """``checkpoint_<step>_<attempt>``: the attempt keeps a step redone after a rollback from
    reusing the directory of a checkpoint Ray still has registered."""
    return f"checkpoint_{global_step:09d}" + (f"_{attempt}" if attempt else "")


def build_state(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    progress: Progress,
    config: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The full training state (live references: stage it before training goes on). ``extra``:
    the grad scaler's and the task's registered state."""
    return {
        "format": FORMAT_VERSION,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "progress": asdict(progress),
        "config": config,
        "extra": extra or {},
    }


def write(
    directory: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    progress: Progress,
    config: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> None:
    """Write the state into a local directory in one go; the manifest goes last."""
    write_state(directory, build_state(model, optimizer, scheduler, progress, config, extra))


def write_state(
    directory: str | Path,
    state: dict[str, Any],
    fs: pafs.FileSystem | None = None,
    before_manifest: Callable[[], None] = lambda: None,
) -> None:
    """Serialise a (staged) state straight into ``directory`` on ``fs`` (local by default),
    checksumming the bytes as they stream out (no local copy, no second read); the manifest,
    which makes the checkpoint valid, goes last."""
    import torch

    fs = fs or pafs.LocalFileSystem()
    directory = str(directory)
    fs.create_dir(directory, recursive=True)
    # Buffered: torch.save writes each tensor's small record header as a write of its own.
    with fs.open_output_stream(posixpath.join(directory, STATE_FILE), buffer_size=1 << 20) as raw:
        hashed = HashingWriter(raw)
        with _without_zip_crc32():
            torch.save(state, hashed)
    before_manifest()
    files = {STATE_FILE: hashed.entry()}
    manifest = {"format": FORMAT_VERSION, "progress": state["progress"], "files": files}
    storage.write_bytes(
        fs, posixpath.join(directory, MANIFEST_FILE), json.dumps(manifest, indent=1).encode()
    )


def _without_zip_crc32() -> contextlib.AbstractContextManager:
    """torch.save's CRC32 of every record is nearly all of its own CPU time (0.2 s of a 512 MB
    state on the 2-core VM, 0.001 s without); the manifest's SHA-256 already checks every byte,
    and torch.load reads a file without the CRCs. torch's switch is process-wide while the save
    runs (a torch.save elsewhere at that moment may skip its CRCs too); older torch has none."""
    try:
        from torch.utils.serialization import config
    except ImportError:
        return contextlib.nullcontext()
    return config.patch({"save.compute_crc32": False})


class HashingWriter(io.RawIOBase):
    """A write-only file that hashes what passes through it: the file's manifest entry without
    reading it back (torch.save here; DCP's shard files in ``dcp_storage``)."""

    def __init__(self, sink: Any):
        self.sink, self.digest, self.size = sink, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.digest.update(data)
        self.size += memoryview(data).nbytes
        return self.sink.write(data)

    def tell(self) -> int:  # DCP records each item's offset in its shard file
        return self.sink.tell()

    def entry(self) -> dict[str, Any]:
        return {"size": self.size, "sha256": self.digest.hexdigest()}


def load(fs: pafs.FileSystem, path: str) -> dict[str, Any]:
    """A checkpoint's state, checked against its manifest in the one read that loads it: sizes
    first (no data read), then each file's SHA-256 as its bytes stream in, before anything is
    unpickled. Raises InvalidCheckpoint."""
    manifest = _read_manifest(fs, path)
    if STATE_FILE not in manifest["files"]:
        raise InvalidCheckpoint(f"manifest does not list {STATE_FILE}")
    _check_sizes(fs, path, manifest)
    blobs = {name: _read_checked(fs, path, name, meta) for name, meta in manifest["files"].items()}
    import torch

    try:
        return torch.load(pa.BufferReader(blobs[STATE_FILE]), map_location="cpu", weights_only=True)
    except Exception as exc:  # a checksum collision is unlikely; a pickle error is not impossible
        raise InvalidCheckpoint(f"{STATE_FILE} does not load: {exc}") from exc


def load_newest(fs: pafs.FileSystem, run_dir: str) -> tuple[CheckpointInfo, dict[str, Any]] | None:
    """Rank 0's resume: the newest checkpoint that ``load`` accepts, and its state. A broken one
    (partial, torn, wrong size or checksum) is skipped with a warning for the next older one;
    each candidate is read at most once, and one with a wrong size not at all."""
    for info in scan(fs, run_dir, check=False):
        try:
            state = load(fs, info.path)
        except InvalidCheckpoint as exc:
            log.warning("Skipping checkpoint %s: %s", info.path, exc)
            continue
        return CheckpointInfo(info.path, info.step, valid=True), state
    return None


def validate(fs: pafs.FileSystem, path: str, full: bool = True) -> dict[str, Any]:
    """The manifest, if every file it lists matches it: size and checksum (reads every byte),
    or (``full=False``) size only, which reads no data; else InvalidCheckpoint."""
    manifest = _read_manifest(fs, path)
    _check_sizes(fs, path, manifest)
    if full:
        for name, meta in manifest["files"].items():
            check_file(fs, path, name, meta)
    return manifest


def check_file(fs: pafs.FileSystem, path: str, name: str, meta: dict[str, Any]) -> None:
    """Raise InvalidCheckpoint unless file ``name`` of checkpoint ``path`` has the size and
    SHA-256 its manifest entry ``meta`` lists (read once, one chunk of memory at a time)."""
    _read_checked(fs, path, name, meta, keep=False)


def describe(fs: pafs.FileSystem, path: str) -> dict[str, Any]:
    """A file's manifest entry: its size and SHA-256, read once, a chunk at a time."""
    digest, size = hashlib.sha256(), 0
    with fs.open_input_stream(path) as stream:
        while chunk := stream.read(_READ_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": digest.hexdigest()}


def restore(
    state: dict[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> Progress:
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return Progress(**state["progress"])


def scan(
    fs: pafs.FileSystem, run_dir: str, check: bool = True, full: bool = False
) -> list[CheckpointInfo]:
    """Every checkpoint directory of a run, newest first, with its validity: from manifests and
    file sizes (no data read), or with ``full=True`` from every file's checksum too (reads every
    byte of every checkpoint: ``verify --deep``)."""
    found = []
    for entry in storage.list_dir(fs, run_dir):
        match = _DIR_PATTERN.match(entry.base_name)
        if entry.type != pafs.FileType.Directory or not match:
            continue
        found.append(_check(fs, entry.path, int(match.group(1)), check, full))
    return sorted(found, key=lambda info: info.step, reverse=True)


def newest_valid(fs: pafs.FileSystem, run_dir: str) -> CheckpointInfo | None:
    """The newest checkpoint whose manifest is readable and whose files have the sizes it lists;
    newer broken ones are skipped loudly. No data is read, so a same-size corruption passes here:
    the checksum is checked where the state is loaded (``load``, ``load_newest``)."""
    for info in scan(fs, run_dir, check=False):
        checked = _check(fs, info.path, info.step, check=True, full=False)
        if checked.valid:
            return checked
        log.warning("Skipping checkpoint %s: %s", info.path, checked.reason)
    return None


def prune(fs: pafs.FileSystem, run_dir: str, keep: int, attempt: str) -> list[str]:
    """Delete checkpoints beyond the ``keep`` newest valid ones, and broken leftovers.

    Never touched: directories Ray Train has registered (Ray deletes those itself through
    ``CheckpointConfig.num_to_keep``, and refuses to start a run whose registered checkpoints are
    gone), and directories of the running ``attempt`` (an async upload may be in flight, and Ray
    registers it later than its snapshot file shows). What is left to us are the leftovers of
    dead attempts: checkpoints Ray lost from its registry and partial uploads.
    """
    registered = ray_registered(fs, run_dir)
    if registered is None:
        return []
    # Ray writes its snapshot without a checkpoint it drops (num_to_keep) before it deletes the
    # directory: a prune in between would delete it first, and Ray's delete then fails the run
    # (FileNotFoundError in its controller). A name once seen registered is Ray's to delete.
    seen = _seen_registered.setdefault(run_dir, set())
    seen |= registered
    infos = scan(fs, run_dir, full=False)  # sizes only: cheap enough to run at every checkpoint
    kept = {i.step for i in infos if i.valid}
    kept = set(sorted(kept, reverse=True)[:keep])
    doomed = [
        i.path
        for i in infos
        if posixpath.basename(i.path) not in seen
        and not posixpath.basename(i.path).endswith(f"_{attempt}")
        and not (i.valid and i.step in kept)
    ]
    for path in doomed:
        storage.delete_dir(fs, path)
    return doomed


# Per run directory, every checkpoint name this process has seen in Ray's snapshot (see prune).
_seen_registered: dict[str, set[str]] = {}


def remember_registered(fs: pafs.FileSystem, run_dir: str) -> None:
    """Note what Ray has registered now (at an attempt's start, before Ray can drop any)."""
    _seen_registered.setdefault(run_dir, set()).update(ray_registered(fs, run_dir) or set())


def ray_registered(fs: pafs.FileSystem, run_dir: str) -> set[str] | None:
    """Directory names Ray Train's snapshot references; None if the snapshot is unreadable."""
    path = posixpath.join(run_dir, RAY_SNAPSHOT_FILE)
    if not storage.exists(fs, path):
        return set()
    try:
        snapshot = json.loads(storage.read_bytes(fs, path))
        return {r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"]}
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("Not pruning checkpoints: cannot read Ray's %s: %s", RAY_SNAPSHOT_FILE, exc)
        return None


def _check(fs: pafs.FileSystem, path: str, step: int, check: bool, full: bool) -> CheckpointInfo:
    if not check:
        return CheckpointInfo(path, step, valid=True)
    try:
        validate(fs, path, full)
    except InvalidCheckpoint as exc:
        return CheckpointInfo(path, step, valid=False, reason=str(exc))
    return CheckpointInfo(path, step, valid=True)


def _read_manifest(fs: pafs.FileSystem, path: str) -> dict[str, Any]:
    manifest_path = posixpath.join(path, MANIFEST_FILE)
    try:
        manifest = json.loads(storage.read_bytes(fs, manifest_path))
    except FileNotFoundError:
        raise InvalidCheckpoint("no manifest (partial write)") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidCheckpoint(f"manifest is not valid JSON: {exc}") from None
    if manifest.get("format") != FORMAT_VERSION or not isinstance(manifest.get("files"), dict):
        raise InvalidCheckpoint(f"manifest has unknown format {manifest.get('format')!r}")
    return manifest


def _check_sizes(fs: pafs.FileSystem, path: str, manifest: dict[str, Any]) -> None:
    for name, meta in manifest["files"].items():
        info = fs.get_file_info(posixpath.join(path, name))
        if info.type == pafs.FileType.NotFound:
            raise InvalidCheckpoint(f"{name} is missing")
        expected = meta.get("size")
        if info.size != expected:
            raise InvalidCheckpoint(f"{name} has {info.size} bytes, manifest says {expected}")


def _read_checked(
    fs: pafs.FileSystem, path: str, name: str, meta: dict[str, Any], keep: bool = True
) -> pa.Buffer | None:
    """Read a file of the size its manifest lists (checked before) once, hashing it as it
    streams in; its bytes (``keep``), or None after a check only (one chunk of memory)."""
    size = meta["size"]
    whole = pa.allocate_buffer(size) if keep else None
    target = memoryview(whole) if keep else memoryview(bytearray(min(size, _READ_CHUNK)))
    digest, done, longer = hashlib.sha256(), 0, False
    try:
        with fs.open_input_stream(posixpath.join(path, name)) as stream:
            while done < size:
                start = done if keep else 0
                window = target[start : start + min(_READ_CHUNK, size - done)]
                got = stream.readinto(window)
                if not got:
                    break
                digest.update(window[:got])
                done += got
            longer = bool(stream.read(1))
    except FileNotFoundError:
        raise InvalidCheckpoint(f"{name} is missing") from None
    if done != size or longer:
        raise InvalidCheckpoint(f"{name} changed size while read, manifest says {size}")
    if digest.hexdigest() != meta.get("sha256"):
        raise InvalidCheckpoint(f"{name} checksum does not match the manifest")
    return whole
