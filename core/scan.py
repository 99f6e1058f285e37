"""A Delta snapshot's rows read through pyarrow: its data files, less the rows their deletion vectors
mark deleted. Every reader of the store's tables goes through ``TableScan`` (or ``ray_read`` for
Ray Data), so a file that carries a deletion vector is never read whole by mistake."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from deltalake import DeltaTable

from core.deletion import deleted_rows, live, relative


@dataclass(frozen=True)
class StoredFile:
    path: str                      # on the store's filesystem
    deleted: np.ndarray | None     # sorted positions of the rows a deletion vector marks (None: none)


def filter_fields(filter: pc.Expression | None, schema: pa.Schema) -> list[str]:
    """The columns a filter may name (pyarrow exposes no list of an expression's fields; its text
    names them, so this is a superset: a value that equals a column name only reads one more)."""
    if filter is None:
        return []
    words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", str(filter)))
    return [n for n in schema.names if n in words]


class TableScan:
    """One version of a table. Files without a deletion vector are read as one pyarrow dataset;
    each file with one is read in order, batch by batch, its deleted rows dropped."""

    def __init__(self, dt: DeltaTable, fs: pafs.FileSystem, schema: pa.Schema):
        deleted = deleted_rows(dt)
        self.fs, self.schema = fs, schema
        self.files = [StoredFile(_fs_path(u), deleted.get(relative(dt, u))) for u in dt.file_uris()]
        self._plain = pads.dataset([f.path for f in self.files if f.deleted is None], schema=schema,
                                   filesystem=fs, format="parquet")

    @property
    def masked(self) -> list[StoredFile]:
        return [f for f in self.files if f.deleted is not None]

    def to_batches(self, columns: list[str] | None = None, filter: pc.Expression | None = None,
                   batch_size: int = 4096, files: set[str] | None = None, **scan) -> Iterator[pa.RecordBatch]:
        """The live rows (of ``files`` only, when given), ``scan`` passed to pyarrow's scanner."""
        plain = self._plain if files is None else self._subset(files)
        yield from plain.to_batches(columns=columns, filter=filter, batch_size=batch_size, **scan)
        for f in self.masked:
            if files is None or f.path in files:
                yield from self.file_batches(f, columns, filter, batch_size)

    def to_table(self, columns: list[str] | None = None, filter: pc.Expression | None = None) -> pa.Table:
        names = columns if columns is not None else self.schema.names
        schema = pa.schema([self.schema.field(c) for c in names])
        parts = [self._plain.to_table(columns=columns, filter=filter)]
        parts += [pa.Table.from_batches(list(self.file_batches(f, columns, filter)), schema=schema) for f in self.masked]
        return pa.concat_tables(parts)

    def count_rows(self, filter: pc.Expression | None = None) -> int:
        n = self._plain.count_rows(filter=filter)
        key = filter_fields(filter, self.schema)[:1] or [self.schema.names[0]]
        return n + sum(b.num_rows for f in self.masked for b in self.file_batches(f, key, filter))

    def file_batches(self, f: StoredFile, columns: list[str] | None, filter: pc.Expression | None = None,
                     batch_size: int = 4096) -> Iterator[pa.RecordBatch]:
        """One file's live rows in file order (a missing column, from before it existed: nulls)."""
        names = columns if columns is not None else self.schema.names
        read = list(dict.fromkeys([*names, *filter_fields(filter, self.schema)]))
        schema = pa.schema([self.schema.field(c) for c in read])
        start = 0
        with self.fs.open_input_file(f.path) as handle:
            pf = pq.ParquetFile(handle, pre_buffer=False, buffer_size=1 << 20)
            have = set(pf.schema_arrow.names)
            for batch in pf.iter_batches(batch_size=batch_size, columns=[c for c in read if c in have]):
                n = batch.num_rows
                cols = [batch.column(c).cast(t.type) if c in have else pa.nulls(n, t.type) for c, t in zip(read, schema)]
                table = pa.Table.from_batches([pa.RecordBatch.from_arrays(cols, schema=schema)])
                keep = live(f.deleted, start, n)
                start += n
                if keep is not None:
                    table = table.filter(pa.array(keep))
                if filter is not None:
                    table = table.filter(filter)
                yield from table.select(names).to_batches()

    def _subset(self, files: set[str]) -> pads.Dataset:
        return pads.dataset([f.path for f in self.files if f.deleted is None and f.path in files], schema=self.schema,
                            filesystem=self.fs, format="parquet")


def _fs_path(uri: str) -> str:
    return uri.split("://", 1)[1] if "://" in uri else uri


# -- Ray Data ----------------------------------------------------------------------------------------

def ray_read(scan: TableScan, columns: list[str], block_bytes: int, **read_args):
    """The snapshot as a Ray Dataset: one read task per ``block_bytes`` of stored row groups (never
    across files), each applying its file's deletion vector. Ray's ``read_delta`` goes through
    ``to_pyarrow_dataset``, which refuses tables with deletion vectors. As many output blocks as
    read tasks: Ray would otherwise split the blocks, and a split read does not fuse with the map
    after it."""
    import ray.data

    chunks = _chunks(scan, block_bytes)
    return ray.data.read_datasource(_datasource(scan, chunks, columns), override_num_blocks=max(1, len(chunks)),
                                    **read_args)


def _chunks(scan: TableScan, block_bytes: int) -> list[tuple[StoredFile, list[int], int, int]]:
    """(file, row groups, first row, rows) per read task."""
    out = []
    for f in scan.files:
        with scan.fs.open_input_file(f.path) as handle:
            meta = pq.ParquetFile(handle).metadata
        groups, start, size, first = [], 0, 0, 0
        for g in range(meta.num_row_groups):
            rg = meta.row_group(g)
            if groups and size + rg.total_byte_size > block_bytes:
                out.append((f, groups, first, start - first))
                groups, size, first = [], 0, start
            groups.append(g)
            size += rg.total_byte_size
            start += rg.num_rows
        if groups:
            out.append((f, groups, first, start - first))
    return out


def _read_chunk(fs: pafs.FileSystem, schema: pa.Schema, columns: list[str], f: StoredFile, groups: list[int],
                first: int, rows: int) -> list[pa.Table]:
    with fs.open_input_file(f.path) as handle:
        pf = pq.ParquetFile(handle, pre_buffer=False, buffer_size=1 << 20)
        have = set(pf.schema_arrow.names)
        table = pf.read_row_groups(groups, columns=[c for c in columns if c in have])
    cols = [table.column(c).cast(schema.field(c).type) if c in have else pa.nulls(rows, schema.field(c).type)
            for c in columns]
    table = pa.Table.from_arrays(cols, schema=pa.schema([schema.field(c) for c in columns]))
    keep = live(f.deleted, first, rows)
    return [table if keep is None else table.filter(pa.array(keep))]


def _datasource(scan: TableScan, chunks: list[tuple[StoredFile, list[int], int, int]], columns: list[str]):
    """A Ray ``Datasource`` of the snapshot's chunks (the class is made here: importing Ray Data
    is seconds, and the store's other readers never need it)."""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    fs, schema = scan.fs, scan.schema
    out_schema = pa.schema([schema.field(c) for c in columns])

    class DeltaSnapshot(Datasource):
        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None) -> list:
            tasks = []
            for f, groups, first, rows in chunks:
                keep = live(f.deleted, first, rows)
                meta = BlockMetadata(num_rows=rows if keep is None else int(np.count_nonzero(keep)), size_bytes=None,
                                     input_files=[f.path], exec_stats=None)
                tasks.append(ReadTask(lambda f=f, g=groups, a=first, n=rows: _read_chunk(fs, schema, columns, f, g, a, n),
                                      meta, schema=out_schema))
            return tasks

    return DeltaSnapshot()
