"""Ray Train V2: a 2-worker CPU DDP run fed from the snapshot by Ray Data (the driver never holds
the table), recovery from a killed worker, and predict round-trip."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tests.training.conftest import make_features, no_table_in_driver, small_config, write_store
from tests.training.test_align import align_config, paired_features
from training.align import PairRows, align
from training.data import read_features
from training.predict import load_model, predict_table
from training.stream import READ_ROWS, SplitRows
from training.train import FAULT_ENV, train


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=bool(os.environ.get("RAY_LOGS")))
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def trained(ray_local, tmp_path_factory):
    store = write_store(tmp_path_factory.mktemp("ray_store"), make_features(n=240))
    cfg = small_config(engine="ray", epochs=3, fusion="attention")
    with pytest.MonkeyPatch.context() as mp, no_table_in_driver() as seen:
        mp.setattr(SplitRows, "load", lambda *a: pytest.fail("the Ray engine loaded a split into the driver"))
        result = train(cfg, store, name="ddp")
    return store, result, seen


def test_the_driver_streams_and_never_holds_the_table(trained):
    _, result, seen = trained   # trained under no_table_in_driver: nothing read the table whole
    assert seen["batches"] > 0 and seen["max_rows"] <= READ_ROWS * 64
    assert result.metrics["n"] == sum(result.metrics["per_class"][c]["support"] for c in result.metrics["classes"])


def test_two_worker_run_writes_model_metrics_and_plots(trained):
    store, result, _ = trained
    assert result.model_dir.name == "ddp"
    for f in ("metrics.json", "model.pt", "confusion_matrix.png", "training_curves.png", "modality_weights.png"):
        assert (result.model_dir / f).stat().st_size > 0, f
    metrics = json.loads((result.model_dir / "metrics.json").read_text())
    assert metrics["fusion"] == "attention" and metrics["num_workers"] == 2 and metrics["engine"] == "ray"
    assert len(metrics["history"]) == 3 and 0 <= metrics["best_epoch"] < 3
    assert metrics["accuracy"] > 0.4   # well above chance (0.25) after 3 tiny epochs
    assert np.asarray(metrics["confusion_matrix"]).sum() == metrics["n"]


def test_predict_table_reproduces_the_test_accuracy(trained):
    store, result, _ = trained
    table = read_features(store)
    test = table.filter((table["split"].to_numpy(zero_copy_only=False) == "test") & (table["aug"].to_numpy() == 0))
    out = predict_table(result.model_dir, test)
    classes = load_model(result.model_dir).classes
    assert out.column_names == ["id", "prediction", *[f"p_{c}" for c in classes]]
    probs = np.stack([out[f"p_{c}"].to_numpy() for c in classes], axis=1)
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-4)
    accuracy = np.mean(np.asarray(out["prediction"].to_pylist()) == np.asarray(test["label"].to_pylist()))
    assert accuracy == pytest.approx(result.metrics["accuracy"], abs=1e-9)


@pytest.mark.slow   # ~35 s: make test-slow (CI runs it); the streamed path is covered by the tests around it
def test_a_large_train_split_is_shuffled_by_block_order_and_a_buffer(ray_local, tmp_path, monkeypatch):
    """Past GLOBAL_SHUFFLE_BYTES the train split is not shuffled globally (its reduce tasks would
    hold whole partitions): block order plus each worker's shuffle buffer, and it still learns."""
    import ray.data

    import training.train as tt

    monkeypatch.setattr(tt, "GLOBAL_SHUFFLE_BYTES", 10_000)
    monkeypatch.setattr(ray.data.Dataset, "random_shuffle",
                        lambda *a, **k: pytest.fail("a global shuffle above GLOBAL_SHUFFLE_BYTES"))
    store = write_store(tmp_path, make_features(n=240))
    result = train(small_config(engine="ray", epochs=3, fusion="attention"), store, name="windowed")
    assert len(result.metrics["history"]) == 3 and result.metrics["accuracy"] > 0.4


@pytest.mark.slow   # ~50 s (a worker's death is noticed by polling); CI runs it through make test-slow
def test_killed_worker_resumes_from_checkpoint(ray_local, tmp_path, monkeypatch):
    store = write_store(tmp_path / "store", make_features(n=160, seed=3))
    marker = tmp_path / "crashed"
    monkeypatch.setenv(FAULT_ENV, f"2:{marker}")   # the last worker os._exit()s at epoch 2, once
    result = train(small_config(engine="ray", epochs=4, patience=10, max_failures=1), store, name="crashy")
    assert marker.exists()
    epochs = [h["epoch"] for h in result.metrics["history"]]
    assert result.metrics["resumed_at"] and result.metrics["resumed_at"][0] > 0, (result.metrics["resumed_at"], epochs)
    assert epochs == [0, 1, 2, 3], (result.metrics["resumed_at"], epochs)


@pytest.mark.slow   # ~30 s: make test-slow (CI runs it); align's loop is tested on the local engine in test_align.py
def test_align_on_the_ray_engine(tmp_path, ray_local, monkeypatch):
    """``mmpipe align`` on Ray Train (the same engine as here): two DDP workers, the pairs streamed to them from the snapshot (never loaded by the driver),
    one checkpoint per epoch in the store's Ray Train folder (what a relaunch resumes from)."""
    store = write_store(tmp_path, paired_features(400))
    monkeypatch.setattr(PairRows, "load", lambda *a: pytest.fail("the Ray engine loaded a split into the driver"))
    cfg = align_config(epochs=2, batch_size=16)
    cfg.training.engine = "ray"
    result = align(cfg, store, modalities=["image", "text"], name="ddp")
    m = result.metrics
    assert m["engine"] == "ray" and len(m["history"]) == 2 and set(m["retrieval"]) >= {"image->text", "text->image"}
    assert m["retrieval"]["image->text"]["label_precision@1"] > 0.5   # two epochs: well above chance (0.25)
    assert list((tmp_path / "models" / "_ray" / "ddp").glob("checkpoint_*"))
