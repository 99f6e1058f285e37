"""The store: features and rejects as Delta tables, samples as WebDataset shards, run records.

Local paths and object-store URIs (``s3://...``) both work: Delta tables through deltalake,
shards and run records through pyarrow's filesystems. Commits are one Delta commit per table per
run; the run record is written last (the done-marker)."""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
from deltalake import CommitProperties, DeltaTable, write_deltalake
from deltalake.exceptions import TableNotFoundError

from core.schema import FEATURES_SCHEMA, REJECTS_SCHEMA


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


class Store:
    def __init__(self, uri: str):
        self.is_local = "://" not in uri
        self.uri = str(Path(uri).resolve()) if self.is_local else uri.rstrip("/")
        if self.is_local:
            self.fs, self.root = pafs.LocalFileSystem(), self.uri
        else:
            self.fs, self.root = pafs.FileSystem.from_uri(self.uri)
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
        return dt.to_pyarrow_dataset().to_table(columns=columns, filter=filter)

    def dataset(self, which: str, version: int | None = None) -> pads.Dataset | None:
        """A table at ``version`` (default: the latest) as a lazily read pyarrow dataset, opened
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
        return dt.to_pyarrow_dataset()

    def batches(self, which: str, columns: list[str], filter: pc.Expression | None = None,
                version: int | None = None) -> Iterator[pa.RecordBatch]:
        """A table's rows as a stream of record batches (never the whole table in memory)."""
        dt = self.table(self.uri_of(which), version)
        if dt is None:
            return iter(())
        return dt.to_pyarrow_dataset().to_batches(columns=columns, filter=filter)

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

    def merge(self, which: str, new: pa.Table, delete_keys: pa.Table, run_id: str,
              metadata: dict | None = None) -> int | None:
        """One Delta commit: upsert ``new`` and delete ``delete_keys`` (key columns only).
        Returns the new table version, or None when there was nothing to write."""
        schema = new.schema
        keys = ["id", "aug"] if which == "features" else ["id"]
        if new.num_rows == 0 and delete_keys.num_rows == 0:
            return None
        props = CommitProperties(custom_metadata={"mmpipe.run_id": run_id, **(metadata or {})})
        uri = self.uri_of(which)
        dt = self.table(uri)
        if dt is None:
            write_deltalake(uri, new, mode="error", storage_options=self.storage_options,
                            commit_properties=props, name=which,
                            description=json.dumps(metadata or {}))
            return 0
        tomb = pa.table({c: delete_keys[c] if c in keys else pa.nulls(delete_keys.num_rows, schema.field(c).type)
                         for c in schema.names})
        source = pa.concat_tables([
            new.append_column("_delete", pa.array([False] * new.num_rows, pa.bool_())),
            tomb.append_column("_delete", pa.array([True] * tomb.num_rows, pa.bool_())),
        ])
        predicate = " AND ".join(f"t.{k} = s.{k}" for k in keys)
        (dt.merge(source, predicate, source_alias="s", target_alias="t", commit_properties=props)
           .when_matched_delete("s._delete = true")
           .when_matched_update_all(predicate="s._delete = false", except_cols=["_delete"])
           .when_not_matched_insert_all(predicate="s._delete = false", except_cols=["_delete"])
           .execute())
        return dt.version()

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
        """Remove shard folders of runs that never committed (no run record, not referenced)."""
        done = {r["run_id"] for r in self.runs()}
        referenced = set(self.read("features", columns=["shard"])["shard"].to_pylist())
        referenced_runs = {s.split("/")[1] for s in referenced if s and s.count("/") >= 2}
        removed = []
        sel = pafs.FileSelector(self.path_of("samples"), allow_not_found=True)
        for info in self.fs.get_file_info(sel):
            run = info.base_name
            if info.type == pafs.FileType.Directory and run not in done and run not in referenced_runs:
                self.fs.delete_dir(info.path)
                removed.append(run)
        return removed
