"""Training reads an ``s3://`` store through the store API (endpoint, credentials, allow-http):
``mmpipe run`` writes the store on S3 (moto on loopback), ``train`` reads it, and ``predict``
uses the model trained from it; Ray Data reads the same snapshot for the Ray engine's workers."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from core.config import ConfigError
from core.store import Store
from pipeline.cli import predict_records
from pipeline.demo import make_demo
from pipeline.runner import run
from tests.pipeline.helpers import config
from tests.pipeline.test_s3_store import BUCKET, s3  # noqa: F401  (the moto server fixture)
from training.data import LABEL, read_features
from training.stream import open_snapshot, summarize
from training.train import train


@pytest.fixture(scope="module")
def s3_store(s3, ray_session, tmp_path_factory):   # s3 first: Ray's workers inherit its AWS_* variables
    folder = tmp_path_factory.mktemp("s3train")
    manifest = make_demo(folder / "data", n=40)
    uri = f"s3://{BUCKET}/train-store"
    cfg = config(folder, manifest, uri, {"training": {"engine": "local", "epochs": 2, "fusion": "concat"}})
    record = run(cfg, log=lambda s: None).record
    return folder, manifest, uri, cfg, record


def test_train_and_predict_from_an_s3_store(s3_store, tmp_path, monkeypatch):
    folder, manifest, uri, cfg, record = s3_store
    monkeypatch.chdir(tmp_path)   # train() puts models/ under Path(store), a relative path for a URI
    result = train(cfg, uri)
    metrics = json.loads((result.model_dir / "metrics.json").read_text())
    assert metrics["engine"] == "local" and metrics["features_version"] is None
    assert metrics["n_train"] > 0 and metrics["stage_fingerprints"]

    out = tmp_path / "pred.jsonl"
    predict_records(cfg, result.model_dir, out)
    predicted = {json.loads(line)["id"] for line in out.read_text().splitlines()}
    store = Store(uri)
    accepted = set(store.read("features", filter=pc.field("aug") == 0, columns=["id"])["id"].to_pylist())
    rejects = store.read("rejects", columns=["id", "reason"])
    duplicates = {i for i, r in zip(rejects["id"].to_pylist(), rejects["reason"].to_pylist()) if r == "duplicate"}
    assert len(accepted) == record["counts"]["accepted"] > 0
    assert predicted == accepted | duplicates   # predict runs no dedup: a duplicate is predicted too


def test_missing_table_or_version_on_s3_is_a_user_error(s3_store):
    _, _, uri, _, record = s3_store
    latest = record["versions"]["features"]
    assert read_features(uri, version=latest).num_rows == read_features(uri).num_rows
    with pytest.raises(ConfigError, match=f"no version {latest + 1}"):
        read_features(uri, version=latest + 1)
    with pytest.raises(ConfigError, match=rf"s3://{BUCKET}/no-store/features; run `mmpipe run` first"):
        read_features(f"s3://{BUCKET}/no-store")


def test_the_ray_engine_reads_the_s3_snapshot_through_ray_data(s3_store):
    """What the Ray engine gives its workers: read tasks that open the snapshot on S3 with the
    store's storage options, rows equal to the driver's streamed read of the same split."""
    _, _, uri, cfg, _ = s3_store
    summary = summarize(open_snapshot(uri), ["image", "text", "audio"])
    rows = summary.rows("train")
    remote = rows.ray_dataset(summary.snapshot).to_arrow_refs()
    import ray

    read = pa.concat_tables(ray.get(remote))
    streamed = list(rows.stream(summary.snapshot))
    assert read.num_rows == summary.n_train == sum(len(b[LABEL]) for b in streamed) > 0
    assert sorted(read[LABEL].to_pylist()) == sorted(np.concatenate([b[LABEL] for b in streamed]).tolist())
