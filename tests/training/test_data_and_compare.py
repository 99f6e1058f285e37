"""Data preparation and the in-process engine: every fusion beats the best single modality."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests.training.conftest import CLASSES, DIMS, make_features, small_config
from training.compare import compare
from training.data import LABEL, class_names, prepare, read_features


def test_prepare_maps_labels_filters_modalities_and_augmentation():
    table = make_features(n=200, aug_copies=2)
    assert class_names(table) == CLASSES
    with_aug = prepare(table, ["text", "image"], use_augmented=True)
    without = prepare(table, ["image", "text"], use_augmented=False)
    assert with_aug.modalities == ["image", "text"] and with_aug.dims == {"image": 8, "text": 12}
    assert set(with_aug.train) == {"image_emb", "image_mask", "text_emb", "text_mask", LABEL}
    assert len(with_aug.train[LABEL]) > 2.5 * len(without.train[LABEL])
    assert len(with_aug.test[LABEL]) == len(without.test[LABEL]) == len(with_aug.test_ids)
    # absent modality rows are zero and masked; train rows always have a selected modality
    absent = with_aug.train["image_mask"] == 0
    assert np.abs(with_aug.train["image_emb"][absent]).sum() == 0
    audio_only = prepare(table, ["audio"])
    assert (audio_only.train["audio_mask"] == 1).all()
    assert len(audio_only.test[LABEL]) == len(without.test[LABEL])   # same test rows for every model


def test_read_features_time_travel(tmp_path):
    from deltalake import write_deltalake

    write_deltalake(f"{tmp_path}/features", make_features(n=40))
    write_deltalake(f"{tmp_path}/features", make_features(n=60, seed=1), mode="overwrite")
    assert read_features(tmp_path).num_rows > read_features(tmp_path, version=0).num_rows
    with pytest.raises(FileNotFoundError):
        read_features(tmp_path / "missing")


def test_every_fusion_beats_the_best_single_modality(store):
    path = compare(small_config(seed=0), store)
    rows = json.loads((path.parent / "compare.json").read_text())
    single = [r["macro_f1"] for r in rows if len(r["modalities"]) == 1]
    fused = {r["fusion"]: r["macro_f1"] for r in rows if len(r["modalities"]) == 3}
    assert len(single) == 3 and set(fused) == {"concat", "late", "attention", "gated", "transformer"}
    for fusion, f1 in fused.items():
        assert f1 > max(single) + 0.1, (fusion, f1, single)
    text = path.read_text()
    assert "| model | modalities | branches | accuracy | macro-F1 |" in text and "image+text+audio | pooled" in text
    metrics = json.loads((path.parent / "compare-gated-image+text+audio" / "metrics.json").read_text())
    for key in ("accuracy", "macro_f1", "macro_precision", "macro_recall", "per_class", "confusion_matrix",
                "roc_auc", "fusion", "modalities", "classes", "best_epoch", "history"):
        assert key in metrics
    assert set(metrics["modality_weights"]) == set(DIMS)
    assert (path.parent / "compare-gated-image+text+audio" / "modality_weights.png").stat().st_size > 0


def test_train_state_round_trips_through_a_checkpoint():
    import math

    import torch

    from training.loop import TrainState, class_weights, fit_local, model_spec, run_epoch
    from training.data import iterate

    data = prepare(make_features(n=160), ["image", "text"])
    tc = small_config(epochs=3, patience=10).training
    first = fit_local(data, tc.model_copy(update={"epochs": 2}), "gated")
    steps = math.ceil(len(data.train[LABEL]) / tc.batch_size)
    resumed = TrainState(model_spec(data, tc, "gated"), tc, steps, class_weights(data, True), torch.device("cpu"))
    resumed.load_state_dict(first.state_dict())
    assert resumed.epoch == 2 and len(resumed.history) == 2 and resumed.best_state is not None
    stats = run_epoch(resumed, iterate(data.train, tc.batch_size, shuffle_seed=2), data.val)
    assert stats.epoch == 2 and [h["epoch"] for h in resumed.history] == [0, 1, 2]
