"""The features table as a stream: a pinned Delta snapshot, read batch by batch on the driver or
through Ray Data for the Ray Train workers, never whole.

``summarize`` makes one pass over the small columns (split, aug, label, has_<m>) for the class
names and the row counts; ``discover_dims`` takes the embedding lengths from the run's commit
metadata (``mmpipe.dims``) or a streamed max; ``SplitRows`` says which rows form a split and turns
a batch of them into the model's columns (``training.data.to_arrays``), for both readers.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from core.config import ConfigError
from core.scan import TableScan, ray_read
from core.store import Store
from training.data import LABEL, Arrays, FeaturesNotFound, check_modalities, sequence_shape, to_arrays, to_arrow

READ_ROWS = 1024   # rows per record batch the driver reads: a few MB with wide embeddings
READ_BLOCK_BYTES = 16 << 20   # stored bytes per Ray Data read block (several times that decoded)


@dataclass(frozen=True)
class Snapshot:
    """One version of ``<store>/features``, opened with the store's storage options."""

    uri: str
    version: int                     # pinned: every pass of a run reads these rows
    storage_options: dict[str, str] | None = None
    requested: int | None = None     # the version asked for (None: the latest)

    def dataset(self) -> TableScan:
        from deltalake import DeltaTable

        from core.store import filesystem_of, snapshot_dataset

        dt = DeltaTable(self.uri, version=self.version, storage_options=self.storage_options)
        return snapshot_dataset(dt, filesystem_of(self.uri)[0])

    def batches(self, columns: list[str], filter: pc.Expression | None = None, batch_size: int = READ_ROWS,
                filter_columns: tuple[str, ...] = ()) -> Iterator[pa.RecordBatch]:
        """``columns`` of the live rows matching ``filter``, file by file with pyarrow's buffered
        page reader: the dataset scanner decodes a whole row group at a time, ~100 MB per file
        with wide embeddings; this holds about one batch. (``filter_columns``: the filter's
        columns, which the scan also finds by itself.)"""
        scan = self.dataset()
        for f in scan.files:
            yield from scan.file_batches(f, columns, filter, batch_size)

    def ray_dataset(self, columns: list[str]):
        """The snapshot as a Ray Dataset (read tasks on the cluster, the driver holds no rows).
        Blocks of about ``READ_BLOCK_BYTES`` and never more than one file each: then a small table
        is one block, and a seeded shuffle orders it as it orders the same rows held in memory."""
        return ray_read(self.dataset(), columns, READ_BLOCK_BYTES)


def open_snapshot(store: str | Path, version: int | None = None) -> Snapshot:
    """Pin ``version`` (default: the latest) so every pass of a training run reads the same rows."""
    st = Store(str(store))
    dt = st.table(st.features_uri)
    if dt is None:
        raise FeaturesNotFound(f"no features table at {st.features_uri}; run `mmpipe run` first")
    latest = dt.version()
    if version is not None and not 0 <= version <= latest:
        raise ConfigError(f"features table at {st.features_uri} has no version {version} (versions 0..{latest})")
    return Snapshot(st.features_uri, latest if version is None else version, st.storage_options, version)


# ---------------------------------------------------------------- rows of a split


@dataclass(frozen=True)
class SplitRows:
    """The rows of one split and their model columns. Train keeps labelled rows with at least one
    selected modality present; val / test keep every labelled row, originals only (aug = 0)."""

    split: str
    dims: dict[str, int]
    classes: list[str]
    originals_only: bool = True
    need_modality: bool = False
    sequences: dict[str, list[int]] = field(default_factory=dict)   # modalities read as sequences

    def filter(self) -> pc.Expression:
        expr = pc.field("split") == self.split
        if self.originals_only:
            expr &= pc.coalesce(pc.field("aug"), 0) == 0
        return expr

    def filter_columns(self) -> tuple[str, ...]:
        return ("split", "aug") if self.originals_only else ("split",)

    def columns(self) -> list[str]:
        """What the model needs (the filter's columns come with the Ray reader, see ``ray_dataset``)."""
        return ["label", *(c for m in self.dims for c in (
            (f"has_{m}", f"{m}_seq", f"{m}_seq_len") if m in self.sequences else (f"has_{m}", f"{m}_emb")))]

    def arrays(self, batch: pa.Table | pa.RecordBatch) -> Arrays:
        """The batch's rows of this split (already filtered) as model columns, unlabelled rows dropped."""
        table = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
        arrays = to_arrays(table, self.dims, self.classes, self.sequences)
        keep = arrays[LABEL] >= 0
        if self.need_modality:
            keep &= sum(arrays[f"{m}_mask"] for m in self.dims) > 0
        return arrays if keep.all() else {k: v[keep] for k, v in arrays.items()}

    def stream(self, snapshot: Snapshot, batch_size: int = READ_ROWS) -> Iterator[Arrays]:
        """This split read on this process, batch by batch."""
        for batch in snapshot.batches(self.columns(), self.filter(), batch_size, self.filter_columns()):
            arrays = self.arrays(batch)
            if len(arrays[LABEL]):
                yield arrays

    def load(self, snapshot: Snapshot) -> Arrays:
        """This split in memory (the local engine's small-data path)."""
        parts = list(self.stream(snapshot))
        if not parts:
            return self.arrays(pa.table({c: pa.array([], t) for c, t in _empty_types(self.dims, self.sequences).items()}))
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def ray_dataset(self, snapshot: Snapshot):
        columns = [*self.filter_columns(), *self.columns()]
        # Whole blocks (batch_size=None), so the UDF fuses into the read: in Ray 2.58 a map with a
        # batch_size between an unsplit read and random_shuffle loses rows (read tasks taken as blocks).
        return snapshot.ray_dataset(columns).map_batches(
            _model_columns, fn_kwargs={"rows": self}, batch_format="pyarrow", batch_size=None)


def _model_columns(batch: pa.Table, rows: SplitRows) -> pa.Table:
    """Ray Data UDF: filter a block to the split's rows and convert them (``SplitRows.arrays``)."""
    return to_arrow(rows.arrays(batch.filter(rows.filter())))


def _empty_types(dims: dict[str, int], sequences: dict[str, list[int]]) -> dict[str, pa.DataType]:
    types: dict[str, pa.DataType] = {"label": pa.string()}
    for m in dims:
        types[f"has_{m}"] = pa.bool_()
        if m in sequences:
            types[f"{m}_seq"], types[f"{m}_seq_len"] = pa.list_(pa.list_(pa.float32())), pa.int32()
        else:
            types[f"{m}_emb"] = pa.list_(pa.float32())
    return types


# ---------------------------------------------------------------- streamed aggregates


@dataclass
class FeaturesSummary:
    """What training needs to know about the snapshot before any worker starts, from one pass
    over the small columns: class names (train split) and per-split row counts."""

    classes: list[str]
    modalities: list[str]
    dims: dict[str, int]
    counts: np.ndarray              # train rows per class (the rows the model trains on)
    n_train: int
    n_val: int
    n_test: int
    snapshot: Snapshot
    sequences: dict[str, list[int]] = field(default_factory=dict)   # modality -> [frames, dim] (temporal branches)

    @property
    def version(self) -> int | None:
        """The features version asked for (None: the latest)."""
        return self.snapshot.requested

    def class_counts(self) -> np.ndarray:
        return self.counts

    def rows(self, split: str, *, use_augmented: bool = True) -> SplitRows:
        """The rows of ``split`` (val falls back to train when empty: early stopping needs a set)."""
        if split == "val" and self.n_val == 0:
            split = "train"
        if split == "train":
            return SplitRows("train", self.dims, self.classes, not use_augmented, need_modality=True,
                             sequences=self.sequences)
        return SplitRows(split, self.dims, self.classes, sequences=self.sequences)


GroupKey = tuple[str, bool, str, bool]   # (split, original, label, any selected modality present)


def group_counts(snapshot: Snapshot, modalities: list[str]) -> dict[GroupKey, int]:
    """Row counts by split, original/augmented, label and modality presence, summed batch by batch."""
    totals: dict[GroupKey, int] = {}
    columns = ["split", "aug", "label", *(f"has_{m}" for m in modalities)]
    for batch in snapshot.batches(columns, batch_size=64 * READ_ROWS):
        present = pc.fill_null(batch.column("has_" + modalities[0]), False)
        for m in modalities[1:]:
            present = pc.or_(present, pc.fill_null(batch.column(f"has_{m}"), False))
        keys = pa.table({"split": batch.column("split"), "original": pc.equal(pc.fill_null(batch.column("aug"), 0), 0),
                         "label": batch.column("label"), "present": present})
        for row in keys.group_by(["split", "original", "label", "present"]).aggregate([([], "count_all")]).to_pylist():
            key = (row["split"], row["original"], row["label"], row["present"])
            totals[key] = totals.get(key, 0) + row["count_all"]
    return totals


def summarize(snapshot: Snapshot, modalities: list[str], *, use_augmented: bool = True,
              branches: dict[str, str] | None = None) -> FeaturesSummary:
    """Classes, dims and row counts of the snapshot, streamed (see ``training.data.prepare`` for the
    in-memory rules this follows). A modality with a temporal branch is read as its sequence."""
    modalities = check_modalities(modalities)
    groups = group_counts(snapshot, modalities)
    classes = sorted({label for (split, _, label, _) in groups if split == "train" and label not in (None, "")})
    if len(classes) < 2:
        raise ValueError(f"the train split needs at least 2 labelled classes, found {classes}")
    index = {c: i for i, c in enumerate(classes)}
    counts = np.zeros(len(classes), np.int64)
    n = {"val": 0, "test": 0}
    for (split, original, label, present), k in groups.items():
        if label not in index:
            continue
        if split == "train" and present and (original or use_augmented):
            counts[index[label]] += k
        elif split in n and original:
            n[split] += k
    temporal = [m for m in modalities if (branches or {}).get(m, "pooled") != "pooled"]
    sequences = {m: discover_sequence(snapshot, m) for m in temporal}
    dims = {**discover_dims(snapshot, [m for m in modalities if m not in sequences]),
            **{m: t * d + 1 for m, (t, d) in sequences.items()}}
    summary = FeaturesSummary(classes, modalities, {m: dims[m] for m in modalities}, counts,
                              int(counts.sum()), n["val"], n["test"], snapshot=snapshot, sequences=sequences)
    if summary.n_train == 0:
        raise ValueError("no training rows: the train split is empty for these modalities")
    return summary


def committed_dims(snapshot: Snapshot) -> dict[str, int]:
    """Embedding lengths the pipeline recorded (``mmpipe.dims`` in a commit's custom metadata),
    newest commit at or before the snapshot first, per modality. Empty when no commit has them."""
    from deltalake import DeltaTable

    # history() of a table loaded at an older version numbers the commits wrongly (deltalake 1.6):
    # read it from the latest version and skip the commits after the snapshot.
    history = DeltaTable(snapshot.uri, storage_options=snapshot.storage_options).history()
    dims: dict[str, int] = {}
    for commit in sorted(history, key=lambda c: -c.get("version", -1)):
        if commit.get("version", -1) > snapshot.version or "mmpipe.dims" not in commit:
            continue
        try:
            recorded = json.loads(commit["mmpipe.dims"])
        except (TypeError, ValueError):
            continue
        for m, d in recorded.items():
            if isinstance(d, int) and d > 0:
                dims.setdefault(m, d)
    return dims


def scanned_dims(snapshot: Snapshot, modalities: list[str]) -> dict[str, int]:
    """The longest ``<m>_emb`` row per modality, one column read batch by batch."""
    dims = {}
    for m in modalities:
        longest = 0
        for batch in snapshot.batches([f"{m}_emb"], batch_size=4 * READ_ROWS):
            longest = max(longest, pc.max(pc.list_value_length(batch.column(0))).as_py() or 0)
        dims[m] = int(longest)
    return dims


def discover_sequence(snapshot: Snapshot, modality: str) -> list[int]:
    """[frames, dim] of the modality's stored sequences (the first stored one; the stage pads all
    to one shape), read column batch by batch until one is found."""
    for batch in snapshot.batches([f"{modality}_seq"], batch_size=READ_ROWS):
        shape = sequence_shape(batch.column(0))
        if shape:
            return shape
    raise ValueError(f"the features hold no {modality} sequences for a temporal branch: "
                     f"set stages.features.{modality}.params.sequence and run again")


def discover_dims(snapshot: Snapshot, modalities: list[str]) -> dict[str, int]:
    """Embedding length per modality: recorded by the run that wrote it, else scanned."""
    recorded = committed_dims(snapshot)
    missing = [m for m in modalities if m not in recorded]
    dims = {**recorded, **(scanned_dims(snapshot, missing) if missing else {})}
    for m in modalities:
        if dims[m] == 0:
            raise ValueError(f"column {m}_emb holds no embedding; drop {m!r} from the modalities")
    return {m: dims[m] for m in modalities}
