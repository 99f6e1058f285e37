"""Feature rows as training data: label mapping, modality selection, arrays.

A batch or a split is a dict of numpy arrays (``Arrays``): ``<m>_emb`` ``[N, d_m]`` float32 and
``<m>_mask`` ``[N]`` float32 per selected modality, ``label_idx`` ``[N]`` int64 (-1 when unknown).
The same column names flow through the Ray Dataset into ``iter_torch_batches``. Training reads
the table as a stream (``training.stream``); ``read_features`` and ``prepare`` are for small
tables held in memory (predict, tests).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from core.config import ConfigError
from core.store import Store
from stages.base import MODALITIES

Arrays = dict[str, np.ndarray]
LABEL = "label_idx"


class FeaturesNotFound(ConfigError, FileNotFoundError):
    """The store has no features table (yet): a user error, printed by the CLI as one line."""


def features_path(store: str | Path) -> str:
    return f"{str(store).rstrip('/')}/features"


def read_features(store: str | Path, version: int | None = None) -> pa.Table:
    """The features Delta table at ``<store>/features`` (optionally an older ``version``), read
    through the store API so an object-store URI gets its endpoint and credentials."""
    st = Store(str(store))
    dataset = st.dataset("features", version)
    if dataset is None:
        raise FeaturesNotFound(f"no features table at {st.features_uri}; run `mmpipe run` first")
    return dataset.to_table()


def check_modalities(modalities: list[str] | tuple[str, ...]) -> list[str]:
    unknown = [m for m in modalities if m not in MODALITIES]
    if unknown or not modalities:
        raise ValueError(f"modalities must be a non-empty subset of {list(MODALITIES)}, got {list(modalities)}")
    return [m for m in MODALITIES if m in modalities]   # canonical order


def class_names(table: pa.Table) -> list[str]:
    """Sorted class names seen in the train split (the label <-> index mapping saved with a model)."""
    train = table.filter(pc.equal(table["split"], "train"))
    labels = {v for v in train["label"].to_pylist() if v not in (None, "")}
    if len(labels) < 2:
        raise ValueError(f"the train split needs at least 2 labelled classes, found {sorted(labels)}")
    return sorted(labels)


def embedding_dims(table: pa.Table, modalities: list[str]) -> dict[str, int]:
    """Embedding length per modality (fixed per column; taken from the longest row)."""
    dims = {}
    for m in modalities:
        lengths = pc.list_value_length(table[f"{m}_emb"]).fill_null(0)
        dims[m] = int(pc.max(lengths).as_py() or 0)
        if dims[m] == 0:
            raise ValueError(f"column {m}_emb holds no embedding; drop {m!r} from the modalities")
    return dims


def embedding_matrix(column: pa.ChunkedArray, dim: int) -> np.ndarray:
    """An embedding column as an (n, dim) float32 matrix; null or short rows (an absent modality) are zeros."""
    n = len(column)
    col = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    lengths = pc.list_value_length(col).fill_null(0).to_numpy(zero_copy_only=False)
    if (lengths == dim).all():
        return col.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(n, dim)
    out = np.zeros((n, dim), np.float32)   # nulls / short rows (absent modality): zeros
    for i, v in enumerate(col.to_pylist()):
        if v:
            out[i, : len(v)] = v[:dim]
    return out


def sequence_shape(column: pa.ChunkedArray | pa.Array) -> list[int] | None:
    """[frames, dim] of a ``<m>_seq`` column's first non-null row, None when every row is null."""
    for value in column.drop_null().slice(0, 1).to_pylist():
        return [len(value), len(value[0]) if value else 0]
    return None


def pack_sequences(seq: pa.ChunkedArray | pa.Array, lengths: pa.ChunkedArray | pa.Array, frames: int, dim: int) -> np.ndarray:
    """``<m>_seq`` + ``<m>_seq_len`` as the model's input for a temporal branch: (n, frames * dim + 1),
    the frames flattened and the length last (``training.fusion.unpack_sequence``); nulls are zeros."""
    seq = seq.combine_chunks() if isinstance(seq, pa.ChunkedArray) else seq
    n = len(seq)
    out = np.zeros((n, frames * dim + 1), np.float32)
    present = np.flatnonzero(seq.is_valid().to_numpy(zero_copy_only=False))
    if len(present):
        values = seq.take(pa.array(present)).flatten().flatten().to_numpy(zero_copy_only=False)
        out[present, : frames * dim] = values.astype(np.float32).reshape(len(present), frames * dim)
    out[:, -1] = pc.fill_null(lengths, 0).to_numpy(zero_copy_only=False)
    return out


def to_arrays(table: pa.Table, dims: dict[str, int], classes: list[str] | None = None,
              sequences: dict[str, list[int]] | None = None) -> Arrays:
    """Numpy arrays for the selected modalities; embeddings zeroed where the modality is absent.
    A modality in ``sequences`` (modality -> [frames, dim]) comes as its packed sequence."""
    out: Arrays = {}
    for m, d in dims.items():
        mask = table[f"has_{m}"].fill_null(False).to_numpy(zero_copy_only=False).astype(np.float32)
        if sequences and m in sequences:
            emb = pack_sequences(table[f"{m}_seq"], table[f"{m}_seq_len"], *sequences[m])
        else:
            emb = embedding_matrix(table[f"{m}_emb"], d)
        out[f"{m}_emb"] = emb * mask[:, None]
        out[f"{m}_mask"] = mask
    if classes is not None:
        index = {c: i for i, c in enumerate(classes)}
        out[LABEL] = np.array([index.get(v, -1) for v in table["label"].to_pylist()], np.int64)
    return out


def take(arrays: Arrays, rows: np.ndarray) -> Arrays:
    return {k: v[rows] for k, v in arrays.items()}


def n_rows(arrays: Arrays) -> int:
    return len(next(iter(arrays.values())))


class DataInfo(Protocol):
    """What a model spec and the class weights need: ``TrainingData`` in memory, or the streamed
    ``training.stream.FeaturesSummary``."""

    classes: list[str]
    modalities: list[str]
    dims: dict[str, int]

    def class_counts(self) -> np.ndarray: ...


@dataclass
class TrainingData:
    """What training needs from the features table, already split and mapped."""

    classes: list[str]
    modalities: list[str]
    dims: dict[str, int]
    train: Arrays
    val: Arrays
    test: Arrays = field(default_factory=dict)
    test_ids: list[str] = field(default_factory=list)
    version: int | None = None
    sequences: dict[str, list[int]] = field(default_factory=dict)   # modality -> [frames, dim] (temporal branches)

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.train[LABEL], minlength=len(self.classes))


def _split(table: pa.Table, name: str, *, augmented: bool) -> pa.Table:
    rows = table.filter(pc.equal(table["split"], name))
    if not augmented:
        rows = rows.filter(pc.equal(pc.fill_null(rows["aug"], 0), 0))
    return rows


def table_sequences(table: pa.Table, modalities: list[str]) -> dict[str, list[int]]:
    """[frames, dim] of each modality's stored sequence; a ``ValueError`` when it has none."""
    out = {}
    for m in modalities:
        shape = sequence_shape(table[f"{m}_seq"]) if f"{m}_seq" in table.column_names else None
        if not shape:
            raise ValueError(f"the features hold no {m} sequences for a temporal branch: "
                             f"set stages.features.{m}.params.sequence and run again")
        out[m] = shape
    return out


def prepare(table: pa.Table, modalities: list[str], *, use_augmented: bool = True,
            classes: list[str] | None = None, branches: dict[str, str] | None = None) -> TrainingData:
    """Split, map labels, select modalities. Train keeps only labelled rows with at least one
    selected modality present (others carry no signal); val/test keep every labelled row, so all
    models — unimodal baselines included — are scored on the same samples. A modality with a
    temporal branch (``branches``) comes as its packed sequence."""
    modalities = check_modalities(modalities)
    classes = classes or class_names(table)
    sequences = table_sequences(table, [m for m in modalities if (branches or {}).get(m, "pooled") != "pooled"])
    dims = {**embedding_dims(table, [m for m in modalities if m not in sequences]),
            **{m: t * d + 1 for m, (t, d) in sequences.items()}}
    dims = {m: dims[m] for m in modalities}
    parts = {}
    for split in ("train", "val", "test"):
        arrays = to_arrays(_split(table, split, augmented=use_augmented and split == "train"), dims, classes, sequences)
        keep = arrays[LABEL] >= 0
        if split == "train":
            keep &= sum(arrays[f"{m}_mask"] for m in modalities) > 0
        parts[split] = (arrays, keep)
    test_table = _split(table, "test", augmented=False)
    test_ids = [i for i, k in zip(test_table["id"].to_pylist(), parts["test"][1]) if k]
    data = TrainingData(classes, modalities, dims, *(take(a, np.flatnonzero(k)) for a, k in parts.values()),
                        test_ids=test_ids, sequences=sequences)
    if n_rows(data.train) == 0:
        raise ValueError("no training rows: the train split is empty for these modalities")
    if n_rows(data.val) == 0:   # early stopping needs something to watch: fall back to train
        data.val = data.train
    return data


def to_arrow(arrays: Arrays) -> pa.Table:
    """Arrays as an Arrow table with fixed-size list embeddings (what Ray Data turns into tensors)."""
    cols = {}
    for k, v in arrays.items():
        if v.ndim == 2:
            cols[k] = pa.FixedSizeListArray.from_arrays(pa.array(v.ravel()), v.shape[1])
        else:
            cols[k] = pa.array(v)
    return pa.table(cols)


def shuffled(ds, seed: int):
    """A Ray Dataset shuffled with a seed that changes with every epoch (execution)."""
    import ray.data

    return ds.random_shuffle(seed=ray.data.RandomSeedConfig(seed=seed, reseed_after_execution=True))


def train_dataset(arrays: Arrays, seed: int):
    """Arrays in memory as a shuffled Ray Dataset (benchmarks; training streams, see training.stream)."""
    import ray.data

    return shuffled(ray.data.from_arrow(to_arrow(arrays)), seed)


def to_tensors(arrays: Arrays, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v, device=device) for k, v in arrays.items()}


def model_inputs(batch: dict[str, torch.Tensor], modalities: list[str],
                 device: torch.device | str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(embeddings per modality, [B, M] mask) from a batch of ``to_arrays`` columns."""
    embs = {m: batch[f"{m}_emb"].to(device, torch.float32, non_blocking=True) for m in modalities}
    mask = torch.stack([batch[f"{m}_mask"].to(device, torch.float32) for m in modalities], dim=1)
    return embs, mask


def iterate(arrays: Arrays, batch_size: int, *, shuffle_seed: int | None = None):
    """In-process batches of tensors (the local engine's stand-in for ``iter_torch_batches``)."""
    n = n_rows(arrays)
    order = np.random.default_rng(shuffle_seed).permutation(n) if shuffle_seed is not None else np.arange(n)
    for start in range(0, n, batch_size):
        yield to_tensors(take(arrays, order[start : start + batch_size]))
