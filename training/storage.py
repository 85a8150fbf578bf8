"""Run storage through pyarrow.fs: a local/shared path or S3-compatible object storage.

Everything the project writes (checkpoints, run logs, chaos markers) goes through these few
helpers, so the same code works on a Compose volume, a Kubernetes RWX volume and S3.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import uuid

import pyarrow.fs as pafs

from training.config import StorageSection


def resolve(uri: str, storage: StorageSection) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or an s3:// URI, with the section's S3 options."""
    if uri.startswith("s3://"):
        fs = pafs.S3FileSystem(
            endpoint_override=storage.endpoint_override,
            scheme=storage.scheme,
            region=storage.region,
            allow_bucket_creation=storage.allow_bucket_creation,
        )
        return fs, uri.removeprefix("s3://").rstrip("/")
    if "://" in uri:
        # Other pyarrow URIs (gs://, hdfs://, file://) resolve with their defaults.
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def absolute(uri: str) -> str:
    """A local path made absolute (workers run in other directories); URIs unchanged."""
    return uri if "://" in uri else os.path.abspath(os.path.expanduser(uri))


def run_location(storage: StorageSection, run_name: str) -> tuple[pafs.FileSystem, str]:
    """Filesystem and directory of one run: ``<storage.path>/<run.name>``."""
    fs, root = resolve(storage.path, storage)
    return fs, posixpath.join(root, run_name)


def display(fs: pafs.FileSystem, path: str) -> str:
    """A path as the user wrote it: object-store paths get their scheme back."""
    return f"s3://{path}" if isinstance(fs, pafs.S3FileSystem) else path


def is_local(fs: pafs.FileSystem) -> bool:
    return isinstance(fs, pafs.LocalFileSystem)


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as stream:
        return stream.read()


def write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write a whole file so readers never see a partial one.

    Object stores publish an object only when the upload completes; on a local or shared
    filesystem we write a temp file and rename it over the target.
    """
    fs.create_dir(posixpath.dirname(path), recursive=True)
    target = f"{path}.tmp-{uuid.uuid4().hex[:8]}" if is_local(fs) else path
    with fs.open_output_stream(target) as stream:
        stream.write(data)
    if target != path:
        fs.move(target, path)


def list_dir(fs: pafs.FileSystem, path: str) -> list[pafs.FileInfo]:
    """Direct children of ``path``; empty if it does not exist."""
    return fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))


def delete_dir(fs: pafs.FileSystem, path: str) -> None:
    """Delete a directory tree; already gone is fine (two cleaners may race)."""
    with contextlib.suppress(FileNotFoundError):
        fs.delete_dir(path)
