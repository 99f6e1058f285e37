"""The store: features and rejects as Delta tables, samples as WebDataset shards, run records.

Local paths and object-store URIs (``s3://...``) both work: Delta tables through deltalake,
shards and run records through pyarrow's filesystems. Commits are one Delta commit per table per
run; the run record is written last (the done-marker)."""
from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
from deltalake import CommitProperties, DeltaTable
from deltalake.exceptions import TableNotFoundError

from core import deletion
from core.scan import TableScan
from core.schema import FEATURES_SCHEMA, REJECTS_SCHEMA

REWRITE_THREADS = min(8, os.cpu_count() or 1)   # a commit's reads of stored keys and rewrites run side by side
# A stored file whose superseded rows are marked by a deletion vector while they are at most this
# share of its rows; past it the file is rewritten without them (reads then skip less dead data).
DV_MAX_SHARE = 0.5


class StoreBusy(RuntimeError):
    """Another run is writing this store."""


def _storage_options(uri: str) -> dict[str, str] | None:
    if not uri.startswith("s3://"):
        return None
    # Delta commits use S3's create-if-absent put (AWS S3, MinIO, moto all support it), so two
    # writers can never both commit one table version, even past mmpipe's own store lease.
    opts = {"aws_conditional_put": "etag"}
    for key in ("AWS_ENDPOINT_URL", "AWS_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        if os.environ.get(key):
            opts[key] = os.environ[key]
    if opts.get("AWS_ENDPOINT_URL", "").startswith("http://"):
        opts["AWS_ALLOW_HTTP"] = "true"
    return opts


def filesystem_of(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of a path or URI, and the path inside it."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), str(Path(uri).resolve())
    return pafs.FileSystem.from_uri(uri)


def snapshot_dataset(dt: DeltaTable, fs: pafs.FileSystem) -> TableScan:
    """A Delta snapshot's live rows read through ``fs`` with pyarrow (``core.scan``). deltalake's
    ``to_pyarrow_dataset`` reads through a Python filesystem bridge into its Rust object store,
    and a process that scanned through it aborted at exit about every other time (``terminate
    called without an active exception``, exit 134, even after a successful ``mmpipe report``);
    it also refuses tables with deletion vectors. A table written before a column was added (a
    new modality's) reads with that column, null in its old rows."""
    return TableScan(dt, fs, widened(pa.schema(dt.schema().to_arrow())))


def widened(schema: pa.Schema) -> pa.Schema:
    """A stored table's schema plus the columns mmpipe's current layout of that table adds."""
    layout = FEATURES_SCHEMA if "fp_sample" in schema.names else REJECTS_SCHEMA if "fp_all" in schema.names else None
    missing = [f for f in layout or () if f.name not in schema.names]
    return pa.schema([*schema, *missing]) if missing else schema


class Store:
    def __init__(self, uri: str):
        self.is_local = "://" not in uri
        self.uri = str(Path(uri).resolve()) if self.is_local else uri.rstrip("/")
        self.fs, self.root = filesystem_of(self.uri)
        self.storage_options = _storage_options(self.uri)

    # -- layout -----------------------------------------------------------------------------
    def uri_of(self, *parts: str) -> str:
        return "/".join([self.uri, *parts])

    def path_of(self, *parts: str) -> str:
        """Path inside ``self.fs`` (no scheme)."""
        return "/".join([self.root.rstrip("/"), *parts])

    @property
    def features_uri(self) -> str:
        return self.uri_of("features")

    @property
    def rejects_uri(self) -> str:
        return self.uri_of("rejects")

    def local_dir(self, *parts: str) -> Path:
        """A local working folder for this store (staging, fetch cache): inside a local store,
        under the system temp dir for a remote one."""
        base = Path(self.uri) if self.is_local else Path(os.environ.get("TMPDIR", "/tmp")) / "mmpipe" / self.uri.replace("://", "_").replace("/", "_")
        path = base.joinpath(*parts)
        path.mkdir(parents=True, exist_ok=True)
        return path

    # -- locking ----------------------------------------------------------------------------
    @contextmanager
    def lock(self, run_id: str) -> Iterator[None]:
        """Refuse a second concurrent writer. Local: an flock, released by the OS if the run dies.
        S3: a lease object ``_lock.json`` (conditional put, heartbeat, stale-lease takeover)."""
        if self.uri.startswith("s3://"):
            from core.config import ConfigError
            from core.lease import LeaseHeld, LeaseUnavailable, S3Lease

            lease = S3Lease(self.uri_of("_lock.json"), run_id)
            try:
                lease.acquire()
            except LeaseHeld as exc:
                raise StoreBusy(f"store {self.uri} is being written by {exc}; wait for it to finish") from None
            except LeaseUnavailable as exc:
                raise ConfigError(f"cannot write store {self.uri}: {exc}") from None
            try:
                yield
            finally:
                lease.release()
            return
        import fcntl

        path = self.local_dir() / ".lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = Path(path).read_text().strip() or "another run"
                raise StoreBusy(f"store {self.uri} is being written by {holder}; wait for it to finish") from None
            os.ftruncate(fd, 0)
            os.write(fd, f"run {run_id} (pid {os.getpid()})".encode())
            yield
        finally:
            os.close(fd)

    # -- tables -----------------------------------------------------------------------------
    def table(self, uri: str, version: int | None = None) -> DeltaTable | None:
        try:
            return DeltaTable(uri, version=version, storage_options=self.storage_options)
        except TableNotFoundError:
            return None

    def read(self, which: str, version: int | None = None, columns: list[str] | None = None,
             filter: pc.Expression | None = None) -> pa.Table:
        schema = FEATURES_SCHEMA if which == "features" else REJECTS_SCHEMA
        dt = self.table(self.uri_of(which), version)
        if dt is None:
            if version is not None:
                raise ValueError(f"{which} table has no version {version}")
            return schema.empty_table().select(columns) if columns else schema.empty_table()
        return self.snapshot(dt).to_table(columns=columns, filter=filter)

    def snapshot(self, dt: DeltaTable) -> TableScan:
        return snapshot_dataset(dt, self.fs)

    def dataset(self, which: str, version: int | None = None) -> TableScan | None:
        """A table at ``version`` (default: the latest) as a lazily read scan of its live rows, opened
        with this store's storage options; None when the table does not exist. A version the
        table never had is a user error (``ConfigError``)."""
        uri = self.uri_of(which)
        dt = self.table(uri)
        if dt is None:
            return None
        if version is not None and version != dt.version():
            if not 0 <= version <= dt.version():
                from core.config import ConfigError

                raise ConfigError(f"{which} table at {uri} has no version {version} (versions 0..{dt.version()})")
            dt.load_as_version(version)
        return self.snapshot(dt)

    def batches(self, which: str, columns: list[str], filter: pc.Expression | None = None,
                version: int | None = None) -> Iterator[pa.RecordBatch]:
        """A table's rows as a stream of record batches (never the whole table in memory), read
        ahead little: a feature row is kilobytes, and pyarrow's default read-ahead (16 batches of
        4 files) held hundreds of MB."""
        dt = self.table(self.uri_of(which), version)
        if dt is None:
            return iter(())
        return self.snapshot(dt).to_batches(columns=columns, filter=filter, batch_size=4096,
                                            batch_readahead=2, fragment_readahead=1)

    def count(self, which: str, filter: pc.Expression | None = None) -> int:
        """Rows of a table (matching ``filter``), counted by the reader, no row materialised."""
        ds = self.dataset(which)
        return 0 if ds is None else ds.count_rows(filter=filter)

    def value_counts(self, which: str, column: str) -> dict[str, int]:
        """How often each value of ``column`` occurs, summed block by block."""
        counts: dict[str, int] = {}
        for batch in self.batches(which, [column]):
            for item in pc.value_counts(batch.column(0)).to_pylist():
                counts[item["values"]] = counts.get(item["values"], 0) + item["counts"]
        return counts

    def data_files(self, which: str, run_id: str) -> "DataFiles":
        """A writer of this run's Parquet data files for table ``which`` (committed by ``commit``)."""
        return DataFiles(self, which, run_id)

    def commit(self, which: str, files: "DataFiles", delete: pa.Array | None, run_id: str,
               metadata: dict | None = None, vectors_from: int | None = None) -> int | None:
        """One Delta transaction: add the run's data files and remove the rows whose key (``id``,
        or ``id<TAB>aug`` for features) is in ``delete``. A stored file holding such rows is
        rewritten without them, a row group at a time, or, unless ``vectors_from`` is None, in a
        table with deletion vectors (one that has them, or holds at least ``vectors_from`` rows: it
        gains them in a commit of its own), gets a vector marking them while they are at most
        DV_MAX_SHARE of its rows. Returns the new version, or None when there was nothing to do.
        The driver holds file lists, keys and the vectors' row positions, never rows."""
        from deltalake import Schema as DeltaSchema
        from deltalake.transaction import RemoveAction, create_table_with_add_actions

        custom = {"mmpipe.run_id": run_id, **(metadata or {})}
        props = CommitProperties(custom_metadata=custom)
        uri = self.uri_of(which)
        dt = self.table(uri)
        result, deleted = Deletions(), {}
        if dt is not None and delete is not None and len(delete):
            actions = pa.table(dt.get_add_actions(flatten=True))
            vectors = vectors_from is not None and (
                deletion.supported(dt) or (pc.sum(actions["num_records"]).as_py() or 0) >= vectors_from)
            if vectors and not deletion.supported(dt):
                dt.alter.set_table_properties(deletion.ENABLE)   # adds the protocol's reader and writer feature
                dt.update_incremental()
            deleted = deletion.deleted_rows(dt)
            result = files.delete_all(actions.column("path").to_pylist(), actions.column("size_bytes").to_pylist(),
                                      actions.column("num_records").to_pylist(), deleted, delete, vectors)
        adds = files.close()
        if not adds and not result:
            return None
        schema = files.schema
        if dt is None:
            create_table_with_add_actions(uri, DeltaSchema.from_arrow(schema), adds, mode="error", name=which,
                                          description=json.dumps(metadata or {}),
                                          storage_options=self.storage_options, commit_properties=props)
            return 0
        stored_names = pa.schema(dt.schema().to_arrow()).names
        new_columns = [f for f in schema if f.name not in stored_names]
        if new_columns:   # a table from before a column existed (schema evolution: Delta's add-columns)
            dt.alter.add_columns(list(DeltaSchema.from_arrow(pa.schema(new_columns)).fields))
            dt.update_incremental()
        if result.deleted or (result.removed and deleted):
            self._commit_by_hand(which, dt, result, adds, custom)
        else:
            now = int(time.time() * 1000)
            removes = [RemoveAction(path, True, now, size) for path, size in result.removed.items()]
            dt.create_write_transaction(removes + adds, mode="append", schema=schema, commit_properties=props)
        dt.update_incremental()
        return dt.version()

    def _commit_by_hand(self, which: str, dt: DeltaTable, result: "Deletions", adds: list, custom: dict) -> None:
        """A commit that adds deletion vectors or removes files that carry one (deltalake's
        transactions cannot: ``core.deletion``); a checkpoint every ``delta.checkpointInterval``
        versions, as deltalake's own commits make."""
        root = self.path_of(which)
        old = deletion.descriptors(self.fs, root, dt.version())
        vectors = deletion.write_vectors(self.fs, root, result.deleted)
        actions = deletion.file_actions(result.deleted, vectors, old, result.removed, adds, int(time.time() * 1000))
        version = dt.version() + 1
        deletion.commit(self.fs, root, self.uri_of(which), version, actions, custom)
        dt.update_incremental()
        if version % int(dt.metadata().configuration.get("delta.checkpointInterval", 100)) == 0:
            dt.create_checkpoint()

    def orphan_files(self, which: str, done: set[str]) -> list[str]:
        """Data files of runs that never committed: written by ``DataFiles`` (their run id in the
        name), not referenced by the table, from a run without a run record."""
        dt = self.table(self.uri_of(which))
        referenced = set() if dt is None else set(dt.get_add_actions(flatten=True).column("path").to_pylist())
        sel = pafs.FileSelector(self.path_of(which), allow_not_found=True)
        out = []
        for info in self.fs.get_file_info(sel):
            run = DataFiles.run_of(info.base_name)
            if run and run not in done and info.base_name not in referenced:
                out.append(info.path)
        return out

    def versions(self, which: str) -> list[dict]:
        dt = self.table(self.uri_of(which))
        return [] if dt is None else dt.history()

    # -- run records and shards -------------------------------------------------------------
    def write_text(self, rel: str, text: str) -> None:
        path = self.path_of(rel)
        self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        tmp = path + ".tmp"
        with self.fs.open_output_stream(tmp) as f:
            f.write(text.encode())
        self.fs.move(tmp, path)

    def runs(self) -> list[dict]:
        sel = pafs.FileSelector(self.path_of("runs"), allow_not_found=True)
        records = []
        for info in self.fs.get_file_info(sel):
            if info.path.endswith(".json"):
                with self.fs.open_input_stream(info.path) as f:
                    records.append(json.loads(f.read()))
        return sorted(records, key=lambda r: r.get("started", ""))

    def recover(self) -> list[str]:
        """Remove what runs that never committed left: data files no table references and shard
        folders no row references (no run record either)."""
        done = {r["run_id"] for r in self.runs()}
        for which in ("features", "rejects"):
            for path in self.orphan_files(which, done):
                self.fs.delete_file(path)
        referenced: set[str] = set()   # distinct shard paths, gathered block by block
        for batch in self.batches("features", ["shard"]):
            referenced.update(pc.unique(batch.column(0)).to_pylist())
        referenced_runs = {s.split("/")[1] for s in referenced if s and s.count("/") >= 2}
        removed = []
        sel = pafs.FileSelector(self.path_of("samples"), allow_not_found=True)
        for info in self.fs.get_file_info(sel):
            run = info.base_name
            if info.type == pafs.FileType.Directory and run not in done and run not in referenced_runs:
                self.fs.delete_dir(info.path)
                removed.append(run)
        return removed


class RowGroups:
    """Rows in, Parquet row groups of exactly ``size`` rows out (the last one at ``drain``): the
    buffering both the run's spills and its data files write through."""

    def __init__(self, schema: pa.Schema, size: int):
        self.schema, self.size = schema, size
        self._pending: list[pa.Table] = []
        self._rows = 0

    def add(self, batch: pa.RecordBatch | pa.Table) -> Iterator[pa.Table]:
        """Buffer ``batch``; yield every full row group it completes."""
        if batch.num_rows == 0:
            return
        table = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
        self._pending.append(table.select(self.schema.names).cast(self.schema))
        self._rows += table.num_rows
        while self._rows >= self.size:
            yield self._take(self.size)

    def drain(self) -> Iterator[pa.Table]:
        if self._rows:
            yield self._take(self._rows)

    def _take(self, rows: int) -> pa.Table:
        table = pa.concat_tables(self._pending)
        rest = table.slice(rows)
        self._pending, self._rows = ([rest] if rest.num_rows else []), rest.num_rows
        return table.slice(0, rows)


class DataFiles:
    """The Parquet data files one run writes into a table's folder: rows stream in, files of up
    to FILE_ROWS rows or FILE_BYTES stored, in row groups of GROUP_ROWS, go out (pyarrow, memory
    bounded by one row group); ``Store.commit`` makes them visible in one transaction. Named after the run, so that
    ``Store.recover`` can remove the files of a run that died before committing. Written with
    pyarrow rather than delta-rs's writer: that one buffers whole files in memory (RESULTS.md)
    and cannot be fed a stream that reads the table it writes."""

    FILE_ROWS = 32_768   # a read task of training takes a whole file: keep one to tens of MB stored
    FILE_BYTES = 48 << 20   # the same for wide rows (media embeddings, sequences): a file ends at either
    GROUP_ROWS = 2048   # feature rows are kilobytes each: row groups of tens of MB at most
    PREFIX = "part-mmpipe-"

    def __init__(self, store: Store, which: str, run_id: str, part: str = ""):
        self.store, self.which, self.run_id = store, which, run_id
        self.part = part   # a writer beside others of the same run: its files' names carry it
        self.schema = FEATURES_SCHEMA if which == "features" else REJECTS_SCHEMA
        self.adds: list = []
        self._groups = RowGroups(self.schema, self.GROUP_ROWS)
        self._writer = None
        self._name = ""
        self._stream = None
        self._rows = 0

    @classmethod
    def run_of(cls, name: str) -> str:
        """The run id in a data file's name ('' for files mmpipe did not write this way)."""
        if not name.startswith(cls.PREFIX):
            return ""
        return name[len(cls.PREFIX):].rsplit("-", 1)[0]

    def write(self, batch: pa.RecordBatch | pa.Table) -> None:
        for group in self._groups.add(batch):
            self._write_group(group)

    def _write_group(self, group: pa.Table) -> None:
        import pyarrow.parquet as pq

        if self._writer is None:
            self._name = f"{self.PREFIX}{self.run_id}-{self.part}{len(self.adds):05d}.parquet"
            path = self.store.path_of(self.which, self._name)
            self.store.fs.create_dir(self.store.path_of(self.which), recursive=True)
            self._stream = self.store.fs.open_output_stream(path)
            self._writer = pq.ParquetWriter(self._stream, self.schema, compression="snappy")
        self._writer.write_table(group, row_group_size=group.num_rows)
        self._rows += group.num_rows
        if self._rows >= self.FILE_ROWS or self._stream.tell() >= self.FILE_BYTES:   # (a row group is written whole)
            self._finish_file()

    def _finish_file(self) -> None:
        from deltalake.transaction import AddAction

        if self._writer is None:
            return
        self._writer.close()
        self._stream.close()   # an object store makes the file visible (and sized) only once its stream is closed
        self._writer = self._stream = None
        path = self.store.path_of(self.which, self._name)
        size = self.store.fs.get_file_info(path).size
        self.adds.append(AddAction(self._name, size, {}, int(time.time() * 1000), True,
                                   json.dumps({"numRecords": self._rows})))
        self._rows = 0

    def close(self) -> list:
        for group in self._groups.drain():
            self._write_group(group)
        self._finish_file()
        return self.adds

    def delete_all(self, names: list[str], sizes: list[int], records: list[int | None],
                   deleted: dict[str, np.ndarray], delete: pa.Array, vectors: bool) -> "Deletions":
        """``delete_from`` for each stored file (``names`` relative to the table), on up to
        REWRITE_THREADS threads (Arrow reads, filters and writes Parquet without holding the GIL),
        each thread writing its own files of this run. ``vectors``: the table has deletion vectors."""
        jobs = [(name, size, n, deleted.get(name), vectors) for name, size, n in zip(names, sizes, records)]
        threads = max(1, min(REWRITE_THREADS, len(jobs)))
        writers = [self] if threads == 1 else [DataFiles(self.store, self.which, self.run_id, part=f"{self.part}w{k}.")
                                               for k in range(threads)]
        with ThreadPoolExecutor(threads, thread_name_prefix="rewrite") as pool:
            done = list(pool.map(lambda k: [(job, writers[k].delete_from(*job, delete)) for job in jobs[k::threads]],
                                 range(threads)))
        for writer in writers if threads > 1 else ():
            self.adds += writer.close()
        out = Deletions()
        for (name, size, *_), outcome in (pair for part in done for pair in part):
            if isinstance(outcome, deletion.Deleted):
                out.deleted.append(outcome)
            elif outcome:
                out.removed[name] = size
        return out

    def delete_from(self, name: str, size: int, records: int | None, deleted: np.ndarray | None, vectors: bool,
                    delete: pa.Array) -> "deletion.Deleted | bool":
        """Drop the rows of stored file ``name`` whose key is in ``delete``: False when it holds none
        (live); its new deletion vector (with the rows ``deleted`` before), if ``vectors``; or
        True when it is to be removed, its live rows written into this run's files first."""
        import pyarrow.parquet as pq

        with self.store.fs.open_input_file(self.store.path_of(self.which, name)) as handle:
            pf = pq.ParquetFile(handle, pre_buffer=False, buffer_size=1 << 20)   # pre-buffering reads the whole file
            n = pf.metadata.num_rows
            alive = np.ones(n, bool)
            if deleted is not None:
                alive[deleted] = False
            hits = pc.is_in(row_keys(pf.read(columns=_key_columns(self.which)), self.which), value_set=delete)
            hits = hits.to_numpy(zero_copy_only=False).astype(bool) & alive
            if not hits.any():
                return False
            alive &= ~hits
            if vectors and alive.sum() >= (1 - DV_MAX_SHARE) * n:
                return deletion.Deleted(name, size, records or n, np.flatnonzero(~alive))
            start = 0
            for g in range(pf.num_row_groups if alive.any() else 0):
                group = pf.read_row_group(g)
                self.write(group.filter(pa.array(alive[start:start + group.num_rows])))
                start += group.num_rows
        return True


@dataclass
class Deletions:
    """What a commit does to stored files: vectors to add, files to remove (relative path -> bytes)."""

    deleted: list = field(default_factory=list)
    removed: dict[str, int] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.deleted or self.removed)


def _key_columns(which: str) -> list[str]:
    return ["id", "aug"] if which == "features" else ["id"]


def row_keys(table: pa.Table | pa.RecordBatch, which: str) -> pa.Array:
    """A row's key as one string: ``id`` (rejects) or ``id<TAB>aug`` (features)."""
    if which != "features":
        return table.column("id")
    return pc.binary_join_element_wise(table.column("id"), pc.cast(table.column("aug"), pa.string()), "\t")
