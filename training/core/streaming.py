"""Streaming Parquet reads: a table larger than memory, read one row group at a time.

The framework owns the order (``training.core.data.shard_order``: row groups permuted per epoch,
samples shuffled within windows of row groups); this module only reads. Once per attempt the
loop hands the samples the ids this rank will use at every coming step (``Task.prefetch``). A
background thread walks that plan, decodes each row group a planned step needs before the step
runs (I/O and decoding overlap training), and drops a row group as soon as no planned step
still needs it. It plans ahead only while the row groups held stay within ``max_resident``
(two windows: the one being trained on and the next), so a worker's memory is bounded by the
window, not by the dataset, and a restarted worker reads only what its next steps need.

Correctness never depends on the plan: ids nobody planned for (evaluation, the contract
checker) are read synchronously through a small cache.
"""

from __future__ import annotations

import logging
import resource
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from training.core import storage

log = logging.getLogger(__name__)

# Decodes one row group (an Arrow table of the needed columns) into arrays with one row per
# sample, e.g. (features float32 [rows, F], labels int64 [rows]).
Decoder = Callable[[pa.Table], tuple[np.ndarray, ...]]
UNPLANNED_CACHE = 2  # row groups kept for unplanned reads (evaluation reads val in order)


@dataclass(frozen=True)
class RowGroup:
    """The rows of one Parquet row group that belong to a split (train or val)."""

    file: str
    index: int  # row group number inside the file
    skip: int  # leading rows of the row group outside the split
    rows: int  # rows inside the split


def row_groups(fs: pafs.FileSystem, files: list[str]) -> list[tuple[str, int, int]]:
    """(file, row group number, rows) of every row group, in the dataset's row order; reads
    only the files' footers."""
    groups = []
    for path in files:
        with fs.open_input_file(path) as handle:
            meta = pq.ParquetFile(handle).metadata
        groups += [(path, i, meta.row_group(i).num_rows) for i in range(meta.num_row_groups)]
    return groups


def split_row_groups(groups: list[tuple[str, int, int]], begin: int, end: int) -> list[RowGroup]:
    """The row groups covering dataset rows [begin, end), clipped to that range."""
    clipped, first = [], 0
    for path, index, rows in groups:
        lo, hi = max(begin, first), min(end, first + rows)
        if lo < hi:
            clipped.append(RowGroup(path, index, lo - first, hi - lo))
        first += rows
    return clipped


@dataclass
class ReadStats:
    """What the reader did in this attempt; logged when the plan is done."""

    row_groups_read: int = 0
    bytes_decoded: int = 0
    peak_resident: int = 0
    read_s: float = 0.0
    waited_s: float = 0.0  # time steps spent waiting for a row group: I/O not hidden
    started: float = field(default_factory=time.perf_counter)


@dataclass
class _Step:
    ids: int  # ids this rank consumes at the step
    groups: list[int]


class StreamingRows:
    """Samples of one split, addressed by id (0..len-1 in dataset row order), read by row group.

    ``gather(ids)`` returns the decoded arrays of those rows; ``plan(upcoming)`` starts the
    background prefetch for the steps to come (one id tensor per step, in order)."""

    def __init__(
        self,
        fs: pafs.FileSystem,
        groups: list[RowGroup],
        columns: list[str],
        decode: Decoder,
        max_resident: int,
    ):
        self.fs, self.groups, self.columns, self.decode = fs, groups, columns, decode
        self.max_resident = max_resident
        self.starts = np.cumsum([0] + [g.rows for g in groups])
        self.stats = ReadStats()
        self._cond = threading.Condition()
        self._resident: dict[int, tuple[np.ndarray, ...]] = {}
        self._needed: Counter[int] = Counter()  # row group -> planned steps still needing it
        self._steps: deque[_Step] = deque()
        self._consumed = 0  # ids of the oldest planned step already gathered
        self._unplanned: OrderedDict[int, tuple[np.ndarray, ...]] = OrderedDict()
        self._handles = threading.local()  # one open Parquet file per file and thread
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._stop = False
        self._plan_exhausted = False  # every planned step registered: log when all consumed

    def __len__(self) -> int:
        return int(self.starts[-1])

    def shard_sizes(self) -> tuple[int, ...]:
        return tuple(g.rows for g in self.groups)

    def groups_of(self, ids: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.starts, ids, side="right") - 1

    # ---- the plan (background thread) ---------------------------------------------------
    def plan(self, upcoming: Iterator[torch.Tensor]) -> None:
        """Prefetch, in the background, the row groups of each step in ``upcoming``."""
        self.close()
        with self._cond:
            self._stop, self._error = False, None
            self._steps.clear()
            self._needed.clear()
            self._resident.clear()
            self._consumed = 0
            self._plan_exhausted = False
            self.stats = ReadStats()
        self._thread = threading.Thread(
            target=self._prefetch, args=(upcoming,), name="parquet-prefetch", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            with self._cond:
                self._stop = True
                self._cond.notify_all()
            self._thread.join()
            self._thread = None

    def _prefetch(self, upcoming: Iterator[torch.Tensor]) -> None:
        try:
            for ids in upcoming:
                groups = np.unique(self.groups_of(ids.numpy())).tolist()
                if not self._register(_Step(len(ids), groups)):
                    return
                for group in groups:
                    self._load_planned(group)
            with self._cond:
                self._plan_exhausted = True
                self._cond.notify_all()
        except BaseException as exc:  # surfaced to the training thread at its next gather
            with self._cond:
                self._error = exc
                self._cond.notify_all()

    def _register(self, step: _Step) -> bool:
        """Wait until the step's row groups fit the budget (always true with nothing planned,
        so one step wider than the budget cannot deadlock); False when stopped."""
        with self._cond:
            while True:
                # Row groups no planned step needs are dropped here, not when the training
                # thread finishes with them: the next step may need them again.
                keep = set(self._needed) | set(step.groups)
                for group in set(self._resident) - keep:
                    del self._resident[group]
                if self._stop or not self._steps or len(keep) <= self.max_resident:
                    break
                self._cond.wait()
            if self._stop:
                return False
            self._steps.append(step)
            self._needed.update(step.groups)
            # A training thread may wait for this step to be planned (``_behind``), and its row
            # groups may all be resident already, so no read would wake it.
            self._cond.notify_all()
            self.stats.peak_resident = max(self.stats.peak_resident, len(self._needed))
            return True

    def _load_planned(self, group: int) -> None:
        with self._cond:
            if group in self._resident or group not in self._needed:
                return
        arrays = self._read(group)
        with self._cond:
            if group in self._needed:  # not consumed meanwhile by a synchronous read
                self._resident[group] = arrays
            self._cond.notify_all()

    # ---- reads ------------------------------------------------------------------------
    def _read(self, group: int) -> tuple[np.ndarray, ...]:
        started = time.perf_counter()
        spec = self.groups[group]
        # One decoding thread: the training thread keeps the other cores, and Arrow holds one
        # column's buffers at a time, not one per core.
        # A storage failure mid-run is named as one (transient), not as a bad Parquet file.
        with storage.named_errors(self.fs, storage.display(self.fs, spec.file), training=True):
            table = self._file(spec.file).read_row_group(
                spec.index, columns=self.columns, use_threads=False
            )
        arrays = self.decode(table.slice(spec.skip, spec.rows))
        self.stats.row_groups_read += 1
        self.stats.bytes_decoded += sum(a.nbytes for a in arrays)
        self.stats.read_s += time.perf_counter() - started
        return arrays

    def _file(self, path: str) -> pq.ParquetFile:
        files = self._handles.__dict__.setdefault("files", {})
        if path not in files:
            # From an object store, one coalesced ranged read per row group rather than one
            # request per column chunk.
            remote = not isinstance(self.fs, pafs.LocalFileSystem)
            files[path] = pq.ParquetFile(self.fs.open_input_file(path), pre_buffer=remote)
        return files[path]

    # ---- the training thread ------------------------------------------------------------
    def gather(self, ids: torch.Tensor) -> tuple[np.ndarray, ...]:
        """The decoded rows of ``ids``, in the order of ``ids``."""
        ids_np = ids.numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
        which = self.groups_of(ids_np)
        local = ids_np - self.starts[which]
        out: list[np.ndarray] | None = None
        for group in np.unique(which).tolist():
            arrays = self._planned(group) or self._unplanned_read(group)
            if out is None:
                out = [np.empty((len(ids_np), *a.shape[1:]), a.dtype) for a in arrays]
            mask = which == group
            for target, source in zip(out, arrays, strict=True):
                target[mask] = source[local[mask]]
        self._consumed_ids(len(ids_np))
        return tuple(out or ())

    def _planned(self, group: int) -> tuple[np.ndarray, ...] | None:
        """A planned row group, waiting for the prefetcher if it is still being read."""
        with self._cond:
            waited = time.perf_counter()
            while self._error is None and (
                self._behind() or (group in self._needed and group not in self._resident)
            ):
                self._cond.wait()
            self.stats.waited_s += time.perf_counter() - waited
            if self._error is not None:
                raise RuntimeError(f"Parquet prefetch failed: {self._error}") from self._error
            return self._resident.get(group)

    def _behind(self) -> bool:
        """The prefetcher has not yet planned the step being consumed (it starts there)."""
        planning = self._thread is not None and not self._stop and not self._plan_exhausted
        return planning and not self._steps

    def _unplanned_read(self, group: int) -> tuple[np.ndarray, ...]:
        if group not in self._unplanned:
            self._unplanned[group] = self._read(group)
            while len(self._unplanned) > UNPLANNED_CACHE:
                self._unplanned.popitem(last=False)
        self._unplanned.move_to_end(group)
        return self._unplanned[group]

    def _consumed_ids(self, count: int) -> None:
        """Advance through the plan, freeing budget for the prefetcher."""
        with self._cond:
            if not self._steps:
                return
            self._consumed += count
            while self._steps and self._consumed >= self._steps[0].ids:
                step = self._steps.popleft()
                self._consumed -= step.ids
                self._needed.subtract(step.groups)
                for group in step.groups:
                    if self._needed[group] <= 0:
                        del self._needed[group]
            self._cond.notify_all()
            finished = self._plan_exhausted and not self._steps
            self._plan_exhausted &= not finished  # log once
        if finished:
            self.log_summary()

    def log_summary(self) -> None:
        s = self.stats
        log.info(
            "streaming: read %d row groups (%.0f MB decoded) in %.1f s, at most %d resident "
            "(limit %d), steps waited %.2f s for data, peak RSS %.0f MB",
            s.row_groups_read,
            s.bytes_decoded / 2**20,
            s.read_s,
            s.peak_resident,
            self.max_resident,
            s.waited_s,
            peak_rss_mb(),
        )


def peak_rss_mb() -> float:
    """This process's peak resident set size (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
