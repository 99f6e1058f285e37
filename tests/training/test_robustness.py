"""Robustness: test scores with only each subset of the modalities present equal masking by hand;
rows with none of a subset's modalities are left out of it; compare reports it per model."""
from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import f1_score

from tests.training.conftest import make_features, small_config, write_store
from training.compare import compare
from training.data import LABEL, prepare, read_features, take
from training.evaluate import Robustness, modality_subsets
from training.loop import predict_proba
from training.predict import load_model
from training.train import train

MODALITIES = ["image", "text", "audio"]


def test_subsets_mask_the_other_modalities_and_skip_rows_without_theirs():
    arrays = {"image_emb": np.ones((4, 2), np.float32), "image_mask": np.array([1, 1, 0, 0], np.float32),
              "text_emb": np.full((4, 3), 2, np.float32), "text_mask": np.array([1, 0, 1, 0], np.float32),
              LABEL: np.array([0, 1, 0, 1])}
    assert modality_subsets(["image", "text"]) == [("image",), ("text",), ("image", "text")]
    seen = []

    def logits_of(masked):
        seen.append(masked)
        return np.tile([5.0, 0.0], (len(masked[LABEL]), 1))   # always class 0

    r = Robustness(["image", "text"], 2)
    r.update(arrays, logits_of, full=np.tile([0.0, 5.0], (4, 1)))   # all modalities: class 1
    assert len(seen) == 2   # the all-modalities subset reuses the batch's own logits
    image_only, text_only = seen
    assert (image_only["text_mask"] == 0).all() and not image_only["text_emb"].any()
    assert image_only[LABEL].tolist() == [0, 1] and image_only["image_emb"].all()
    assert text_only[LABEL].tolist() == [0, 0] and (text_only["image_mask"] == 0).all()
    assert arrays["text_mask"].tolist() == [1, 0, 1, 0]   # the batch itself is untouched
    rows = {tuple(e["modalities"]): e for e in r.result()}
    assert rows[("image",)]["rows"] == 2 and rows[("image",)]["excluded"] == 2 and rows[("image",)]["accuracy"] == 0.5
    assert rows[("text",)]["accuracy"] == 1.0 and rows[("image", "text")]["rows"] == 3
    assert rows[("image", "text")]["accuracy"] == pytest.approx(1 / 3)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return write_store(tmp_path_factory.mktemp("robust_store"), make_features())


def test_robustness_equals_masking_by_hand(store):
    # small eval batches: the table is summed over several streamed test batches
    result = train(small_config(epochs=8, eval_batch_size=32), store, fusion="gated", name="robust")
    table = result.metrics["robustness"]
    assert [tuple(e["modalities"]) for e in table] == modality_subsets(MODALITIES)
    assert "robustness.png" in result.metrics["plots"] and (result.model_dir / "robustness.png").stat().st_size
    model = load_model(result.model_dir).model
    test = prepare(read_features(store), MODALITIES).test
    for entry in table:
        subset = tuple(entry["modalities"])
        rows = np.flatnonzero(np.logical_or.reduce([test[f"{m}_mask"] > 0 for m in subset]))
        masked = take(test, rows)
        for m in set(MODALITIES) - set(subset):
            masked[f"{m}_mask"] = np.zeros_like(masked[f"{m}_mask"])
            masked[f"{m}_emb"] = np.zeros_like(masked[f"{m}_emb"])
        probs, _ = predict_proba(model, masked)
        y, pred = masked[LABEL], probs.argmax(axis=1)
        assert entry["rows"] == len(rows) and entry["excluded"] == len(test[LABEL]) - len(rows), subset
        assert entry["accuracy"] == pytest.approx((pred == y).mean()), subset
        assert entry["macro_f1"] == pytest.approx(f1_score(y, pred, labels=range(4), average="macro", zero_division=0))
    everything = table[-1]   # every test row here has a modality: the full subset is the headline
    assert everything["excluded"] == 0 and everything["accuracy"] == result.metrics["accuracy"]
    assert max(e["accuracy"] for e in table[:3]) < everything["accuracy"]   # one modality alone is worse


def test_compare_reports_robustness_per_model(store):
    cfg = small_config(epochs=3, modalities=["image", "text"])
    path = compare(cfg, store, fusions=["late"])
    rows = json.loads((path.parent / "compare.json").read_text())
    assert [(r["fusion"], r["modalities"]) for r in rows] == [("late", ["image", "text"]), ("concat", ["image"]),
                                                              ("concat", ["text"])]
    for r in rows:
        assert {"name", "fusion", "modalities", "accuracy", "macro_f1", "roc_auc", "best_epoch"} <= set(r)
        assert r["temperature"] > 0 and 0 <= r["ece"] <= 1
        assert [e["modalities"] for e in r["robustness"]] == [list(s) for s in modality_subsets(r["modalities"])]
    text = path.read_text()
    assert "| model | modalities | branches | image alone | text alone | all |" in text
    fused = {tuple(e["modalities"]): e["accuracy"] for e in rows[0]["robustness"]}
    assert f"| late | image+text | pooled | {fused[('image',)]:.3f} | {fused[('text',)]:.3f} | " in text
    assert f"| concat | image | pooled | {rows[1]['robustness'][0]['accuracy']:.3f} | - | " in text
