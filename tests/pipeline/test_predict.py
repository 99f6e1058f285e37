"""``predict`` reproduces the evaluation on the test split's raw records, and refuses a config
whose stages differ from the ones the model was trained on."""
from __future__ import annotations

import copy

import json

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from core.config import ConfigError
from pipeline.demo import make_demo
from pipeline.cli import predict_records
from pipeline.runner import run
from tests.pipeline.helpers import config
from training.train import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ray_session):
    folder = tmp_path_factory.mktemp("pred")
    manifest = make_demo(folder / "data", n=120)
    store = folder / "store"
    cfg = config(folder, manifest, store, {"training": {"engine": "local", "epochs": 8, "fusion": "concat"}})
    run(cfg, log=lambda s: None)
    result = train(cfg, str(store))
    return folder, manifest, store, cfg, result


def test_predict_on_test_split_reproduces_evaluation(trained, tmp_path):
    folder, manifest, store, cfg, result = trained
    feats = DeltaTable(str(store / "features")).to_pyarrow_table(columns=["id", "split", "aug"])
    test_ids = set(feats.filter((pc.field("split") == "test") & (pc.field("aug") == 0))["id"].to_pylist())
    rows = [json.loads(l) for l in manifest.read_text().splitlines()]
    test_manifest = manifest.with_name("test-split.jsonl")
    test_manifest.write_text("".join(json.dumps(r) + "\n" for r in rows if r["id"] in test_ids))
    out = tmp_path / "pred.parquet"
    cfg2 = cfg.model_copy(update={"source": cfg.source.model_copy(update={"path": str(test_manifest)})})
    summary = predict_records(cfg2, result.model_dir, out)
    preds = pq.read_table(out).to_pylist()
    assert len(preds) == len(test_ids), summary
    acc = sum(p["prediction"] == p["label"] for p in preds) / len(preds)
    assert acc == pytest.approx(result.metrics["accuracy"], abs=1e-9)
    assert all(abs(sum(v for k, v in p.items() if k.startswith("p_")) - 1) < 1e-4 for p in preds)


def test_predict_refuses_a_different_stage_config(trained, tmp_path):
    folder, manifest, store, cfg, result = trained
    stages = copy.deepcopy(cfg.stages)
    stages["features"]["text"]["params"] = {"word_features": 256}
    other = cfg.model_copy(update={"stages": stages})
    with pytest.raises(ConfigError, match="stage features.text is configured differently"):
        predict_records(other, result.model_dir, tmp_path / "p.csv")
