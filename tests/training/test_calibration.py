"""Calibration: ECE, temperature scaling fitted on val (it fixes an over-confident model), the
temperature saved beside the model and applied by predict; a model folder without one loads (T = 1)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from tests.training.conftest import make_features, small_config, write_store
from training.calibration import (CALIBRATION_FILE, Reliability, TemperatureFit, expected_calibration_error,
                                  fit_temperature, load_calibration, predict_logits, softmax)
from training.data import LABEL, prepare, read_features
from training.loop import predict_proba
from training.predict import load_model, predict_table
from training.stream import open_snapshot, summarize
from training.train import FitOutcome, evaluate_and_write, train


def calibrated_logits(n: int = 4000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels drawn from softmax(logits): calibrated by construction (T = 1)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 2, (n, 4)).astype(np.float32)
    p = softmax(z).astype(np.float64)
    y = (rng.random(n)[:, None] > np.cumsum(p / p.sum(1, keepdims=True), axis=1)).sum(1)
    return z, np.minimum(y, 3)


def test_ece_by_hand():
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
    y = np.array([0, 1, 0, 1])
    # bins (13/15, 14/15]: conf .9, acc .5; (8/15, 9/15]: conf .6, acc 1; (10/15, 11/15]: conf .7, acc 1
    assert expected_calibration_error(y, probs) == pytest.approx((2 * 0.4 + 0.4 + 0.3) / 4)
    r = Reliability()
    r.update(y[:2], probs[:2])
    r.update(y[2:], probs[2:])
    assert r.ece() == pytest.approx(expected_calibration_error(y, probs)) and r.n == 4
    assert expected_calibration_error(np.zeros(0, int), np.zeros((0, 2))) == 0.0


def test_temperature_scaling_fixes_an_over_confident_model():
    from scipy.optimize import minimize_scalar
    from scipy.special import log_softmax

    z, y = calibrated_logits()
    assert fit_temperature(z, y) == pytest.approx(1.0, abs=0.05)
    over = 10 * z
    t = fit_temperature(over, y)
    assert 8 < t < 12
    before, after = expected_calibration_error(y, softmax(over)), expected_calibration_error(y, softmax(over, t))
    assert before > 0.15 and after < 0.03
    # the grid search finds the NLL minimum (to its 1 % spacing), streamed or not
    nll = lambda log_t: -log_softmax(over / np.exp(log_t), axis=1)[np.arange(len(y)), y].mean()  # noqa: E731
    assert np.log(t) == pytest.approx(minimize_scalar(nll, bounds=(-3, 3), method="bounded").x, abs=0.01)
    fit = TemperatureFit()
    for i in range(0, len(y), 333):
        fit.update(over[i:i + 333], y[i:i + 333])
    assert fit.temperature() == t and fit.n == len(y)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    store = write_store(tmp_path_factory.mktemp("calib_store"), make_features())
    result = train(small_config(epochs=8, eval_batch_size=40), store, fusion="concat", name="calib")
    return store, result


def test_metrics_report_ece_before_and_after_and_the_temperature(trained):
    _, result = trained
    calib = result.metrics["calibration"]
    assert calib["fitted_on"] == "val" and calib["fit_rows"] == result.metrics["n_val"] and calib["bins"] == 15
    assert calib["temperature"] > 0 and calib["fit_nll_after"] <= calib["fit_nll_before"]
    assert 0 <= calib["ece_before"] <= 1 and 0 <= calib["ece_after"] <= 1
    assert load_calibration(result.model_dir).temperature == calib["temperature"]
    assert "reliability.png" in result.metrics["plots"] and (result.model_dir / "reliability.png").stat().st_size


def test_temperature_scaling_lowers_the_ece_of_an_over_confident_model(trained, tmp_path):
    store, result = trained
    saved = torch.load(result.model_dir / "model.pt", weights_only=False)
    loaded = load_model(result.model_dir)
    last = [name for name, mod in loaded.model.named_modules() if isinstance(mod, torch.nn.Linear)][-1]
    state = {k: v * 10 if k in (f"{last}.weight", f"{last}.bias") else v for k, v in saved["state_dict"].items()}
    summary = summarize(open_snapshot(store), loaded.spec.modalities)
    history = result.metrics["history"]
    metrics = evaluate_and_write(tmp_path, loaded.spec, FitOutcome(state, 0, 0.0, history), summary,
                                 small_config(eval_batch_size=40).training, {})
    calib = metrics["calibration"]
    assert calib["temperature"] > 1.5 and calib["fit_nll_after"] < calib["fit_nll_before"]
    assert calib["ece_after"] < calib["ece_before"]
    assert metrics["accuracy"] == result.metrics["accuracy"]   # T never changes a prediction
    assert json.loads((tmp_path / CALIBRATION_FILE).read_text())["temperature"] == calib["temperature"]


def features_of_test(store: str):
    table = read_features(store)
    return table.filter((table["split"].to_numpy(zero_copy_only=False) == "test") & (table["aug"].to_numpy() == 0))


def test_predict_applies_the_temperature(trained, tmp_path):
    store, result = trained
    model_dir = tmp_path / "model"
    shutil.copytree(result.model_dir, model_dir)
    (model_dir / CALIBRATION_FILE).write_text(json.dumps({"temperature": 2.5, "fitted_on": "val"}))
    loaded = load_model(model_dir)
    assert loaded.temperature == 2.5
    test = features_of_test(store)
    preds = predict_table(model_dir, test)
    probs = np.stack([preds[f"p_{c}"].to_numpy() for c in loaded.classes], axis=1)
    arrays = prepare(read_features(store), loaded.spec.modalities).test
    logits = predict_logits(loaded.model, {k: v for k, v in arrays.items() if k != LABEL})
    expected = torch.softmax(torch.as_tensor(logits) / 2.5, dim=-1).numpy()
    uncalibrated, _ = predict_proba(loaded.model, arrays)
    assert np.allclose(probs, expected, atol=1e-6)
    assert np.abs(probs - uncalibrated).max() > 0.05
    assert (probs.argmax(1) == uncalibrated.argmax(1)).all()
    assert probs.max(1).mean() < uncalibrated.max(1).mean()   # T > 1: less sure


def test_a_model_folder_without_a_temperature_loads(trained, tmp_path):
    store, result = trained
    (tmp_path / "old").mkdir()
    shutil.copy(result.model_dir / "model.pt", tmp_path / "old" / "model.pt")   # as saved before calibration
    loaded = load_model(tmp_path / "old")
    assert loaded.temperature == 1.0
    test = features_of_test(store)
    preds = predict_table(loaded, test)
    arrays = prepare(read_features(store), loaded.spec.modalities).test
    uncalibrated, _ = predict_proba(loaded.model, arrays)
    assert np.array_equal(np.stack([preds[f"p_{c}"].to_numpy() for c in loaded.classes], axis=1), uncalibrated)
    (tmp_path / "old" / CALIBRATION_FILE).write_text(json.dumps({"temperature": -1}))
    with pytest.raises(ValueError, match="positive"):
        load_model(tmp_path / "old")
