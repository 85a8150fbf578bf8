"""A local pyarrow filesystem that records what passes through it: bytes read per file, and the
order in which files are written (each output stream's open and close, each move)."""

from __future__ import annotations

import collections
import posixpath

import pyarrow as pa
import pyarrow.fs as pafs


class _Counted:
    """A Python file that adds what is read from it to ``counts[path]``, and notes its close."""

    def __init__(self, raw, path: str, handler: RecordingHandler):
        self.raw, self.path, self.handler = raw, path, handler

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.handler.bytes_read[self.path] += len(data)
        return data

    def write(self, data) -> int:
        self.raw.write(data)
        return len(data)

    def close(self) -> None:
        if self.raw.writable():
            self.handler.writes.append(("closed", posixpath.basename(self.path)))
        self.raw.close()

    def __getattr__(self, name):
        return getattr(self.raw, name)


class RecordingHandler(pafs.FileSystemHandler):
    def __init__(self) -> None:
        self.local = pafs.LocalFileSystem()
        self.bytes_read: collections.Counter[str] = collections.Counter()
        self.writes: list[tuple[str, str]] = []

    def read_of(self, name: str) -> int:
        """Bytes read from files called ``name``, wherever they are."""
        return sum(n for path, n in self.bytes_read.items() if posixpath.basename(path) == name)

    def _reader(self, path: str) -> pa.PythonFile:
        return pa.PythonFile(_Counted(self.local.open_input_file(path), path, self), mode="r")

    def open_input_stream(self, path):
        return self._reader(path)

    def open_input_file(self, path):
        return self._reader(path)

    def open_output_stream(self, path, metadata):
        self.writes.append(("opened", posixpath.basename(path)))
        return pa.PythonFile(_Counted(self.local.open_output_stream(path), path, self), mode="w")

    def move(self, src, dest):
        self.writes.append(("moved", posixpath.basename(dest)))
        self.local.move(src, dest)

    def open_append_stream(self, path, metadata):
        raise NotImplementedError

    def get_type_name(self):
        return "recording"

    def normalize_path(self, path):
        return self.local.normalize_path(path)

    def equals(self, other):
        return self is other

    def get_file_info(self, paths):
        return self.local.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.local.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.local.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.local.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.local.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        raise NotImplementedError

    def delete_file(self, path):
        self.local.delete_file(path)

    def copy_file(self, src, dest):
        self.local.copy_file(src, dest)


def recording_fs() -> tuple[pafs.PyFileSystem, RecordingHandler]:
    handler = RecordingHandler()
    return pafs.PyFileSystem(handler), handler
