"""Test-split evaluation (whole split, on the driver), metrics.json and PNG plots."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support, roc_auc_score
from sklearn.preprocessing import label_binarize


def roc_auc(y: np.ndarray, probs: np.ndarray, n_classes: int) -> dict[str, Any]:
    """One-vs-rest ROC-AUC, macro and per class; None where a class has only one outcome in ``y``."""
    onehot = label_binarize(y, classes=list(range(n_classes)))
    if n_classes == 2:
        onehot = np.hstack([1 - onehot, onehot])
    per_class = []
    for c in range(n_classes):
        positives = onehot[:, c].sum()
        per_class.append(float(roc_auc_score(onehot[:, c], probs[:, c])) if 0 < positives < len(y) else None)
    scored = [v for v in per_class if v is not None]
    return {"macro": float(np.mean(scored)) if scored else None, "per_class": per_class}


def classification_metrics(y: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Accuracy, macro precision / recall / F1, per-class figures, confusion matrix, ROC-AUC."""
    labels = list(range(len(classes)))
    pred = probs.argmax(axis=1) if len(probs) else np.zeros(0, int)
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    mp, mr, mf, _ = precision_recall_fscore_support(y, pred, labels=labels, average="macro", zero_division=0)
    return {
        "n": int(len(y)),
        "accuracy": float(accuracy_score(y, pred)) if len(y) else 0.0,
        "macro_precision": float(mp),
        "macro_recall": float(mr),
        "macro_f1": float(mf),
        "per_class": {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
                      for i, c in enumerate(classes)},
        "confusion_matrix": confusion_matrix(y, pred, labels=labels).tolist(),
        "roc_auc": roc_auc(y, probs, len(classes)) if len(y) else {"macro": None, "per_class": []},
    }


def write_metrics(model_dir: Path, metrics: dict[str, Any]) -> Path:
    path = Path(model_dir) / "metrics.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(metrics, indent=2, sort_keys=True))
    tmp.replace(path)   # metrics.json doubles as the "run finished" marker: write it whole
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(cm: list[list[int]], classes: list[str], path: Path) -> Path:
    plt = _pyplot()
    size = max(4.0, 0.6 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    mat = np.asarray(cm)
    ax.imshow(mat, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (i, j), v in np.ndenumerate(mat):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > mat.max() / 2 else "black")
    ax.set_title("confusion matrix (test)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_curves(history: list[dict[str, Any]], best_epoch: int, path: Path) -> Path:
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(epochs, [h["train_loss"] for h in history], label="train")
    a.plot(epochs, [h["val_loss"] for h in history], label="val")
    a.set_xlabel("epoch")
    a.set_ylabel("loss")
    a.legend()
    b.plot(epochs, [h["val_macro_f1"] for h in history], label="val macro-F1")
    if best_epoch >= 0:
        b.axvline(best_epoch, color="grey", linestyle="--", label="best")
    b.set_xlabel("epoch")
    b.set_ylabel("macro-F1")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_modality_weights(weights: np.ndarray, mask: np.ndarray, modalities: list[str], path: Path) -> Path:
    """Mean weight per modality over the test samples where that modality is present."""
    plt = _pyplot()
    present = mask > 0
    means = [float(weights[present[:, i], i].mean()) if present[:, i].any() else 0.0 for i in range(len(modalities))]
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.bar(modalities, means, color="tab:blue")
    ax.set_ylabel("mean modality weight (where present)")
    ax.set_ylim(0, 1)
    ax.set_title("modality weights (test)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
