"""Calibration: a model's logits, top-label expected calibration error (ECE) and its reliability
bins, summed over a stream, and temperature scaling, fitted on the validation split and kept
beside the model (``calibration.json``) so ``predict`` and serving give calibrated probabilities.

Temperature scaling divides the logits by one scalar T > 0 (Guo et al., 2017): the predicted
class never changes, only how sure the model says it is. T is the grid value minimising the
validation NLL: one streamed pass whatever the split's size (the NLL of every candidate T is
summed batch by batch), candidates 1 % apart from e^-3 to e^3, T = 1 among them.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from training.data import LABEL, Arrays, model_inputs, to_tensors
from training.fusion import FusionModel

ECE_BINS = 15
CALIBRATION_FILE = "calibration.json"
LOG_T_GRID = np.linspace(-3.0, 3.0, 601)   # log T candidates; the middle one is T = 1


@torch.no_grad()
def batch_logits(model: FusionModel, arrays: Arrays,
                 device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray | None]:
    """Logits of one batch of ``to_arrays`` columns (the caller puts the model in eval mode), and
    the per-sample modality weights when the model exposes them (``training.loop.predict_batch``
    without the softmax)."""
    embs, mask = model_inputs(to_tensors(arrays), model.modalities, device)
    logits = model(embs, mask).float().cpu().numpy()
    weights = model.last_weights.cpu().numpy() if model.exposes_weights and model.last_weights is not None else None
    return logits, weights


def predict_logits(model: FusionModel, arrays: Arrays, batch_size: int = 1024) -> np.ndarray:
    """Logits over arrays held in memory, batch by batch (bare model, eval mode, CPU)."""
    model.eval()
    n = len(next(iter(arrays.values()))) if arrays else 0
    parts = [batch_logits(model, {k: v[i:i + batch_size] for k, v in arrays.items()})[0]
             for i in range(0, n, batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0, model.n_classes), np.float32)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / T), computed as ``predict_batch`` computes its probabilities."""
    return torch.softmax(torch.as_tensor(logits, dtype=torch.float32) / temperature, dim=-1).numpy()


class Reliability:
    """Top-label reliability bins summed over batches: per equal-width confidence bin (lower
    edge open, upper closed) the row count, summed confidence and number of correct predictions."""

    def __init__(self, bins: int = ECE_BINS) -> None:
        self.bins = bins
        self.count = np.zeros(bins, np.int64)
        self.confidence = np.zeros(bins)
        self.correct = np.zeros(bins)

    def update(self, y: np.ndarray, probs: np.ndarray) -> None:
        if not len(y):
            return
        conf = probs.max(axis=1).astype(np.float64)
        idx = np.clip(np.ceil(conf * self.bins).astype(np.int64) - 1, 0, self.bins - 1)
        self.count += np.bincount(idx, minlength=self.bins)
        self.confidence += np.bincount(idx, conf, minlength=self.bins)
        self.correct += np.bincount(idx, (probs.argmax(axis=1) == y).astype(np.float64), minlength=self.bins)

    @property
    def n(self) -> int:
        return int(self.count.sum())

    def ece(self) -> float:
        """Sum over bins of (rows in bin / rows) x |accuracy - mean confidence|."""
        return float(np.abs(self.correct - self.confidence).sum() / self.n) if self.n else 0.0

    def curve(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mean confidence, accuracy, count) per bin; NaN where a bin is empty."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.confidence / self.count, self.correct / self.count, self.count


def expected_calibration_error(y: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS) -> float:
    """Top-label ECE of predictions held in memory."""
    r = Reliability(bins)
    r.update(np.asarray(y), np.asarray(probs))
    return r.ece()


class TemperatureFit:
    """The NLL of every candidate temperature, summed over batches of (logits, labels)."""

    def __init__(self, log_t: np.ndarray = LOG_T_GRID) -> None:
        self.inv_t = np.exp(-np.asarray(log_t, np.float64))
        self.nll = np.zeros(len(self.inv_t))
        self.n = 0

    def update(self, logits: np.ndarray, y: np.ndarray) -> None:
        logits = np.asarray(logits, np.float64)
        step = max(1, (1 << 20) // max(len(self.inv_t) * logits.shape[1], 1))   # ~8 MB at a time
        for i in range(0, len(y), step):
            z = self.inv_t[:, None, None] * logits[None, i:i + step]            # [T, rows, classes]
            peak = z.max(axis=2, keepdims=True)
            lse = np.log(np.exp(z - peak).sum(axis=2)) + peak[..., 0]
            picked = np.take_along_axis(z, np.asarray(y[i:i + step])[None, :, None], axis=2)[..., 0]
            self.nll += (lse - picked).sum(axis=1)
        self.n += len(y)

    def temperature(self) -> float:
        """The candidate with the lowest summed NLL (1.0 before any row)."""
        return float(1 / self.inv_t[int(np.argmin(self.nll))]) if self.n else 1.0

    def mean_nll(self, temperature: float) -> float:
        """Mean NLL at a candidate temperature (the nearest one on the grid)."""
        k = int(np.argmin(np.abs(np.log(self.inv_t) + np.log(temperature))))
        return float(self.nll[k] / self.n) if self.n else 0.0


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The temperature minimising the NLL of logits held in memory."""
    fit = TemperatureFit()
    fit.update(logits, np.asarray(y))
    return fit.temperature()


@dataclass
class Calibration:
    """What ``calibration.json`` holds: the temperature ``predict`` divides the logits by."""

    temperature: float = 1.0
    fitted_on: str | None = None         # the split T was fitted on; None: not fitted (T = 1)
    fit_rows: int = 0
    fit_nll_before: float | None = None  # mean NLL on that split at T = 1 and at T
    fit_nll_after: float | None = None


def fit_calibration(model: FusionModel, batches: Iterable[Arrays], split: str) -> Calibration:
    """Temperature scaling fitted on ``batches`` of ``split`` (one streamed pass); T = 1 when empty."""
    model.eval()
    fit = TemperatureFit()
    for arrays in batches:
        fit.update(batch_logits(model, arrays)[0], arrays[LABEL])
    if not fit.n:
        return Calibration()
    t = fit.temperature()
    return Calibration(t, split, fit.n, fit.mean_nll(1.0), fit.mean_nll(t))


def save_calibration(model_dir: Path, calibration: Calibration) -> Path:
    path = Path(model_dir) / CALIBRATION_FILE
    path.write_text(json.dumps(asdict(calibration), indent=2))
    return path


def load_calibration(model_dir: Path) -> Calibration:
    """The model's calibration; a model folder from before calibration has none (T = 1)."""
    path = Path(model_dir) / CALIBRATION_FILE
    if not path.is_file():
        return Calibration()
    saved = json.loads(path.read_text())
    calibration = Calibration(**{k: v for k, v in saved.items() if k in Calibration.__dataclass_fields__})
    if not (isinstance(calibration.temperature, (int, float)) and 0 < calibration.temperature < float("inf")):
        raise ValueError(f"{path}: temperature must be a positive number, got {calibration.temperature!r}")
    return calibration
