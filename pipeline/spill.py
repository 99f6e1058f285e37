"""Spills: rows that a run must see again later (the scan's output, the plan, the staged rejects)
written to local Parquet as they come and read back block by block, so no process holds them all.
``Partitioned`` routes rows into ``n`` spills by a stable hash of a key column: rows that must meet
(an input id and its stored lineage, the rows sharing a content hash) land in the same part, and
each part is small enough to work on in memory. pyarrow writes and reads; only the routing is here."""
from __future__ import annotations

import ctypes
import ctypes.util
from pathlib import Path
from typing import Callable, Iterator

import mmh3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from core.store import RowGroups

GROUP_ROWS = 4096   # rows per Parquet row group of a spill


def bucket_of(keys: list[str], n: int) -> np.ndarray:
    """Stable bucket per key (murmur3, the same in every process and run)."""
    return np.fromiter((mmh3.hash(k, signed=False) for k in keys), dtype=np.uint32, count=len(keys)) % n


def in_sorted(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """``np.isin`` against a sorted array without sorting it again (``np.isin`` sorts both sides
    on every call: tens of MB per call against millions of ids)."""
    if not len(sorted_set):
        return np.zeros(len(values), bool)
    at = np.minimum(np.searchsorted(sorted_set, values), len(sorted_set) - 1)
    return sorted_set[at] == values


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


_LIBC = _libc()


def release_free_heap() -> None:
    """Hand the C heap's free pages back to the OS (glibc's ``malloc_trim``; elsewhere nothing).
    Row dicts freed after each plan bucket stay in the process's heap otherwise: at 3M rows the
    driver's heap held 360 MB after planning, 31 MB after a trim (RESULTS.md)."""
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)


def key_hashes(keys: list[str] | pa.Array) -> np.ndarray:
    """64-bit hashes of ids: a compact set of ids (8 bytes each) for membership tests."""
    values = keys.to_pylist() if isinstance(keys, (pa.Array, pa.ChunkedArray)) else keys
    return np.fromiter((mmh3.hash64(k, signed=False)[0] for k in values), dtype=np.uint64, count=len(values))


class Spill:
    """Rows written to Parquet in row groups as they arrive; read back as record batches. Rows
    added after a read go to a further file (a spill can be read, then added to, then read again)."""

    def __init__(self, path: Path, schema: pa.Schema, group_rows: int = GROUP_ROWS):
        self.path, self.schema, self.group_rows = path, schema, group_rows
        self.rows = 0
        self.files: list[Path] = []
        self._groups = RowGroups(schema, group_rows)
        self._writer: pq.ParquetWriter | None = None

    def add_rows(self, rows: list[dict]) -> None:
        if rows:
            self.add(pa.Table.from_pylist(rows, schema=self.schema))

    def add(self, table: pa.Table | pa.RecordBatch) -> None:
        self.rows += table.num_rows
        for group in self._groups.add(table):
            self._write(group)

    def _write(self, group: pa.Table) -> None:
        if self._writer is None:
            path = self.path if not self.files else self.path.with_name(f"{self.path.stem}-{len(self.files)}{self.path.suffix}")
            path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = self._open(path)
            self.files.append(path)
        self._writer.write_table(group, group.num_rows)   # one row group (or record batch) per group

    def _open(self, path: Path):
        # written once and read once, on local disk: no dictionaries or statistics, light compression
        return pq.ParquetWriter(path, self.schema, use_dictionary=False, compression="lz4", write_statistics=False)

    def close(self) -> "Spill":
        for group in self._groups.drain():
            self._write(group)
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        return self

    def groups(self) -> list[tuple[str, int]]:
        """(path, row group) of every row group: what a worker reads to get one block."""
        self.close()
        return [(str(p), g) for p in self.files for g in range(pq.ParquetFile(p).num_row_groups)]

    def batches(self, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        """The rows added so far, one row group at a time."""
        self.close()
        for path in self.files:
            f = pq.ParquetFile(path)
            for group in range(f.num_row_groups):
                yield from f.read_row_group(group, columns=columns).to_batches()

    def table(self, columns: list[str] | None = None) -> pa.Table:
        """All rows at once: only for a spill known to be small (one bucket, the changed ids)."""
        schema = pa.schema([self.schema.field(c) for c in columns]) if columns else self.schema
        return pa.Table.from_batches(list(self.batches(columns)), schema=schema)

    def dicts(self) -> Iterator[dict]:
        for batch in self.batches():
            yield from batch.to_pylist()


class _IpcSpill(Spill):
    """A spill in Arrow's IPC file format: for the planner's partitions, written and read once in
    this process (no encoding: a fifth of Parquet's time here, twice its size on disk)."""

    def _open(self, path: Path):
        return pa.ipc.new_file(str(path), self.schema)

    def groups(self) -> list[tuple[str, int]]:
        raise TypeError("an IPC spill is read in this process only (batches, table)")

    def batches(self, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        self.close()
        for path in self.files:
            with pa.OSFile(str(path)) as source:
                reader = pa.ipc.open_file(source)
                for k in range(reader.num_record_batches):
                    batch = reader.get_batch(k)
                    yield batch.select(columns) if columns else batch


class Partitioned:
    """Rows routed into ``n`` spills by the stable hash of ``key(values)`` of column ``column``
    (``key`` maps the column's Arrow array to the strings hashed)."""

    def __init__(self, folder: Path, schema: pa.Schema, n: int, column: str,
                 key: Callable[[pa.Array], pa.Array] = lambda values: values):
        self.n, self.column, self.key = n, column, key
        # Fewer rows per row group when there are many parts: the buffers stay ~GROUP_ROWS rows in all.
        group = max(256, GROUP_ROWS * 4 // max(1, n))
        self.parts = [_IpcSpill(folder / f"part-{k:05d}.arrow", schema, group) for k in range(n)]

    def add(self, table: pa.Table | pa.RecordBatch) -> None:
        if table.num_rows == 0:
            return
        if self.n == 1:
            self.parts[0].add(table)
            return
        buckets = bucket_of(self.key(table.column(self.column)).to_pylist(), self.n)
        order = np.argsort(buckets, kind="stable")
        sorted_buckets = buckets[order]
        bounds = np.searchsorted(sorted_buckets, np.arange(self.n + 1))
        taken = table.take(pa.array(order))
        for k in range(self.n):
            lo, hi = bounds[k], bounds[k + 1]
            if hi > lo:
                self.parts[k].add(taken.slice(lo, hi - lo))

    def close(self) -> "Partitioned":
        for part in self.parts:
            part.close()
        return self

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.parts)

