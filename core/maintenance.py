"""Store maintenance (``mmpipe compact``): bin-pack the Delta tables' small files, checkpoint the
log, drop expired log files and vacuum data files that no version within the retention needs.

Every run adds a few files per table (one MERGE each), so reads slow down as runs pile up;
compaction rewrites them into few large ones without changing a row. It takes the store's write
lock, so it never races a run."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
from deltalake import CommitProperties, DeltaTable

from core.config import ConfigError
from core.store import Store

TABLES = ("features", "rejects")
DEFAULT_TARGET_BYTES = 100 * 1024 ** 2   # deltalake's optimize target when delta.targetFileSize is unset


@dataclass
class TableFiles:
    """What a table's current version is made of."""

    version: int
    files: int
    bytes: int
    small_files: int   # below the compaction target size: what bin-packing would rewrite
    log_files: int     # entries under _delta_log (commits, checkpoints)


@dataclass
class TableCompaction:
    before: TableFiles
    after: TableFiles
    compacted_files: int = 0    # files rewritten by optimize.compact
    added_files: int = 0        # files it wrote in their place
    vacuumed: list[str] = field(default_factory=list)   # data files vacuum removed (dry run: would remove)

    def to_dict(self) -> dict:
        b, a = self.before, self.after
        return {"files_before": b.files, "files_after": a.files, "bytes_before": b.bytes, "bytes_after": a.bytes,
                "version_before": b.version, "version_after": a.version,
                "log_files_before": b.log_files, "log_files_after": a.log_files,
                "small_files_before": b.small_files, "compacted_files": self.compacted_files,
                "added_files": self.added_files, "vacuumed_files": len(self.vacuumed), "vacuumed": self.vacuumed}


def _target_bytes(dt: DeltaTable) -> int:
    value = dt.metadata().configuration.get("delta.targetFileSize")
    return int(value) if value else DEFAULT_TARGET_BYTES


def _files(store: Store, which: str, dt: DeltaTable) -> TableFiles:
    adds = pa.table(dt.get_add_actions())
    sizes = adds["size_bytes"]
    small = pc.sum(pc.less(sizes, _target_bytes(dt))).as_py() or 0
    log = store.fs.get_file_info(pafs.FileSelector(store.path_of(which, "_delta_log"), allow_not_found=True))
    return TableFiles(version=dt.version(), files=adds.num_rows, bytes=pc.sum(sizes).as_py() or 0,
                      small_files=small if small > 1 else 0, log_files=len(log))


def _compact_table(store: Store, which: str, dt: DeltaTable, vacuum_hours: int, dry_run: bool,
                   props: CommitProperties) -> TableCompaction:
    before = _files(store, which, dt)
    result = TableCompaction(before=before, after=before)
    if not dry_run:
        metrics = dt.optimize.compact(commit_properties=props)
        result.compacted_files, result.added_files = metrics["numFilesRemoved"], metrics["numFilesAdded"]
    # full: also files no commit ever referenced (left by a writer killed before its commit).
    # The retention is the user's explicit choice here, so it is not held to the table's 7-day minimum.
    result.vacuumed = sorted(dt.vacuum(retention_hours=vacuum_hours, dry_run=dry_run, enforce_retention_duration=False,
                                       full=True, commit_properties=props))
    if not dry_run:
        # Checkpoint last so that it covers the compaction's and the vacuum's commits.
        dt.create_checkpoint()
        dt.cleanup_metadata()
        result.after = _files(store, which, dt)
    return result


def compact(store_uri: str, *, vacuum_hours: int = 168, dry_run: bool = False) -> dict:
    """Compact, checkpoint, clean the log of and vacuum each Delta table of the store, holding its
    write lock. Returns ``{"store", "dry_run", "retain_hours", "tables": {name: counts}}``; a
    missing or empty store is a ``ConfigError``, a store a run is writing ``StoreBusy``."""
    if vacuum_hours < 0:
        raise ConfigError(f"retention must be >= 0 hours, got {vacuum_hours}")
    store = Store(store_uri)
    if store.is_local and not Path(store.uri).is_dir():
        raise ConfigError(f"store not found: {store_uri}")
    present = [which for which in TABLES if store.table(store.uri_of(which)) is not None]
    if not present:
        raise ConfigError(f"no Delta tables (features, rejects) in store {store.uri}; run `mmpipe run` first")
    op_id = time.strftime("compact-%Y%m%dT%H%M%S", time.gmtime())
    props = CommitProperties(custom_metadata={"mmpipe.run_id": op_id, "mmpipe.operation": "compact"})
    tables = {}
    with store.lock(op_id):
        for which in present:
            dt = store.table(store.uri_of(which))   # reopened under the lock: the version a run may just have committed
            tables[which] = _compact_table(store, which, dt, vacuum_hours, dry_run, props).to_dict()
    return {"store": store.uri, "dry_run": dry_run, "retain_hours": vacuum_hours, "tables": tables}


def format_compaction(result: dict) -> str:
    """A short human summary of ``compact``'s result."""
    head = ["table", "files", "MiB", "version", "log files", "vacuumed"]
    rows = []
    for which, t in result["tables"].items():
        mib = f"{t['bytes_before'] / 2 ** 20:.2f} -> {t['bytes_after'] / 2 ** 20:.2f}"
        rows.append([which, f"{t['files_before']} -> {t['files_after']}", mib,
                     f"{t['version_before']} -> {t['version_after']}",
                     f"{t['log_files_before']} -> {t['log_files_after']}", str(t["vacuumed_files"])])
    widths = [max(len(h), *(len(r[k]) for r in rows)) for k, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [f"store {result['store']}" + ("  (dry run: nothing changed)" if result["dry_run"] else ""),
           line(head), line(["-" * w for w in widths]), *(line(r) for r in rows)]
    if result["dry_run"]:
        small = ", ".join(f"{w}: {t['small_files_before']}" for w, t in result["tables"].items())
        out.append(f"files compaction would rewrite: {small}; vacuumed: files vacuum would delete")
    out.append(f"vacuum retention: {result['retain_hours']} h (files superseded longer ago are deleted: "
               "time travel to the versions that used them stops working)")
    return "\n".join(out)
