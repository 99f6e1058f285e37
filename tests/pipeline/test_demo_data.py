"""The demo data's ``partial`` signal: each modality carries the trait the module docstring says
and not the other, seen through the demo's own encoders by a linear classifier (held-out accuracy)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.demo import CLASSES, _TRAITS, _audio, _image, make_demo
from stages.features.audio import LogMelAudioEncoder
from stages.features.image import HistImageEncoder

MMPIPE = str(Path(sys.executable).with_name("mmpipe"))


def linear_accuracy(x: np.ndarray, y: np.ndarray) -> float:
    """Held-out accuracy of a linear classifier on standardised features (4-fold cross-validation)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    return float(cross_val_score(model, x, y, cv=4).mean())


@pytest.fixture(scope="module")
def samples():
    rng = np.random.default_rng(0)
    labels = [CLASSES[k % 4] for k in range(96)]
    warm = np.array([_TRAITS[c][0] for c in labels])
    ordered = np.array([_TRAITS[c][1] for c in labels])
    images = HistImageEncoder().encode(HistImageEncoder().preprocess([_image(c, rng, partial=True) for c in labels]))
    enc = LogMelAudioEncoder({"sequence": 8})
    prepped = enc.preprocess([_audio(c, rng, partial=True) for c in labels])
    pooled = enc.encode(prepped)
    frames, _ = enc.sequences(prepped)
    return warm, ordered, images, pooled, frames.reshape(len(labels), -1)


def test_images_tell_warm_from_cool_and_nothing_else(samples):
    warm, ordered, images, pooled, frames = samples
    assert linear_accuracy(images, warm) >= 0.9
    assert linear_accuracy(images, ordered) <= 0.7   # chance is 0.5


def test_the_order_of_the_two_tones_is_in_the_frames_not_in_pooled_statistics(samples):
    warm, ordered, images, pooled, frames = samples
    assert linear_accuracy(frames, ordered) >= 0.9
    assert linear_accuracy(pooled, ordered) <= 0.7
    assert linear_accuracy(pooled, warm) <= 0.7      # every sample has the same two tones


def test_full_signal_is_the_default_and_an_unknown_kind_is_refused(tmp_path):
    with pytest.raises(ValueError, match="signal must be one of full, partial"):
        make_demo(tmp_path / "x", n=1, signal="strong")
    res = subprocess.run([MMPIPE, "demo", "--signal", "strong", "--out", str(tmp_path / "d"), "--store", str(tmp_path / "s")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        "mmpipe: error: --signal must be one of full, partial, got 'strong'"]
    assert not (tmp_path / "d").exists()
