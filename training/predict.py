"""Load a trained fusion model and score feature rows (the ``predict`` command's core); the
probabilities are the calibrated ones: softmax(logits / T), T from ``calibration.json`` (1 for a
model folder from before calibration)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from training.calibration import load_calibration, predict_logits, softmax
from training.data import to_arrays
from training.fusion import FusionModel
from training.loop import ModelSpec


@dataclass
class LoadedModel:
    model: FusionModel
    spec: ModelSpec
    temperature: float = 1.0   # probabilities are softmax(logits / temperature)

    @property
    def classes(self) -> list[str]:
        return self.spec.classes


def load_model(model_dir: str | Path) -> LoadedModel:
    """Rebuild the best checkpoint saved by ``train`` (model.pt) in eval mode, on the CPU, with its
    temperature."""
    path = Path(model_dir) / "model.pt"
    if not path.is_file():
        raise FileNotFoundError(f"no model at {path}; train one with `mmpipe train`")
    saved = torch.load(path, map_location="cpu", weights_only=False)
    spec = ModelSpec(**saved["spec"])
    model = spec.build()
    model.load_state_dict(saved["state_dict"])
    return LoadedModel(model.eval(), spec, load_calibration(Path(model_dir)).temperature)


def predict_table(model_dir: str | Path | LoadedModel, features: pa.Table, batch_size: int = 1024) -> pa.Table:
    """``id``, ``prediction`` (class name) and one ``p_<class>`` column per class for each row of a
    features table (FEATURES_SCHEMA columns; modalities the model does not use are ignored)."""
    loaded = model_dir if isinstance(model_dir, LoadedModel) else load_model(model_dir)
    arrays = to_arrays(features, loaded.spec.dims, sequences=loaded.spec.sequences)
    probs = softmax(predict_logits(loaded.model, arrays, batch_size), loaded.temperature)
    classes = np.asarray(loaded.classes, dtype=object)
    cols = {"id": features["id"], "prediction": pa.array(classes[probs.argmax(axis=1)].tolist(), pa.string())}
    cols.update({f"p_{c}": pa.array(probs[:, i], pa.float32()) for i, c in enumerate(loaded.classes)})
    return pa.table(cols)
