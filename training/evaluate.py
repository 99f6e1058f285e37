"""Test-split evaluation streamed batch by batch (confusion counts, ROC state, modality-weight
sums, per-subset confusion counts: bounded, whatever the split's size), metrics.json and PNG plots.

Robustness scores the model on every non-empty subset of its modalities, the others fed as an
absent modality is (mask 0, embedding zeros). A row that has none of a subset's modalities is left
out of that subset's scores (``excluded`` counts them): the model would see no modality at all and
answer the same for every such row, which says nothing about the subset; so "image alone" is the
score on the rows that have an image.
"""
from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from training.data import LABEL, Arrays, take

if TYPE_CHECKING:
    from training.calibration import Reliability

EXACT_ROC_SCORES = 4_000_000   # scores kept for an exact ROC-AUC (16 MB); beyond, histograms
ROC_BINS = 1 << 14


def roc_auc(y: np.ndarray, probs: np.ndarray, n_classes: int) -> dict[str, Any]:
    """One-vs-rest ROC-AUC, macro and per class; None where a class has only one outcome in ``y``."""
    from sklearn.metrics import roc_auc_score   # ~1 s of imports: not on the way to a CLI error
    from sklearn.preprocessing import label_binarize

    onehot = label_binarize(y, classes=list(range(n_classes)))
    if n_classes == 2:
        onehot = np.hstack([1 - onehot, onehot])
    per_class = []
    for c in range(n_classes):
        positives = onehot[:, c].sum()
        per_class.append(float(roc_auc_score(onehot[:, c], probs[:, c])) if 0 < positives < len(y) else None)
    return _roc_summary(per_class)


def _roc_summary(per_class: list[float | None]) -> dict[str, Any]:
    scored = [v for v in per_class if v is not None]
    return {"macro": float(np.mean(scored)) if scored else None, "per_class": per_class}


class Confusion:
    """A confusion matrix summed over batches, and the scores read from it (sklearn's definitions,
    zero where undefined)."""

    def __init__(self, n_classes: int) -> None:
        self.matrix = np.zeros((n_classes, n_classes), np.int64)

    def update(self, y: np.ndarray, pred: np.ndarray) -> None:
        k = len(self.matrix)
        self.matrix += np.bincount(np.asarray(y) * k + np.asarray(pred), minlength=k * k).reshape(k, k)

    @property
    def n(self) -> int:
        return int(self.matrix.sum())

    def accuracy(self) -> float:
        return float(np.trace(self.matrix) / self.n) if self.n else 0.0

    def per_class(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(precision, recall, F1, support) per class."""
        tp = np.diag(self.matrix).astype(np.float64)
        support, predicted = self.matrix.sum(axis=1), self.matrix.sum(axis=0)
        precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
        recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
        denom = support + predicted
        f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
        return precision, recall, f1, support

    def macro_f1(self) -> float:
        return float(self.per_class()[2].mean())


class RocCurves:
    """One-vs-rest ROC-AUC over a stream: exact while at most ``exact_scores`` scores have been
    seen (they are kept), then per class a histogram of scores per outcome, so memory stays
    bounded; a histogram AUC counts a positive and a negative in the same bin as a tie."""

    def __init__(self, n_classes: int, exact_scores: int = EXACT_ROC_SCORES, bins: int = ROC_BINS) -> None:
        self.n_classes, self.exact_scores, self.bins = n_classes, exact_scores, bins
        self.ys: list[np.ndarray] | None = []
        self.probs: list[np.ndarray] = []
        self.kept = 0
        self.hist = np.zeros((n_classes, 2, bins), np.int64)   # [class, positive?, bin]

    def update(self, y: np.ndarray, probs: np.ndarray) -> None:
        if self.ys is not None:
            self.ys.append(np.asarray(y))
            self.probs.append(np.asarray(probs, np.float32))
            self.kept += probs.size
            if self.kept > self.exact_scores:   # too many to keep: fold them into histograms
                ys, ps, self.ys, self.probs = self.ys, self.probs, None, []
                for y_, p_ in zip(ys, ps):
                    self._add(y_, p_)
            return
        self._add(np.asarray(y), np.asarray(probs))

    def _add(self, y: np.ndarray, probs: np.ndarray) -> None:
        idx = np.clip((probs * self.bins).astype(np.int64), 0, self.bins - 1)
        for c in range(self.n_classes):
            positive = (y == c).astype(np.int64)
            self.hist[c] += np.bincount(positive * self.bins + idx[:, c], minlength=2 * self.bins).reshape(2, self.bins)

    def result(self) -> dict[str, Any]:
        if self.ys is not None:
            if not self.ys or not sum(len(y) for y in self.ys):
                return {"macro": None, "per_class": []}
            return roc_auc(np.concatenate(self.ys), np.concatenate(self.probs), self.n_classes)
        per_class = []
        for neg, pos in self.hist:
            n_pos, n_neg = pos.sum(), neg.sum()
            if n_pos == 0 or n_neg == 0:
                per_class.append(None)
                continue
            below = np.cumsum(neg) - neg   # negatives in lower bins
            per_class.append(float((pos * (below + 0.5 * neg)).sum() / (n_pos * n_neg)))
        return _roc_summary(per_class)


class StreamingMetrics:
    """The test-split metrics, updated batch by batch."""

    def __init__(self, n_classes: int, exact_roc_scores: int = EXACT_ROC_SCORES) -> None:
        self.confusion = Confusion(n_classes)
        self.roc = RocCurves(n_classes, exact_roc_scores)

    def update(self, y: np.ndarray, probs: np.ndarray) -> None:
        if len(y):
            self.confusion.update(y, probs.argmax(axis=1))
            self.roc.update(y, probs)

    def result(self, classes: list[str]) -> dict[str, Any]:
        """Accuracy, macro precision / recall / F1, per-class figures, confusion matrix, ROC-AUC."""
        c = self.confusion
        p, r, f, s = c.per_class()
        return {
            "n": c.n,
            "accuracy": c.accuracy(),
            "macro_precision": float(p.mean()),
            "macro_recall": float(r.mean()),
            "macro_f1": float(f.mean()),
            "per_class": {name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                                 "support": int(s[i])} for i, name in enumerate(classes)},
            "confusion_matrix": c.matrix.tolist(),
            "roc_auc": self.roc.result(),
        }


def classification_metrics(y: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """``StreamingMetrics`` over one batch: the metrics of predictions held in memory."""
    metrics = StreamingMetrics(len(classes))
    metrics.update(np.asarray(y), probs)
    return metrics.result(classes)


class ModalityWeights:
    """Sums of a fusion's per-sample modality weights: the mean over all samples (metrics.json)
    and the mean over the samples where each modality is present (the plot)."""

    def __init__(self, modalities: list[str]) -> None:
        self.modalities = modalities
        k = len(modalities)
        self.total, self.present_total, self.present = np.zeros(k), np.zeros(k), np.zeros(k)
        self.n = 0

    def update(self, weights: np.ndarray, mask: np.ndarray) -> None:
        present = mask > 0
        self.total += weights.sum(axis=0, dtype=np.float64)
        self.present_total += np.where(present, weights, 0).sum(axis=0, dtype=np.float64)
        self.present += present.sum(axis=0)
        self.n += len(weights)

    def mean(self) -> dict[str, float]:
        return dict(zip(self.modalities, (self.total / max(self.n, 1)).round(4).tolist()))

    def mean_where_present(self) -> list[float]:
        return [float(t / p) if p else 0.0 for t, p in zip(self.present_total, self.present)]


def modality_subsets(modalities: list[str]) -> list[tuple[str, ...]]:
    """Every non-empty subset of ``modalities``, smallest first, each in their order."""
    return [s for k in range(1, len(modalities) + 1) for s in combinations(modalities, k)]


def keep_only(arrays: Arrays, keep: tuple[str, ...], modalities: list[str]) -> Arrays:
    """``arrays`` with every modality outside ``keep`` absent, as ``to_arrays`` feeds an absent
    modality: mask 0, embedding zeros."""
    out = dict(arrays)
    for m in modalities:
        if m not in keep:
            out[f"{m}_mask"] = np.zeros_like(arrays[f"{m}_mask"])
            out[f"{m}_emb"] = np.zeros_like(arrays[f"{m}_emb"])
    return out


class Robustness:
    """Accuracy and macro-F1 with only each subset of the modalities present, summed over batches
    (a confusion matrix per subset); rows with none of a subset's modalities are left out of it."""

    def __init__(self, modalities: list[str], n_classes: int) -> None:
        self.modalities = list(modalities)
        self.subsets = modality_subsets(self.modalities)
        self.scores = [Confusion(n_classes) for _ in self.subsets]
        self.n = 0

    def update(self, arrays: Arrays, logits_of: Callable[[Arrays], np.ndarray],
               full: np.ndarray | None = None) -> None:
        """Score one batch under every subset: ``logits_of`` gives the logits of masked arrays;
        ``full``, the logits of the batch as it is, serves the subset of every modality."""
        y = arrays[LABEL]
        self.n += len(y)
        present = {m: arrays[f"{m}_mask"] > 0 for m in self.modalities}
        for subset, confusion in zip(self.subsets, self.scores):
            rows = np.flatnonzero(np.logical_or.reduce([present[m] for m in subset]))
            if not len(rows):
                continue
            if full is not None and len(subset) == len(self.modalities):
                logits = full[rows]
            else:
                logits = logits_of(keep_only(take(arrays, rows), subset, self.modalities))
            confusion.update(y[rows], logits.argmax(axis=1))

    def result(self) -> list[dict[str, Any]]:
        """One row per subset: its modalities, accuracy, macro-F1, rows scored and rows left out."""
        return [{"modalities": list(s), "accuracy": c.accuracy(), "macro_f1": c.macro_f1(), "rows": c.n,
                 "excluded": self.n - c.n} for s, c in zip(self.subsets, self.scores)]


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


def plot_modality_weights(means: list[float], modalities: list[str], path: Path) -> Path:
    """Mean weight per modality over the test samples where that modality is present."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.bar(modalities, means, color="tab:blue")
    ax.set_ylabel("mean modality weight (where present)")
    ax.set_ylim(0, 1)
    ax.set_title("modality weights (test)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_robustness(table: list[dict[str, Any]], path: Path) -> Path:
    """Heat map: accuracy and macro-F1 (columns) with only each subset of the modalities present (rows)."""
    plt = _pyplot()
    values = np.array([[r["accuracy"], r["macro_f1"]] for r in table])
    labels = [f"{'+'.join(r['modalities'])} (n={r['rows']})" for r in table]
    fig, ax = plt.subplots(figsize=(5.5, max(2.5, 0.45 * len(table) + 1.5)))
    ax.imshow(values, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks([0, 1], ["accuracy", "macro-F1"])
    ax.set_yticks(range(len(labels)), labels)
    for (i, j), v in np.ndenumerate(values):
        ax.text(j, i, f"{v:.3f}", ha="center", va="center", color="white" if v < 0.6 else "black")
    ax.set_title("only these modalities present (test)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_reliability(curves: list[tuple[str, Reliability]], path: Path) -> Path:
    """Reliability diagram: accuracy against mean confidence per bin, one line per (label, bins)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.plot([0, 1], [0, 1], "--", color="grey", label="calibrated")
    for label, bins in curves:
        confidence, accuracy, count = bins.curve()
        filled = count > 0
        ax.plot(confidence[filled], accuracy[filled], "o-", markersize=4, label=f"{label} (ECE {bins.ece():.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel(f"confidence (top label, {curves[0][1].bins} bins)")
    ax.set_ylabel("accuracy")
    ax.set_title("reliability (test)")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
