"""``mmpipe predict``: raw records through the same cleanup and feature stages a model was trained
on (refusing if their fingerprints differ), then the model. Writes nothing to the store."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.config import Config, ConfigError
from pipeline.execution import cluster_facts, ensure_ray, process, runs_locally
from pipeline.plan import Lineage, build_stages, fingerprints, make_plan
from pipeline.runner import new_run_id, scan
from pipeline.schema import normalize_batch
from pipeline.sources import read_source
from stages.base import MODALITIES, StageContext

# What prediction runs: no dedup (every record gets an answer) and no augmentation.
SKIPPED = ("dedup", "augment.")


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


def predict_records(cfg: Config, model_dir: Path, out: Path) -> str:
    from training.predict import load_model

    metrics_path = Path(model_dir) / "metrics.json"
    if not metrics_path.is_file():
        raise ConfigError(f"no trained model at {model_dir} (metrics.json missing)")
    metrics = json.loads(metrics_path.read_text())
    loaded = load_model(model_dir)
    specs = [s for s in build_stages(cfg) if not s.name.startswith(SKIPPED)]
    check_fingerprints(metrics.get("stage_fingerprints", {}), specs, loaded.spec.modalities)
    records = read_source(cfg.source)
    info = cluster_facts(cfg)
    specs = [s for s in build_stages(cfg, info["num_cpus"]) if not s.name.startswith(SKIPPED)]
    fps = fingerprints(cfg, specs)
    context = StageContext(run_id=new_run_id(), seed=cfg.seed, bad_modality=cfg.bad_modality)
    scanned, _ = scan(records, cfg, context, info["num_cpus"], on_cluster=info["remote"])
    plan = make_plan(scanned, Lineage(), fps, cfg, dedup=False)
    rejects = [{"id": r["id"], "stage": r["reject_stage"], "reason": r["reject_reason"], "detail": r["reject_detail"]}
               for r in plan.rejects]
    parts = []
    local = runs_locally(plan.rows, specs, cfg)
    if plan.rows and not local:
        info = ensure_ray(cfg, info, lambda _: None)
    if plan.rows:
        for batch in process(plan.rows, specs, context, cfg, info["num_cpus"], local):
            batch = normalize_batch(batch)
            ok = np.array([not r for r in batch["reject_reason"]], dtype=bool)
            rejects += [{"id": batch["id"][i], "stage": batch["reject_stage"][i], "reason": batch["reject_reason"][i],
                         "detail": batch["reject_detail"][i]} for i in np.flatnonzero(~ok)]
            if ok.any():
                parts.append(_features(batch, ok))
    table = pa.concat_tables(parts) if parts else None
    preds = None if table is None else _predict(loaded, table)
    _write(preds, out)
    if rejects:
        rej_path = out.with_name(out.stem + ".rejects.jsonl")
        rej_path.write_text("".join(json.dumps(r) + "\n" for r in rejects))
    by_reason = Counter(r["reason"] for r in rejects)
    return (f"predicted {0 if preds is None else preds.num_rows} of {len(records)} records -> {out}"
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


def _predict(loaded, table: pa.Table) -> pa.Table:
    from training.predict import predict_table

    preds = predict_table(loaded, table)
    return preds.append_column("label", table["label"])


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
