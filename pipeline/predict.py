"""``mmpipe predict``'s pipeline half: raw records through the same cleanup and feature stages a model
was trained on (refusing if their fingerprints differ). The CLI hands the features to the model.
Writes nothing to the store."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from core.config import Config, ConfigError
from core.schema import normalize_batch, reject_record
from pipeline.orchestration import Pipeline
from pipeline.plan import Lineage
from pipeline.runner import new_run_id
from pipeline.sinks import BatchRow
from pipeline.sources import read_source
from stages.base import MODALITIES


def check_fingerprints(model_fps: dict[str, str], specs, modalities: list[str]) -> None:
    if not model_fps:
        raise ConfigError("the model records no stage fingerprints; retrain it with this version of mmpipe")
    for spec in specs:
        if spec.modality in modalities and spec.name in model_fps and model_fps[spec.name] != spec.fingerprint:
            raise ConfigError(f"stage {spec.name} is configured differently from the run the model was trained on; "
                              "use the training config")
    for name in model_fps:
        m = name.split(".")[1] if name.count(".") else None
        if name.startswith(("cleanup.", "features.")) and m in modalities and name not in {s.name for s in specs}:
            raise ConfigError(f"stage {name} was part of training but is not enabled in this config")


@dataclass
class Featurized:
    """Raw records through the inference stages: the features of the accepted ones, the rejects."""

    table: pa.Table | None
    rejects: list[dict]
    n_records: int


def featurize(cfg: Config, model_fps: dict[str, str], modalities: list[str]) -> Featurized:
    """``cfg.source`` through the same cleanup and feature stages a model was trained with (a run
    without dedup, augmentation or commit), refusing when their fingerprints differ."""
    pipe = Pipeline.build(cfg, new_run_id(), include=lambda stage: stage.inference)
    check_fingerprints(model_fps, pipe.specs, modalities)
    records = read_source(cfg.source)
    rejects, parts = [], []
    with pipe:
        scanned, _ = pipe.scan_records(records)
        plan = pipe.plan(scanned, Lineage(), dedup=False)
        rejects = [_reject(r) for r in plan.rejects]
        for batch in pipe.process(plan):
            batch = normalize_batch(batch)
            ok = np.array([not r for r in batch["reject_reason"]], dtype=bool)
            rejects += [_reject(BatchRow(batch, i)) for i in np.flatnonzero(~ok)]
            if ok.any():
                parts.append(_features(batch, ok))
    return Featurized(pa.concat_tables(parts) if parts else None, rejects, len(records))


def _reject(row) -> dict:
    record = reject_record(row, "")
    return {k: record[k] for k in ("id", "stage", "reason", "detail")}


def write_predictions(preds: pa.Table | None, rejects: list[dict], out: Path) -> None:
    """Predictions to ``out`` (.csv, .jsonl or .parquet); rejects beside it (``.rejects.jsonl``)."""
    _write(preds, out)
    if rejects:
        out.with_name(out.stem + ".rejects.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rejects))


def summary(n_predicted: int, n_records: int, rejects: list[dict], out: Path) -> str:
    by_reason = Counter(r["reason"] for r in rejects)
    return (f"predicted {n_predicted} of {n_records} records -> {out}"
            + (f"\nrejected {len(rejects)}: " + ", ".join(f"{k}={v}" for k, v in sorted(by_reason.items())) if rejects else ""))


def _features(batch: dict, ok: np.ndarray) -> pa.Table:
    cols = {"id": pa.array(batch["id"][ok].tolist(), pa.string()),
            "label": pa.array([str(v) for v in batch["label"][ok]], pa.string())}
    for m in MODALITIES:
        has = batch.get(f"has_{m}")
        cols[f"has_{m}"] = pa.array(np.asarray(has[ok], bool) if has is not None else np.zeros(ok.sum(), bool))
        emb = batch.get(f"{m}_emb")
        emb = np.zeros((int(ok.sum()), 0), np.float32) if emb is None else np.asarray(np.stack(list(emb[ok])), np.float32)
        cols[f"{m}_emb"] = pa.array(list(emb), pa.list_(pa.float32()))
    return pa.table(cols)


def _write(preds: pa.Table | None, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    if preds is None:
        preds = pa.table({"id": pa.array([], pa.string()), "prediction": pa.array([], pa.string())})
    if out.suffix == ".parquet":
        pq.write_table(preds, out)
    elif out.suffix == ".csv":
        pacsv.write_csv(preds, out)
    elif out.suffix in (".jsonl", ".json"):
        out.write_text("".join(json.dumps(r) + "\n" for r in preds.to_pylist()))
    else:
        raise ConfigError(f"unknown output type {out.suffix!r} (use .csv, .jsonl or .parquet)")
