"""Delta deletion vectors: a commit that removes a few rows from a stored data file marks them
deleted instead of rewriting the file.

Written by hand: deltalake 1.6 reads deletion vectors (``DeltaTable.scan``, ``deletion_vectors``,
``optimize.compact``) but has no API that writes them (delta-io/delta-rs#4512), and its
``RemoveAction`` cannot name the deletion vector of the file it removes, which the log needs to
tell (path, vector) pairs apart. So commits that touch deletion vectors are written to the log
here, as the protocol lays them out (PROTOCOL.md, "Deletion Vectors"), with a put-if-absent.
"""
from __future__ import annotations

import json
import os
import struct
import time
import uuid
import zlib
from dataclasses import dataclass
from typing import Iterator
from urllib.parse import unquote

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from deltalake import DeltaTable

FEATURE = "deletionVectors"
ENABLE = {"delta.enableDeletionVectors": "true"}
MAGIC = 1681511377   # RoaringBitmapArray, portable serialisation
_Z85 = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#"


class CommitConflict(RuntimeError):
    """Another writer committed the table version this commit was for."""


def supported(dt: DeltaTable) -> bool:
    """Whether the table's protocol has deletion vectors (readers then must apply them)."""
    return FEATURE in (dt.protocol().reader_features or [])


def z85(data: bytes) -> str:
    """ZeroMQ's base-85 (Python 3.13 has ``base64.z85encode``; this is 3.11)."""
    out = []
    for i in range(0, len(data), 4):
        value = int.from_bytes(data[i:i + 4], "big")
        out.append("".join(_Z85[value // 85 ** k % 85] for k in range(4, -1, -1)))
    return "".join(out)


def serialize(rows: np.ndarray) -> bytes:
    """Row positions as Delta stores them: the magic, then a RoaringTreemap (a count, then for each
    high 32 bits a portable 32-bit roaring bitmap of the low bits), all little-endian."""
    from pyroaring import BitMap

    rows = np.unique(np.asarray(rows, np.uint64))
    highs = np.unique(rows >> np.uint64(32))
    out = [struct.pack("<IQ", MAGIC, len(highs))]
    for high in highs:
        low = (rows[(rows >> np.uint64(32)) == high] & np.uint64(0xFFFFFFFF)).astype(np.uint32)
        out.append(struct.pack("<I", int(high)) + BitMap(low).serialize())
    return b"".join(out)


@dataclass(frozen=True)
class Deleted:
    """One stored file's deleted rows (all of them: a new vector replaces the file's old one)."""

    path: str            # relative to the table, as the log names it
    size: int            # the data file's bytes
    num_records: int     # its physical rows
    rows: np.ndarray     # deleted positions, sorted


def write_vectors(fs: pafs.FileSystem, table_path: str, deleted: list[Deleted]) -> list[dict]:
    """Every vector into one ``deletion_vector_<uuid>.bin`` (format version 1; per vector a big-endian
    size, the bytes, a big-endian CRC-32); their descriptors, in order."""
    if not deleted:
        return []
    name = uuid.uuid4()
    parts, descriptors, offset = [b"\x01"], [], 1
    for d in deleted:
        data = serialize(d.rows)
        parts.append(struct.pack(">I", len(data)) + data + struct.pack(">I", zlib.crc32(data)))
        descriptors.append({"storageType": "u", "pathOrInlineDv": z85(name.bytes), "offset": offset,
                            "sizeInBytes": len(data), "cardinality": int(len(d.rows))})
        offset += len(data) + 8
    with fs.open_output_stream(f"{table_path}/deletion_vector_{name}.bin") as out:
        out.write(b"".join(parts))
    return descriptors


def deleted_rows(dt: DeltaTable) -> dict[str, np.ndarray]:
    """Data file (its path in the log, relative to the table) -> the sorted positions of its rows a
    deletion vector marks deleted, for the files that carry one: a few bytes per deleted row, not
    a mask per stored row."""
    if not supported(dt):
        return {}
    out = {}
    for batch in pa.RecordBatchReader.from_stream(dt.deletion_vectors()):
        keeps = batch.column("selection_vector")
        for k, uri in enumerate(batch.column("filepath").to_pylist()):
            keep = keeps[k].values.to_numpy(zero_copy_only=False)
            out[relative(dt, uri)] = np.flatnonzero(~keep.astype(bool))
    return out


def relative(dt: DeltaTable, uri: str) -> str:
    """A data file's URI (as ``file_uris`` and ``deletion_vectors`` give it) -> its path in the log."""
    root, path = _no_scheme(dt.table_uri).rstrip("/") + "/", _no_scheme(uri)
    if not path.startswith(root):
        raise ValueError(f"data file {uri} is not under its table {dt.table_uri}")
    return unquote(path[len(root):])


def _no_scheme(uri: str) -> str:
    return uri.split("://", 1)[1] if "://" in uri else uri


def live(deleted: np.ndarray | None, start: int, n: int) -> np.ndarray | None:
    """Rows ``start .. start + n`` of a file with rows ``deleted``: which are live (None: all)."""
    if deleted is None:
        return None
    lo, hi = np.searchsorted(deleted, [start, start + n])
    if lo == hi:
        return None
    keep = np.ones(n, bool)
    keep[deleted[lo:hi] - start] = False
    return keep


# -- the log ------------------------------------------------------------------------------------------

def descriptors(fs: pafs.FileSystem, table_path: str, version: int) -> dict[str, dict]:
    """Path -> deletion vector descriptor of the live files that carry one at ``version``, from the
    log (deltalake does not expose them): the latest checkpoint, then the commits after it."""
    log = f"{table_path}/_delta_log"
    names = [i.base_name for i in fs.get_file_info(pafs.FileSelector(log, allow_not_found=True))]
    checkpoints = sorted({int(n.split(".")[0]) for n in names if ".checkpoint." in n and n.endswith(".parquet")
                          and int(n.split(".")[0]) <= version})
    live_dvs: dict[tuple[str, str], dict] = {}
    start = 0
    if checkpoints:
        start = checkpoints[-1]
        for name in sorted(n for n in names if n.startswith(f"{start:020d}.checkpoint.") and n.endswith(".parquet")):
            for action in _checkpoint_adds(fs, f"{log}/{name}"):
                live_dvs[(action["path"], _dv_id(action["deletionVector"]))] = action["deletionVector"]
        start += 1
    for v in range(start, version + 1):
        for action in _commit(fs, f"{log}/{v:020d}.json"):
            kind = "add" if "add" in action else "remove" if "remove" in action else None
            dv = (action.get(kind) or {}).get("deletionVector") if kind else None
            if dv:
                key = (action[kind]["path"], _dv_id(dv))
                if kind == "add":
                    live_dvs[key] = dv
                else:
                    live_dvs.pop(key, None)
    return {path: dv for (path, _), dv in live_dvs.items()}


def _dv_id(dv: dict) -> str:
    return f"{dv['storageType']}{dv['pathOrInlineDv']}@{dv.get('offset')}"


def _checkpoint_adds(fs: pafs.FileSystem, path: str) -> Iterator[dict]:
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        if "add" not in pf.schema_arrow.names or "deletionVector" not in pf.schema_arrow.field("add").type.names:
            return
        for batch in pf.iter_batches(columns=["add"]):
            for add in batch.column(0).to_pylist():
                if add and add.get("deletionVector"):
                    yield add


def _commit(fs: pafs.FileSystem, path: str) -> Iterator[dict]:
    with fs.open_input_stream(path) as f:
        for line in f.read().decode().splitlines():
            if line.strip():
                yield json.loads(line)


def file_actions(deleted: list[Deleted], vectors: list[dict], old: dict[str, dict], removed: dict[str, int],
                 adds: list, now: int) -> list[dict]:
    """The log actions of a commit: each file that gains a vector removed (with its old vector) and
    added again with the new one; each removed file (with its vector, if it had one); the new files."""
    actions = []
    for d, dv in zip(deleted, vectors):
        actions.append({"remove": _remove(d.path, d.size, old.get(d.path), now)})
        actions.append({"add": {"path": d.path, "partitionValues": {}, "size": d.size, "modificationTime": now,
                                "dataChange": True, "stats": json.dumps({"numRecords": d.num_records}),
                                "deletionVector": dv}})
    for path, size in removed.items():
        actions.append({"remove": _remove(path, size, old.get(path), now)})
    for a in adds:
        actions.append({"add": {"path": a.path, "partitionValues": dict(a.partition_values), "size": a.size,
                                "modificationTime": a.modification_time, "dataChange": a.data_change,
                                "stats": a.stats}})
    return actions


def _remove(path: str, size: int, dv: dict | None, now: int) -> dict:
    out = {"path": path, "deletionTimestamp": now, "dataChange": True, "extendedFileMetadata": True,
           "partitionValues": {}, "size": size}
    if dv:
        out["deletionVector"] = dv
    return out


def commit(fs: pafs.FileSystem, table_path: str, uri: str, version: int, actions: list[dict],
           metadata: dict[str, str]) -> None:
    """Write ``actions`` as table ``version`` (after a ``commitInfo`` carrying ``metadata`` as
    deltalake's ``CommitProperties`` does), only if no other writer wrote that version."""
    info = {"timestamp": int(time.time() * 1000), "operation": "DELETE",
            "operationParameters": {"deletionVectors": "true"}, "clientVersion": "mmpipe", **metadata}
    body = "\n".join(json.dumps(a) for a in [{"commitInfo": info}, *actions]).encode() + b"\n"
    name = f"{table_path}/_delta_log/{version:020d}.json"
    if uri.startswith("s3://"):
        _put_if_absent_s3(name, body)
    else:
        _put_if_absent_local(name, body)


def _put_if_absent_local(path: str, body: bytes) -> None:
    # A hard link fails if the name exists, so the commit appears whole or not at all.
    tmp = f"{os.path.dirname(path)}/.tmp-{uuid.uuid4()}.json"
    with open(tmp, "wb") as f:
        f.write(body)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise CommitConflict(f"{path} was written by another writer") from None
    finally:
        os.unlink(tmp)


def _put_if_absent_s3(path: str, body: bytes) -> None:
    import boto3
    from botocore.exceptions import ClientError

    bucket, key = path.split("/", 1)
    client = boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None)
    try:
        client.put_object(Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
            raise CommitConflict(f"s3://{path} was written by another writer") from None
        raise
