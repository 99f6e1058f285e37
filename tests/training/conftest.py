"""A synthetic features store where each modality holds partial, complementary signal.

Four classes c0..c3: the image embedding tells {c0,c1} from {c2,c3}, the text embedding tells
{c0,c2} from {c1,c3}, audio carries a weak hint of the class; each modality is missing at random
(never all three). Only a fusion of image and text can name the class."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import numpy as np
import pyarrow as pa
import pytest
import torch

from core.config import Config
from core.schema import FEATURES_SCHEMA

torch.set_num_threads(1)   # tiny models: intra-op threads only fight over the 2 shared cores

DIMS = {"image": 8, "text": 12, "audio": 6}
CLASSES = ["c0", "c1", "c2", "c3"]


def make_features(n: int = 480, seed: int = 0, missing: float = 0.2, aug_copies: int = 1) -> pa.Table:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    split = rng.choice(["train", "val", "test"], n, p=[0.6, 0.2, 0.2])
    dirs = {m: rng.normal(size=d) / np.sqrt(d) * 2 for m, d in DIMS.items()}
    audio_centres = rng.normal(size=(4, DIMS["audio"])) * 0.35

    def embed(labels: np.ndarray) -> dict[str, np.ndarray]:
        k = len(labels)
        img = np.where(labels // 2 == 0, 1.0, -1.0)[:, None] * dirs["image"] + rng.normal(0, 0.5, (k, 8))
        txt = np.where(labels % 2 == 0, 1.0, -1.0)[:, None] * dirs["text"] + rng.normal(0, 0.5, (k, 12))
        aud = audio_centres[labels] + rng.normal(0, 1.0, (k, 6))
        return {"image": img, "text": txt, "audio": aud}

    def presence(k: int) -> np.ndarray:
        has = rng.random((k, 3)) >= missing
        none = ~has.any(axis=1)
        has[none, rng.integers(0, 3, none.sum())] = True
        return has

    ids = [f"s{i:05d}" for i in range(n)]
    aug = np.zeros(n, np.int32)
    # augmented copies of train rows (aug = 1..k) with fresh noise
    train_idx = np.flatnonzero(split == "train")
    for k in range(1, aug_copies + 1):
        ids += [f"s{i:05d}" for i in train_idx]
        y = np.concatenate([y, y[train_idx]])
        split = np.concatenate([split, split[train_idx]])
        aug = np.concatenate([aug, np.full(len(train_idx), k, np.int32)])
    embs, has = embed(y), presence(len(y))
    cols: dict[str, pa.Array] = {
        "id": pa.array(ids), "label": pa.array([CLASSES[i] for i in y]), "split": pa.array(split.tolist()),
        "aug": pa.array(aug, pa.int32()),
    }
    for j, m in enumerate(DIMS):
        cols[f"has_{m}"] = pa.array(has[:, j])
    for j, m in enumerate(DIMS):
        e = (embs[m] * has[:, j : j + 1]).astype(np.float32)
        cols[f"{m}_emb"] = pa.array(list(e), pa.list_(pa.float32()))
    for f in FEATURES_SCHEMA:
        if f.name not in cols:
            cols[f.name] = pa.nulls(len(y), f.type)
    return pa.table(cols, schema=FEATURES_SCHEMA)


def write_store(path, table: pa.Table) -> str:
    from deltalake import write_deltalake

    write_deltalake(f"{path}/features", table)
    return str(path)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return write_store(tmp_path_factory.mktemp("store"), make_features())


def small_config(**training) -> Config:
    base = dict(epochs=12, batch_size=32, hidden=32, lr=5e-3, dropout=0.1, modality_dropout=0.15, patience=6,
                engine="local", num_workers=2, cpus_per_worker=0.5)
    return Config.model_validate({"training": {**base, **training}})


class NoWholeTable:
    """A pyarrow dataset whose files may be listed and opened, but which is never read whole."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __getattr__(self, name):
        if name in ("to_table", "to_batches", "scanner", "head", "take"):
            raise AssertionError(f"the driver read the whole features table (Dataset.{name})")
        return getattr(self.dataset, name)


@contextmanager
def no_table_in_driver() -> Iterator[dict[str, int]]:
    """While it is open, every way this process could read the features table whole raises, and
    the streamed batches are counted (``batches``, ``max_rows``). Ray workers are other processes."""
    import training.data
    import training.stream
    import training.train

    def refuse(*a, **k):
        raise AssertionError("the driver materialised the features table")

    seen = {"batches": 0, "max_rows": 0}
    dataset, batches = training.stream.Snapshot.dataset, training.stream.Snapshot.batches

    def counted(self, *a, **k):
        for batch in batches(self, *a, **k):
            seen["batches"] += 1
            seen["max_rows"] = max(seen["max_rows"], batch.num_rows)
            yield batch

    with pytest.MonkeyPatch.context() as mp:
        for module in (training.data, training.train):
            for name in ("read_features", "prepare"):
                mp.setattr(module, name, refuse, raising=False)
        mp.setattr("core.store.Store.read", refuse)
        mp.setattr("deltalake.DeltaTable.to_pyarrow_table", refuse)
        mp.setattr(training.stream.Snapshot, "dataset", lambda self: NoWholeTable(dataset(self)))
        mp.setattr(training.stream.Snapshot, "batches", counted)
        yield seen
