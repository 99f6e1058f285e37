"""Sinks for the processing pass: rows stream in as numpy batches and leave as WebDataset shards
(samples), staged Parquet (features, committed later) and reject records.

Shards are written where the media are: by the stage actors, one shard per Ray Data block
(``write_block_shards``), so media bytes never travel to the driver, or by the driver (``RunSink``
with ``ShardSink``) for runs in the driver and for a local store on a multi-node cluster, whose
disk the actors cannot reach."""
from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from core.schema import FEATURES_SCHEMA, normalize_batch, reject_record
from core.store import Store
from pipeline.spill import Spill
from stages.base import MODALITIES, STATS_COLUMN, Batch, StageStats, decode_stats, num_rows
from stages.media import image_format
from stages.modalities import REGISTRY

ROW_GROUP_ROWS = 4096   # staged feature rows per Parquet row group
HEAD_SAMPLES = 256      # the first samples of each shard, held and written richest first (ShardSink)
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")


def sample_key(rid: str, aug: int) -> str:
    """WebDataset keys may not contain dots (they start the extension)."""
    key = _KEY_UNSAFE.sub("_", rid)
    return key if aug == 0 else f"{key}_aug{aug}"


def member_ext(m: str, value: bytes | str) -> str:
    """How a modality's value is stored in a shard: the member's extension (an image's is its
    encoding's, jpg or png)."""
    members = REGISTRY[m].members
    return members[0] if len(members) == 1 else image_format(value)


def sample_record(batch: Batch, i: int, run_id: str) -> dict:
    """Row ``i`` as a WebDataset sample: key, cleaned media and the ``.json`` metadata.

    Every sample carries ``.json`` and ``.txt`` (empty when the row has no text); an image or an
    audio clip is a member only where the row has one, so no decoder ever meets an empty image.
    The ``.json`` has the same keys and types in every sample (the lineage dicts that vary from
    row to row are JSON text, as in the features table), so that Hugging Face ``datasets`` can
    infer one schema for all of them."""
    rid, aug = str(batch["id"][i]), int(batch["aug"][i])
    meta = {"id": rid, "label": str(batch["label"][i] or ""), "split": str(batch["split"][i] or ""), "aug": aug,
            "sha": {m: str(batch[f"sha_{m}"][i] or "") for m in (*MODALITIES, "sample")},
            **{f"has_{m}": batch[m][i] is not None for m in MODALITIES},
            "aug_params": batch["aug_params"][i] or "{}", "dropped": batch["dropped"][i] or "{}",
            "meta": batch["meta"][i] or "{}", "run_id": run_id}
    sample = {"__key__": sample_key(rid, aug), "json": json.dumps(meta, sort_keys=True).encode(), "txt": b""}
    for m in MODALITIES:
        value = batch[m][i]
        if value is not None:
            sample[member_ext(m, value)] = value
            for column, ext in REGISTRY[m].extras.items():
                if column in batch and batch[column][i] is not None:
                    sample[ext] = batch[column][i]
    return sample


def richness(sample: dict) -> tuple[int, tuple[str, ...]]:
    """Sort key that puts samples with the most members first, equal member sets together."""
    members = tuple(sorted(k for k in sample if not k.startswith("_")))
    return (-len(members), members)


class TarSampleWriter:
    """A WebDataset sample as tar members ``<key>.<ext>``, extensions in sorted order, as
    ``webdataset.TarWriter`` writes them (and its reader groups them back). Written here with
    ``tarfile`` because importing ``webdataset`` imports torch (``webdataset.pytorch``): 1.3 s and
    ~450 MB in every process that writes shards, the stage actors among them. Members carry one
    whole-second mtime: a float one (webdataset's default, ``time.time()``) makes ``tarfile`` add
    a PAX header to each member, 1 KB and ~40 % of the writing CPU."""

    def __init__(self, stream, mtime: int):
        self.tar = tarfile.open(fileobj=stream, mode="w|")
        self.stream, self.mtime = stream, mtime

    def write(self, sample: dict) -> None:
        key = sample["__key__"]
        for ext in sorted(k for k in sample if not k.startswith("_")):
            value = sample[ext]
            data = value.encode("utf-8") if isinstance(value, str) else value
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise TypeError(f"sample {key!r}: .{ext} is {type(value).__name__}, not bytes or str")
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), self.mtime, 0o444
            info.uname = info.gname = "bigdata"
            self.tar.addfile(info, io.BytesIO(data))

    def close(self) -> None:
        self.tar.close()
        self.stream.close()


class ShardSink:
    """Writes samples to ``samples/<run_id>/<prefix>-NNNNNN.tar`` through the store's filesystem,
    a new shard every ``max_count`` samples. The first HEAD_SAMPLES samples of a shard are held
    and written those with the most members first: Hugging Face's WebDataset loader takes its
    columns from the first five samples of a shard and refuses the shard when their members
    differ, while any later sample may lack a member (read as null)."""

    def __init__(self, store: Store, run_id: str, max_count: int, prefix: str = "shard", create_dir: bool = True):
        self.store, self.run_id, self.max_count, self.prefix = store, run_id, max_count, prefix
        self.create_dir = create_dir
        self.shard_index, self.count, self.total = -1, 0, 0
        self._writer: TarSampleWriter | None = None
        self._head: list[dict] | None = None
        self.current = ""
        self.mtime = int(time.time())

    def _open_next(self) -> None:
        self.close()
        self.shard_index += 1
        self.current = f"samples/{self.run_id}/{self.prefix}-{self.shard_index:06d}.tar"
        path = self.store.path_of(self.current)
        if self.create_dir:
            self.store.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        self._writer = TarSampleWriter(self.store.fs.open_output_stream(path), self.mtime)
        self._head = []
        self.count = 0

    def write(self, sample: dict) -> str:
        if self._writer is None or self.count >= self.max_count:
            self._open_next()
        if self._head is None:
            self._writer.write(sample)
        else:
            self._head.append(sample)
            if len(self._head) >= HEAD_SAMPLES:
                self._write_head()
        self.count += 1
        self.total += 1
        return self.current

    def _write_head(self) -> None:
        for sample in sorted(self._head or (), key=richness):   # stable: equal sets keep their order
            self._writer.write(sample)
        self._head = None

    def close(self) -> None:
        if self._writer is not None:
            self._write_head()
            self._writer.close()     # closes the stream too
            self._writer = None


def presence(batch: Batch, m: str) -> np.ndarray:
    """Which rows have modality ``m``: the feature stage's ``has_<m>``, else whether the media are there."""
    has = batch.get(f"has_{m}")
    return np.asarray(has, dtype=bool) if has is not None else np.array([v is not None for v in batch[m]], dtype=bool)


def sequence_column(batch: Batch, field: pa.Field, rows: list[int]) -> pa.Array:
    """``<m>_seq`` (n, frames, dims) as nested lists, or ``<m>_seq_len``, for ``rows``; nulls
    where the feature stage stored no sequence."""
    values = batch.get(field.name)
    if values is None:
        return pa.nulls(len(rows), field.type)
    if field.name.endswith("_seq_len"):
        return pa.array(np.asarray(values, np.int32)[rows], pa.int32())
    seq = np.asarray(np.stack(list(values)) if values.dtype == object else values, np.float32)[rows]
    n, frames, dim = seq.shape
    inner = pa.ListArray.from_arrays(pa.array(np.arange(0, n * frames * dim + 1, dim, dtype=np.int32)),
                                     pa.array(seq.ravel(), pa.float32()))
    return pa.ListArray.from_arrays(pa.array(np.arange(0, n * frames + 1, frames, dtype=np.int32)), inner)


SHARD_WRITING = "(shard writing)"   # the stats record of writing samples to shards (not a stage)


def write_block_shards(batches: list[Batch], store_uri: str, run_id: str, max_count: int) -> list[Batch]:
    """In a stage actor: the accepted rows of one Ray Data block into shards of their own, closed
    before any row leaves the actor, so a row the driver sees is in a complete shard. The name comes
    from the rows' keys: a retried block rewrites the same files. The driver made the run's folder;
    an actor never makes it, so one left running by a killed driver cannot write into a folder
    that the next run's ``Store.recover`` removed (a local store; in object storage such a shard
    is removed by the run after). Returns the batches with a ``shard`` column, ``has_<modality>``
    filled in, and no media bytes."""
    keys = [f"{b['id'][i]}\t{b['aug'][i]}" for b in batches for i in range(num_rows(b)) if not b["reject_reason"][i]]
    digest = hashlib.sha1("\n".join(keys).encode()).hexdigest()[:16]
    shards = ShardSink(Store(store_uri), run_id, max_count, prefix=f"shard-{digest}", create_dir=False)
    out = []
    for batch in batches:
        batch = normalize_batch(batch)
        n = num_rows(batch)
        shard = np.full(n, "", dtype=object)
        for i in range(n):
            if not batch["reject_reason"][i]:
                shard[i] = shards.write(sample_record(batch, i, run_id))
        batch = drop_media(batch)
        batch["shard"] = shard
        out.append(batch)
    shards.close()
    return out


def drop_media(batch: Batch) -> Batch:
    """``has_<modality>`` filled in, then the media bytes gone: what the driver needs of a row
    whose sample is already written (or, in the feature benchmark, not wanted)."""
    n = num_rows(batch)
    for m in MODALITIES:
        batch[f"has_{m}"] = presence(batch, m)   # before the media go
        batch[m] = np.full(n, None, dtype=object)
    return batch


@dataclass
class SinkResult:
    rejects: list[dict] = field(default_factory=list)   # the stages' reject records (when not spilled)
    rejected: int = 0
    aug_rejected: int = 0
    stage_stats: dict[str, StageStats] = field(default_factory=dict)   # stage -> the sum of its block records
    staged: list[Path] = field(default_factory=list)
    dims: dict[str, int] = field(default_factory=dict)
    samples_written: int = 0


class RunSink:
    """Routes every processed row: accepted -> shards + staged features, rejected -> rejects."""

    def __init__(self, store: Store, run_id: str, fps: dict[str, str], staging: Path, shard_max: int,
                 rejects: Spill | None = None):
        self.run_id, self.fps = run_id, fps
        self.rejects = rejects   # where reject records go (a run's spill); None: kept in the result
        self.shards = ShardSink(store, run_id, shard_max)
        self.staging = staging
        self.result = SinkResult()
        self._writer: pq.ParquetWriter | None = None
        self._schema = FEATURES_SCHEMA.append(pa.field("keep", pa.string()))
        self._pending: list[pa.Table] = []   # staged rows not yet written (see _flush)
        self._pending_rows = 0

    def add(self, batch: Batch) -> None:
        batch = normalize_batch(batch)
        n = num_rows(batch)
        if n == 0:
            return
        self._collect_stats(batch)
        accepted = [i for i in range(n) if not batch["reject_reason"][i]]
        records = []
        for i in range(n):
            if batch["reject_reason"][i]:
                if int(batch["aug"][i]) == 0:
                    records.append(self._reject_row(batch, i))
                else:
                    self.result.aug_rejected += 1
        self.result.rejected += len(records)
        if self.rejects is not None:
            self.rejects.add_rows(records)
        else:
            self.result.rejects += records
        if accepted:
            self._stage_features(batch, accepted)
            self.result.samples_written += len(accepted)   # each in a shard: the actor's or the driver's

    def _collect_stats(self, batch: Batch) -> None:
        for cell in batch.get(STATS_COLUMN, ()):
            for record in decode_stats(cell):
                self.add_stats(record)

    def add_stats(self, record: StageStats) -> None:
        self.result.stage_stats.setdefault(record.stage, StageStats(record.stage)).add(record)

    def _reject_row(self, batch: Batch, i: int) -> dict:
        return reject_record(BatchRow(batch, i), self.run_id, self.fps["all"])

    def _stage_features(self, batch: Batch, rows: list[int]) -> None:
        cols: dict[str, list] = {f.name: [] for f in self._schema}
        embs = {}
        for m in MODALITIES:
            emb = batch.get(f"{m}_emb")
            if emb is not None:
                emb = np.asarray(np.stack(list(emb)) if emb.dtype == object else emb, dtype=np.float32)
                self.result.dims[m] = emb.shape[1]
            embs[m] = emb
        written = batch.get("shard")   # by the actor that made the rows, or here
        if written is None:
            start, wall = time.perf_counter(), time.time()
            written = {i: self.shards.write(sample_record(batch, i, self.run_id)) for i in rows}
            self.add_stats(StageStats(SHARD_WRITING, rows_in=len(rows), rows_out=len(rows),
                                      seconds=time.perf_counter() - start, first=wall, last=time.time()))
        has = {m: presence(batch, m) for m in MODALITIES}
        for i in rows:
            shard = written[i]
            for name in ("id", "label", "split", "aug_params", "dedup_sig", "dropped", "meta"):
                cols[name].append(str(batch[name][i]))
            cols["aug"].append(int(batch["aug"][i]))
            for m in MODALITIES:
                present = bool(has[m][i])
                cols[f"has_{m}"].append(present)
                vec = embs[m][i] if embs[m] is not None else np.zeros(0, np.float32)
                cols[f"{m}_emb"].append(vec if present else np.zeros_like(vec))
                cols[f"sha_{m}"].append(str(batch[f"sha_{m}"][i]))
                cols[f"fp_{m}"].append(self.fps[m])
            cols["sha_sample"].append(str(batch["sha_sample"][i]))
            cols["fp_sample"].append(self.fps["sample"])
            cols["shard"].append(shard)
            cols["run_id"].append(self.run_id)
            cols["keep"].append(str(batch["keep"][i]) if "keep" in batch else "")
        arrays = []
        for f in self._schema:
            if f.name.endswith(("_seq", "_seq_len")):
                arrays.append(sequence_column(batch, f, rows))
            elif f.name.endswith("_emb"):
                flat = np.concatenate([np.asarray(v, np.float32).ravel() for v in cols[f.name]]) if cols[f.name] else np.zeros(0, np.float32)
                offsets = np.cumsum([0] + [len(v) for v in cols[f.name]], dtype=np.int32)
                arrays.append(pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, pa.float32())))
            else:
                arrays.append(pa.array(cols[f.name], f.type))
        self._pending.append(pa.Table.from_arrays(arrays, schema=self._schema))
        self._pending_rows += len(rows)
        if self._pending_rows >= ROW_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        """Staged rows to Parquet in row groups of ROW_GROUP_ROWS: one ``write_table`` per stage
        batch (32 rows) cost 2.4x the CPU (0.46 vs 0.19 s for 10000 rows)."""
        if not self._pending:
            return
        if self._writer is None:
            path = self.staging / "features.parquet"
            self._writer = pq.ParquetWriter(path, self._schema)
            self.result.staged.append(path)
        self._writer.write_table(pa.concat_tables(self._pending))
        self._pending, self._pending_rows = [], 0

    def close(self) -> SinkResult:
        self.shards.close()
        self._flush()
        if self._writer is not None:
            self._writer.close()
        return self.result


class BatchRow(Mapping):
    """Row ``i`` of a batch, read as a mapping (what ``reject_record`` takes)."""

    def __init__(self, batch: Batch, i: int):
        self.batch, self.i = batch, i

    def __getitem__(self, key: str):
        return self.batch[key][self.i]

    def __iter__(self):
        return iter(self.batch)

    def __len__(self) -> int:
        return len(self.batch)

