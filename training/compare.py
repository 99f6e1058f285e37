"""Compare fusion strategies, unimodal baselines and pooled vs temporal branches on the same split:
compare.md + compare.json, with each model's robustness (test accuracy with only some modalities
present) and calibration."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.config import Config
from training.fusion import FUSIONS, check_fusion
from training.train import check_features, checked_modalities, default_name, resolve_modalities, train


@dataclass(frozen=True)
class Comparison:
    """One model of the comparison: its fusion, modalities and temporal branches (the rest pooled)."""

    fusion: str
    modalities: list[str]
    branches: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return "compare-" + default_name(self.fusion, self.modalities) + "".join(
            f"-{m}.{kind}" for m, kind in self.branches.items())

    @property
    def label(self) -> str:
        return ", ".join(f"{m}:{kind}" for m, kind in self.branches.items()) or "pooled"


def comparison_runs(cfg: Config, store: str, fusions: list[str] | None = None) -> list[Comparison]:
    """What ``compare`` trains, checked before any of it starts (an unknown fusion or modality, or
    a store without features, is a ``ConfigError``): every fusion on all the modalities with the
    configured branches, and ``concat`` on each single modality; where ``training.branches`` sets
    temporal ones, also the configured fusion and those single modalities with pooled vectors."""
    fusions = [check_fusion(f) for f in (fusions or sorted(FUSIONS))]
    modalities = checked_modalities(cfg.training.modalities or []) if cfg.training.modalities else None
    check_features(store, cfg.training.features_version)
    modalities = resolve_modalities(store, modalities, cfg.training.features_version)

    def temporal(mods: list[str]) -> dict[str, str]:
        return {m: kind for m, kind in cfg.training.branches.items() if m in mods and kind != "pooled"}

    runs = [Comparison(f, modalities, temporal(modalities)) for f in fusions]
    if temporal(modalities):
        runs.append(Comparison(check_fusion(cfg.training.fusion), modalities))
    if len(modalities) > 1:
        runs += [Comparison("concat", [m], temporal([m])) for m in modalities]
        runs += [Comparison("concat", [m]) for m in modalities if temporal([m])]
    return runs


def compare(cfg: Config, store: str, fusions: list[str] | None = None) -> Path:
    """Train every model of ``comparison_runs``; write ``<store>/models/compare.md`` (model,
    modalities, branches, accuracy, macro-F1, ECE; then accuracy with each single modality alone
    and with all) and compare.json."""
    runs = comparison_runs(cfg, store, fusions)
    rows = []
    for run in runs:
        run_cfg = cfg.model_copy(update={"training": cfg.training.model_copy(update={"branches": run.branches})})
        metrics = train(run_cfg, store, fusion=run.fusion, modalities=run.modalities, name=run.name).metrics
        rows.append({"name": run.name, "fusion": run.fusion, "modalities": run.modalities, "branches": run.branches,
                     "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
                     "roc_auc": metrics["roc_auc"]["macro"], "best_epoch": metrics["best_epoch"],
                     "ece": metrics["calibration"]["ece_after"], "temperature": metrics["calibration"]["temperature"],
                     "robustness": metrics["robustness"]})
    out = Path(store) / "models"
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(rows, indent=2))
    rows.sort(key=lambda r: -r["macro_f1"])
    lines = ["| model | modalities | branches | accuracy | macro-F1 | ECE |", "|---|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['fusion']} | {'+'.join(r['modalities'])} | {_branches(r)} | {r['accuracy']:.3f} "
                     f"| {r['macro_f1']:.3f} | {r['ece']:.3f} |")
    path = out / "compare.md"
    path.write_text("# Fusion comparison (test split)\n\n" + "\n".join(lines) + "\n\n"
                    + robustness_table(rows, runs[0].modalities) + "\n")
    return path


def _branches(row: dict[str, Any]) -> str:
    return Comparison(row["fusion"], row["modalities"], row.get("branches") or {}).label


def robustness_table(rows: list[dict[str, Any]], modalities: list[str]) -> str:
    """compare.md's robustness section: per model, test accuracy with each single modality alone
    (the others masked; rows without it left out) and with all of the model's modalities."""
    lines = ["## Robustness (test accuracy with only these modalities present)", "",
             "The other modalities are masked as a missing one is; rows that have none of a column's modalities "
             "are left out of it, so `all` can differ from the accuracy above, which counts every test row.", "",
             "| model | modalities | branches | " + " | ".join(f"{m} alone" for m in modalities) + " | all |",
             "|---|---|---|" + "---:|" * (len(modalities) + 1)]
    for r in rows:
        by_subset = {tuple(e["modalities"]): e["accuracy"] for e in r["robustness"]}
        alone = [f"{by_subset[(m,)]:.3f}" if (m,) in by_subset else "-" for m in modalities]
        lines.append(f"| {r['fusion']} | {'+'.join(r['modalities'])} | {_branches(r)} | " + " | ".join(alone)
                     + f" | {by_subset[tuple(r['modalities'])]:.3f} |")
    return "\n".join(lines)
