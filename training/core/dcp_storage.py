"""Distributed Checkpoint (DCP) files through ``pyarrow.fs``: a local or shared path and S3 alike.

torch's ``FileSystemWriter`` and ``FileSystemReader`` do all their file I/O through a
``FileSystemBase`` (open a stream, join paths, rename, make a directory, test, delete). ``Files``
is one over any ``pyarrow.fs.FileSystem``, so sharded checkpoints take the road every other file
of a run takes (``training/core/storage.py``), one code path for every store. ``Writer`` and
``Reader`` are torch's pair with it swapped in (as torch's own fsspec pair does); ``Writer`` is
still an ``AsyncStager``, so ``dcp.async_save`` stages and writes in its thread as before.

Where a store is not a disk:

- **No rename on S3.** DCP writes ``.metadata`` under a temporary name and renames it. pyarrow's
  ``move`` on S3 is a server-side copy and a delete: the copy appears whole or not at all (an S3
  object is published when its upload completes), so nobody reads a partial ``.metadata``; a
  crash between the two leaves a stray ``.metadata.tmp`` that no manifest lists. What makes a
  checkpoint valid is the manifest, written by rank 0 after every file (``worker/sharded.py``).
- **No file descriptor.** DCP's ``sync_files`` calls ``os.fsync`` on the stream's descriptor and,
  without one (pyarrow's streams), ``os.sync()`` of the whole host; it is off here, as the DDP
  checkpoints never fsync either.
- **No read-back.** A manifest lists each file's size and SHA-256: ``Files`` hashes what DCP
  writes as it streams out (``Files.written``), so sealing a checkpoint reads nothing back (on
  S3 that was a download of the whole checkpoint, at every checkpoint).
- **Small reads are requests.** DCP hands ``torch.load`` a view of the shard file, and each of its
  many small reads would be an HTTP request on S3; ``Reader`` reads each item's bytes in one
  ranged read instead.
- **Errors.** A failure of the store (unreachable, denied, outage, no bucket) is raised as the
  project's ``StorageError`` naming the endpoint and the file (``storage.named_errors``); DCP
  gathers every rank's failure into a ``CheckpointException``, which ``storage_failures``
  unwraps again.
"""

from __future__ import annotations

import contextlib
import io
import os
import posixpath
from collections.abc import Iterator
from typing import Any

import pyarrow.fs as pafs
from torch.distributed.checkpoint import CheckpointException, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystemBase

from training.core import checkpoint, storage

# torch.save writes a tensor's record headers as writes of their own: buffer them.
_WRITE_BUFFER = 1 << 20


class Files(FileSystemBase):
    """DCP's file operations on one ``pyarrow.fs`` filesystem; paths are that filesystem's
    (``bucket/key`` on S3, absolute on a local one). ``written``: the size and SHA-256 of each
    file written through it, by path, once the file is closed (a rename moves its entry)."""

    def __init__(self, fs: pafs.FileSystem):
        self.fs = fs
        self.written: dict[str, dict[str, Any]] = {}

    @contextlib.contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[Any]:
        path = os.fspath(path)
        with self._named(path):
            if "r" in mode:  # seekable: DCP reads slices of a shard file
                with self.fs.open_input_file(path) as stream:
                    yield stream
                return
            # Errors while DCP writes or reads a stream are the store's too.
            with self.fs.open_output_stream(path, buffer_size=_WRITE_BUFFER) as stream:
                hashing = checkpoint.HashingWriter(stream)
                yield hashing
            self.written[path] = hashing.entry()

    def concat_path(self, path: str | os.PathLike, suffix: str) -> str:
        return posixpath.join(os.fspath(path), suffix)

    def init_path(self, path: str | os.PathLike) -> str:
        return os.fspath(path)

    def rename(self, path: str | os.PathLike, new_path: str | os.PathLike) -> None:
        with self._named(os.fspath(new_path)):
            self.fs.move(os.fspath(path), os.fspath(new_path))
        if os.fspath(path) in self.written:
            self.written[os.fspath(new_path)] = self.written.pop(os.fspath(path))

    def mkdir(self, path: str | os.PathLike) -> None:
        with self._named(os.fspath(path)):
            self.fs.create_dir(os.fspath(path), recursive=True)

    def exists(self, path: str | os.PathLike) -> bool:
        with self._named(os.fspath(path)):
            return storage.exists(self.fs, os.fspath(path))

    def rm_file(self, path: str | os.PathLike) -> None:
        with self._named(os.fspath(path)):
            self.fs.delete_file(os.fspath(path))

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        # A path alone does not say which filesystem it is on: DCP never picks this layer by
        # itself; the caller passes a Writer or Reader.
        return False

    def _named(self, path: str) -> contextlib.AbstractContextManager:
        return storage.named_errors(self.fs, storage.display(self.fs, path), training=True)


class Writer(FileSystemWriter):
    """DCP's writer into ``path`` on ``fs``: one file per rank (``__<rank>_0.distcp``), and the
    coordinator's ``.metadata``."""

    def __init__(self, fs: pafs.FileSystem, path: str):
        super().__init__(path, sync_files=False)  # no descriptor to fsync (module docstring)
        self.fs = Files(fs)
        self.path = self.fs.init_path(path)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return Files.validate_checkpoint_id(checkpoint_id)


class Reader(FileSystemReader):
    """DCP's reader of the checkpoint at ``path`` on ``fs``."""

    def __init__(self, fs: pafs.FileSystem, path: str):
        super().__init__(path)
        self.fs = Files(fs)
        self.path = self.fs.init_path(path)

    def _slice_file(self, file: Any, sinfo: Any) -> io.BytesIO:
        # One ranged read of the item (torch.load's small reads on the stream would each be
        # a request to an object store); the item is loaded whole anyway.
        return io.BytesIO(file.read_at(sinfo.length, sinfo.offset))

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return Files.validate_checkpoint_id(checkpoint_id)


@contextlib.contextmanager
def storage_failures() -> Iterator[None]:
    """Around a DCP save or load (or the wait for an async one): a storage failure of any rank
    is raised as its ``StorageError``, any other as a ``RuntimeError`` naming the ranks and the
    first failure. DCP raises a ``CheckpointException`` listing every rank's failure, a
    ``BaseException`` that handlers of ``Exception`` miss and whose text is a page of
    tracebacks; the attempt should fail naming the store, as other storage failures do."""
    try:
        yield
    except CheckpointException as exc:
        failures = [error for error, _ in exc.failures.values()]
        named = [e for e in failures if isinstance(e, storage.StorageError)]
        if named:
            raise named[0] from exc
        # Any other failure as an Exception too: the attempt's failure handling (the wait for
        # a seal in flight, the save on failure) and Ray's retry catch Exception, not this.
        first = str(failures[0]).splitlines()[0] if failures else exc
        raise RuntimeError(f"DCP failed on rank(s) {sorted(exc.failures)}: {first}") from exc
