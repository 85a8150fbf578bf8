"""Run storage through pyarrow.fs: a local/shared path or S3-compatible object storage.

Everything the project writes (checkpoints, run logs, chaos markers) goes through these few
helpers, so the same code works on a Compose volume, a Kubernetes RWX volume and S3.

Storage failures are named here, in one place: :func:`classify` turns pyarrow's OSError text
into a :class:`StorageError` whose message says which endpoint and path failed, how, and what to
check; :func:`check_reachable` asks the store once, quickly, before a run starts.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import re
import uuid
from collections.abc import Iterator

import pyarrow.fs as pafs

from training.core.config import StorageSection

# Attempts per S3 request (AWS standard strategy: exponential back-off with jitter, capped at
# 20 s). pyarrow's default, 3, gives up ~2.5 s into an outage; 6 rode out 9-21 s against a
# refused port here, long enough for a store that restarts behind its endpoint.
S3_ATTEMPTS = 6
# The pre-flight probe fails fast (under 1 s against a refused port): a wrong endpoint should
# not wait through the back-off meant for an outage.
PROBE_ATTEMPTS = 2


class S3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3FileSystem whose pickle keeps the retries: pyarrow's own pickle drops
    ``retry_strategy``, and Ray ships the run's filesystem to every worker by pickling it."""

    def __reduce__(self):
        _, (options,) = super().__reduce__()
        return _s3, (options,)


def _s3(options: dict, attempts: int = S3_ATTEMPTS) -> S3FileSystem:
    return S3FileSystem(
        **options, retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=attempts)
    )


def resolve(
    uri: str, storage: StorageSection, attempts: int = S3_ATTEMPTS
) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or an s3:// URI, with the section's S3 options."""
    if uri.startswith("s3://"):
        options = {
            "endpoint_override": storage.endpoint_override,
            "scheme": storage.scheme,
            "region": storage.region,
            "allow_bucket_creation": storage.allow_bucket_creation,
        }
        return _s3(options, attempts), uri.removeprefix("s3://").rstrip("/")
    if "://" in uri:
        # Other pyarrow URIs (gs://, hdfs://, file://) resolve with their defaults.
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


class StorageError(OSError):
    """A storage failure, classified: ``kind`` is one of KINDS, ``str()`` names the endpoint,
    the path, what happened and what to check. An OSError, so code that rides out storage
    trouble (the lease heartbeat) still catches it."""

    UNREACHABLE, TIMEOUT, OUTAGE, NO_BUCKET, DENIED = (
        "unreachable", "timeout", "outage", "no-bucket", "denied",
    )  # fmt: skip
    # The store (or the way to it) is down: retrying later can succeed as it is.
    TRANSIENT = frozenset({UNREACHABLE, TIMEOUT, OUTAGE})

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind

    def __reduce__(self):  # raised in Ray workers: must survive the trip to the driver
        return type(self), (self.kind, str(self))

    @property
    def transient(self) -> bool:
        return self.kind in self.TRANSIENT

    def describe(self) -> str:
        return str(self)


# pyarrow's S3 errors read "... AWS Error <CODE> [(HTTP status <N>)] during <Op> operation: ..."
_AWS_ERROR = re.compile(r"AWS Error (\w+)(?: \(HTTP status (\d+)\))? during (\w+) operation")
_DENIED_CODES = {
    "ACCESS_DENIED", "SIGNATURE_DOES_NOT_MATCH", "INVALID_ACCESS_KEY_ID", "INVALID_SIGNATURE",
    "INVALID_CLIENT_TOKEN_ID", "UNRECOGNIZED_CLIENT", "EXPIRED_TOKEN",
    "MISSING_AUTHENTICATION_TOKEN",
}  # fmt: skip
_OUTAGE_CODES = {"INTERNAL_FAILURE", "SERVICE_UNAVAILABLE", "SLOW_DOWN", "THROTTLING"}
# curl's codes inside NETWORK_CONNECTION errors, as the user would say them.
_CURL_REASONS = {"6": "unknown host", "7": "connection refused", "28": "timed out"}


def classify(exc: OSError, fs: pafs.FileSystem, uri: str) -> StorageError | None:
    """``exc`` as a StorageError naming ``fs``'s endpoint and ``uri``; None when it is not a
    failure of the store itself (a missing file, a corrupt one: the caller says what it means)."""
    if isinstance(exc, StorageError):
        return exc
    if not isinstance(fs, pafs.S3FileSystem):
        return None
    text, where = str(exc), f"S3 endpoint {endpoint(fs)}"
    if "To create buckets, enable" in text:  # pyarrow's own check, before any request
        return _no_bucket(fs, uri)
    match = _AWS_ERROR.search(text)
    if match is None:
        return None
    code, status, operation = match.groups()
    status = int(status or 0)
    detail = f"{code} during {operation}"
    if code == "NETWORK_CONNECTION":
        curl = re.search(r"curlCode: (\d+)", text)
        reason = _CURL_REASONS.get(curl.group(1) if curl else "", "network error")
        if reason == "timed out":
            return StorageError(
                StorageError.TIMEOUT,
                f"{where} timed out for {uri} ({detail}): check that the store is up and not "
                "overloaded, and the network path to it (storage.endpoint_override)",
            )
        return StorageError(
            StorageError.UNREACHABLE,
            f"cannot reach {where} ({reason}) for {uri}: check storage.endpoint_override / "
            "storage.scheme and that the store is up",
        )
    if code == "NO_SUCH_BUCKET":
        return _no_bucket(fs, uri)
    if code in _DENIED_CODES or status == 403:
        return StorageError(
            StorageError.DENIED,
            f"access denied to {uri} at {where} ({detail}): check the credentials "
            "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, on every node) and that they may read "
            "and write this bucket",
        )
    if code in _OUTAGE_CODES or status >= 500:
        return StorageError(
            StorageError.OUTAGE,
            f"{where} failed for {uri} ({detail}): the store is down or overloaded; check "
            "that it is up",
        )
    return None


def _no_bucket(fs: pafs.FileSystem, uri: str) -> StorageError:
    bucket = uri.removeprefix("s3://").split("/")[0]
    return StorageError(
        StorageError.NO_BUCKET,
        f"bucket '{bucket}' does not exist at S3 endpoint {endpoint(fs)} (for {uri}): create "
        "it, correct the path, or set storage.allow_bucket_creation: true",
    )


def endpoint(fs: pafs.S3FileSystem) -> str:
    """The endpoint as a URL, for messages (pyarrow exposes its options only to pickle)."""
    options = fs.__reduce__()[1][0]
    if options.get("endpoint_override"):
        return f"{options['scheme']}://{options['endpoint_override']}"
    return f"of AWS region {options.get('region') or '(default)'}"


@contextlib.contextmanager
def named_errors(fs: pafs.FileSystem, uri: str, training: bool = False) -> Iterator[None]:
    """Storage failures inside the block raised as StorageError naming ``uri``. ``training``:
    the block runs in a training attempt, where an outage is transient and Ray Train retries."""
    try:
        yield
    except OSError as exc:
        error = classify(exc, fs, uri)
        if error is None:
            raise
        if training and error.transient and error is not exc:
            error = StorageError(
                error.kind,
                f"transient storage error (outage) during training: {error}; Ray Train "
                "restarts the attempt from the newest valid checkpoint (failure.max_failures)",
            )
        raise error from exc


def check_reachable(uri: str, storage: StorageSection) -> None:
    """Ask the store once, quickly, whether ``uri``'s bucket is there and ours to use; raise a
    StorageError naming the endpoint and what to check. Local paths need no check."""
    if not uri.startswith("s3://"):
        return
    fs, path = resolve(uri, storage, attempts=PROBE_ATTEMPTS)
    bucket = path.split("/")[0]
    with named_errors(fs, uri):
        found = fs.get_file_info(bucket).type != pafs.FileType.NotFound
    if not found and not storage.allow_bucket_creation:
        raise _no_bucket(fs, uri)


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
