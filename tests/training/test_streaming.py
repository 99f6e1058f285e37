"""Training streams the features table: classes, dims and counts from one pass over the small
columns or the commit metadata, test metrics from running counts. (The Ray engine's driver is
checked for holding no table in test_ray_train.py, which trains with ``no_table_in_driver``.)"""
from __future__ import annotations

import json

import numpy as np
import pytest
from deltalake import CommitProperties, write_deltalake
from sklearn.metrics import f1_score, precision_recall_fscore_support

import training.stream as stream
from core.config import ConfigError
from tests.training.conftest import CLASSES, DIMS, make_features, no_table_in_driver, small_config, write_store
from training.data import LABEL, prepare
from training.evaluate import RocCurves, StreamingMetrics, classification_metrics, roc_auc
from training.stream import open_snapshot, summarize
from training.train import train


@pytest.fixture(scope="module")
def aug_store(tmp_path_factory) -> str:
    return write_store(tmp_path_factory.mktemp("aug"), make_features(n=200, aug_copies=2))


@pytest.mark.parametrize("use_augmented", [True, False])
@pytest.mark.parametrize("modalities", [["image", "text", "audio"], ["audio"]])
def test_streamed_summary_matches_the_in_memory_preparation(aug_store, use_augmented, modalities):
    table = make_features(n=200, aug_copies=2)
    data = prepare(table, modalities, use_augmented=use_augmented)
    summary = summarize(open_snapshot(aug_store), modalities, use_augmented=use_augmented)
    assert summary.classes == data.classes == CLASSES
    assert summary.dims == data.dims == {m: DIMS[m] for m in modalities}
    assert summary.counts.tolist() == data.class_counts().tolist()
    splits = ("train", "val", "test")
    assert (summary.n_train, summary.n_val, summary.n_test) == tuple(len(getattr(data, s)[LABEL]) for s in splits)
    # the same rows, streamed: equal arrays, batch boundaries aside
    for split in ("train", "val", "test"):
        rows = summary.rows(split, use_augmented=use_augmented)
        batches = list(rows.stream(summary.snapshot, batch_size=37))
        for key, value in getattr(data, split).items():
            assert np.array_equal(np.concatenate([b[key] for b in batches]), value), (split, key)


def test_class_discovery_reads_only_the_small_columns(aug_store, monkeypatch):
    read: list[list[str]] = []
    batches = stream.Snapshot.batches

    def recorded(self, columns, *a, **k):
        read.append(columns)
        return batches(self, columns, *a, **k)

    monkeypatch.setattr(stream.Snapshot, "batches", recorded)
    monkeypatch.setattr(stream, "committed_dims", lambda snapshot: dict(DIMS))   # as a pipeline run records them
    summary = summarize(open_snapshot(aug_store), ["image", "text"])
    assert summary.classes == CLASSES and summary.dims == {"image": 8, "text": 12}
    assert read == [["split", "aug", "label", "has_image", "has_text"]]


def test_dims_come_from_the_commit_metadata_of_the_pinned_version(tmp_path, monkeypatch):
    uri = f"{tmp_path}/features"

    def commit(table, dims, mode):
        write_deltalake(uri, table, mode=mode,
                        commit_properties=CommitProperties(custom_metadata={"mmpipe.dims": json.dumps(dims)}))

    commit(make_features(n=40), {"image": 8, "text": 12, "audio": 6}, "error")
    commit(make_features(n=40, seed=1), {"text": 99}, "append")              # only text recomputed
    write_deltalake(uri, make_features(n=20, seed=2), mode="append")         # no metadata at all
    monkeypatch.setattr(stream, "scanned_dims", lambda *a: pytest.fail("dims were scanned, not read from metadata"))
    latest = stream.discover_dims(open_snapshot(tmp_path), ["image", "text", "audio"])
    assert latest == {"image": 8, "text": 99, "audio": 6}
    assert stream.discover_dims(open_snapshot(tmp_path, version=0), ["image", "text"]) == {"image": 8, "text": 12}
    with pytest.raises(ConfigError, match="no version 3"):
        open_snapshot(tmp_path, version=3)


def test_dims_are_scanned_when_no_commit_records_them(aug_store):
    snapshot = open_snapshot(aug_store)
    assert stream.committed_dims(snapshot) == {}
    assert stream.discover_dims(snapshot, ["audio", "image"]) == {"audio": 6, "image": 8}


def test_streamed_metrics_equal_the_whole_split_metrics():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 500)
    probs = rng.dirichlet(np.ones(4), 500).astype(np.float32)
    probs[np.arange(500), y] += rng.random(500).astype(np.float32)   # some signal
    probs /= probs.sum(axis=1, keepdims=True)
    whole = classification_metrics(y, probs, CLASSES)
    streamed = StreamingMetrics(4)
    for start in range(0, 500, 64):
        streamed.update(y[start : start + 64], probs[start : start + 64])
    assert streamed.result(CLASSES) == whole
    pred = probs.argmax(axis=1)
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=range(4), zero_division=0)
    assert whole["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"), abs=1e-12)
    assert [whole["per_class"][c]["recall"] for c in CLASSES] == pytest.approx(r.tolist(), abs=1e-12)
    # past the exact budget the ROC state is a histogram: bounded, and close to the exact AUC
    binned = RocCurves(4, exact_scores=100)
    for start in range(0, 500, 64):
        binned.update(y[start : start + 64], probs[start : start + 64])
    assert binned.ys is None
    exact = roc_auc(y, probs, 4)
    assert binned.result()["per_class"] == pytest.approx(exact["per_class"], abs=1e-3)


def test_local_engine_streams_its_reads_and_refuses_a_big_table(tmp_path, monkeypatch):
    store = write_store(tmp_path, make_features(n=160))
    with no_table_in_driver():
        metrics = train(small_config(epochs=2), store, name="small").metrics
    assert metrics["n_train"] > 0 and metrics["features_snapshot"] == 0
    monkeypatch.setattr("training.train.LOCAL_MAX_BYTES", 1000)
    with pytest.raises(ConfigError, match="training.engine=ray"):
        train(small_config(epochs=2), store, name="too-big")


def test_the_driver_guard_catches_a_whole_table_read(aug_store):
    import training.data

    with no_table_in_driver() as seen:
        with pytest.raises(AssertionError, match="materialised"):
            training.data.read_features(aug_store)
        with pytest.raises(AssertionError, match="whole features table"):
            open_snapshot(aug_store).dataset().to_table()
        assert sum(1 for _ in open_snapshot(aug_store).batches(["label"])) == seen["batches"] > 0
