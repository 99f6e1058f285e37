"""Compare fusion strategies and unimodal baselines on the same split: compare.md + compare.json."""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import Config
from stages.base import MODALITIES
from training.fusion import FUSIONS
from training.train import default_name, train


def _present_modalities(cfg: Config) -> list[str]:
    return [m for m in MODALITIES if m in cfg.training.modalities]


def compare(cfg: Config, store: str, fusions: list[str] | None = None) -> Path:
    """Train every fusion on all configured modalities and ``concat`` on each single modality;
    write ``<store>/models/compare.md`` (model, modalities, accuracy, macro-F1) and compare.json."""
    modalities = _present_modalities(cfg)
    runs = [(f, modalities) for f in (fusions or sorted(FUSIONS))]
    runs += [("concat", [m]) for m in modalities] if len(modalities) > 1 else []
    rows = []
    for fusion, mods in runs:
        name = f"compare-{default_name(fusion, mods)}"
        metrics = train(cfg, store, fusion=fusion, modalities=mods, name=name).metrics
        rows.append({"name": name, "fusion": fusion, "modalities": mods, "accuracy": metrics["accuracy"],
                     "macro_f1": metrics["macro_f1"], "roc_auc": metrics["roc_auc"]["macro"],
                     "best_epoch": metrics["best_epoch"]})
    out = Path(store) / "models"
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(rows, indent=2))
    lines = ["| model | modalities | accuracy | macro-F1 |", "|---|---|---:|---:|"]
    for r in sorted(rows, key=lambda r: -r["macro_f1"]):
        lines.append(f"| {r['fusion']} | {'+'.join(r['modalities'])} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} |")
    path = out / "compare.md"
    path.write_text("# Fusion comparison (test split)\n\n" + "\n".join(lines) + "\n")
    return path
