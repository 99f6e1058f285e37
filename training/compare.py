"""Compare fusion strategies and unimodal baselines on the same split: compare.md + compare.json,
with each model's robustness (test accuracy with only some modalities present) and calibration."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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
    write ``<store>/models/compare.md`` (model, modalities, accuracy, macro-F1, ECE; then accuracy
    with each single modality alone and with all) and compare.json."""
    runs = comparison_runs(cfg, store, fusions)
    rows = []
    for fusion, mods in runs:
        name = f"compare-{default_name(fusion, mods)}"
        metrics = train(cfg, store, fusion=fusion, modalities=mods, name=name).metrics
        rows.append({"name": name, "fusion": fusion, "modalities": mods, "accuracy": metrics["accuracy"],
                     "macro_f1": metrics["macro_f1"], "roc_auc": metrics["roc_auc"]["macro"],
                     "best_epoch": metrics["best_epoch"], "ece": metrics["calibration"]["ece_after"],
                     "temperature": metrics["calibration"]["temperature"], "robustness": metrics["robustness"]})
    out = Path(store) / "models"
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(rows, indent=2))
    rows.sort(key=lambda r: -r["macro_f1"])
    lines = ["| model | modalities | accuracy | macro-F1 | ECE |", "|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['fusion']} | {'+'.join(r['modalities'])} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} "
                     f"| {r['ece']:.3f} |")
    path = out / "compare.md"
    path.write_text("# Fusion comparison (test split)\n\n" + "\n".join(lines) + "\n\n"
                    + robustness_table(rows, runs[0][1]) + "\n")
    return path


def robustness_table(rows: list[dict[str, Any]], modalities: list[str]) -> str:
    """compare.md's robustness section: per model, test accuracy with each single modality alone
    (the others masked; rows without it left out) and with all of the model's modalities."""
    lines = ["## Robustness (test accuracy with only these modalities present)", "",
             "The other modalities are masked as a missing one is; rows that have none of a column's modalities "
             "are left out of it, so `all` can differ from the accuracy above, which counts every test row.", "",
             "| model | modalities | " + " | ".join(f"{m} alone" for m in modalities) + " | all |",
             "|---|---|" + "---:|" * (len(modalities) + 1)]
    for r in rows:
        by_subset = {tuple(e["modalities"]): e["accuracy"] for e in r["robustness"]}
        alone = [f"{by_subset[(m,)]:.3f}" if (m,) in by_subset else "-" for m in modalities]
        lines.append(f"| {r['fusion']} | {'+'.join(r['modalities'])} | " + " | ".join(alone)
                     + f" | {by_subset[tuple(r['modalities'])]:.3f} |")
    return "\n".join(lines)
