"""Compare fusion strategies and unimodal baselines on the same split: compare.md + compare.json."""
from __future__ import annotations

import json
from pathlib import Path

from core.config import Config
from training.fusion import FUSIONS, check_fusion
from training.train import check_features, checked_modalities, default_name, resolve_modalities, train


def comparison_runs(cfg: Config, store: str, fusions: list[str] | None = None) -> list[tuple[str, list[str]]]:
    """The (fusion, modalities) pairs ``compare`` trains, checked before any of them starts: an
    unknown fusion or modality, or a store without features, is a ``ConfigError``."""
    fusions = [check_fusion(f) for f in (fusions or sorted(FUSIONS))]
    modalities = checked_modalities(cfg.training.modalities or []) if cfg.training.modalities else None
    check_features(store, cfg.training.features_version)
    modalities = resolve_modalities(store, modalities, cfg.training.features_version)
    runs = [(f, modalities) for f in fusions]
    return runs + ([("concat", [m]) for m in modalities] if len(modalities) > 1 else [])


def compare(cfg: Config, store: str, fusions: list[str] | None = None) -> Path:
    """Train every fusion on all configured modalities and ``concat`` on each single modality;
    write ``<store>/models/compare.md`` (model, modalities, accuracy, macro-F1) and compare.json."""
    runs = comparison_runs(cfg, store, fusions)
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
