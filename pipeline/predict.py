"""``mmpipe predict``'s pipeline half, which ``mmpipe serve`` shares: raw records through the same
cleanup and feature stages a model was trained on (refusing if their fingerprints differ). The
caller hands the features to the model. Writes nothing to the store."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from core.config import Config, ConfigError
from core.schema import FEATURES_SCHEMA, normalize_batch, reject_record
from pipeline.orchestration import Pipeline
from pipeline.plan import Lineage, Plan
from pipeline.runner import new_run_id
from pipeline.sinks import BatchRow, sequence_column
from pipeline.sources import SourceRecord, read_source
from stages.base import MODALITIES, StageContext, object_column


def read_model_metrics(model_dir: Path) -> dict:
    """A trained model's ``metrics.json`` (its classes, stage fingerprints, ...)."""
    path = Path(model_dir) / "metrics.json"
    if not path.is_file():
        raise ConfigError(f"no trained model at {model_dir} (metrics.json missing)")
    return json.loads(path.read_text())


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


@dataclass
class InferencePipeline(Pipeline):
    """The run's pipeline with its own folder for fetched http(s) bodies (serving points it at a
    per-batch temporary folder; a run keeps them in the store's cache)."""

    cache_dir: str = ""

    @property
    def context(self) -> StageContext:
        context = super().context
        return context.model_copy(update={"cache_dir": self.cache_dir}) if self.cache_dir else context


class Featurizer:
    """The inference stages of one config (no dedup, augmentation or commit), resolved once and
    checked against the fingerprints a model was trained with: ``predict`` runs it once over the
    source, serving once per batch. ``resident``: the stages stay loaded in this process across
    calls (a serving replica), instead of the pass choosing between this process and Ray Data.
    One call at a time."""

    def __init__(self, cfg: Config, model_fps: dict[str, str], modalities: list[str],
                 connect: bool = True, resident: bool = False):
        self.pipe = InferencePipeline.build(cfg, new_run_id(), include=lambda stage: stage.inference, connect=connect)
        check_fingerprints(model_fps, self.pipe.specs, modalities)
        self._chain = None
        if resident:
            from pipeline.execution import StageChain

            self._chain = StageChain([s.to_actor for s in self.pipe.specs], self.pipe.context.model_dump(),
                                     cfg.execution.batch_size)

    def __call__(self, records: list[SourceRecord], cache_dir: str = "") -> Featurized:
        """Features of ``records``; ``cache_dir``: where fetched http(s) bodies go for this call."""
        pipe = self.pipe
        pipe.cache_dir = cache_dir
        parts = []
        with pipe:
            scanned, _ = pipe.scan_records(records)
            plan = pipe.plan(scanned, Lineage(), dedup=False)
            rejects = [_reject(r) for r in plan.rejects]
            for batch in self._process(plan):
                batch = normalize_batch(batch)
                ok = np.array([not r for r in batch["reject_reason"]], dtype=bool)
                rejects += [_reject(BatchRow(batch, i)) for i in np.flatnonzero(~ok)]
                if ok.any():
                    parts.append(_features(batch, ok))
        return Featurized(pa.concat_tables(parts) if parts else None, rejects, len(records))

    def _process(self, plan: Plan) -> Iterable[dict]:
        if self._chain is None or not plan.rows:
            return self.pipe.process(plan)
        self.pipe.open_stages(self.pipe.specs, local=True, incoming=len(plan.rows))
        return _run_resident(self._chain, plan.rows, self.pipe.cfg.execution.batch_size)


def featurize(cfg: Config, model_fps: dict[str, str], modalities: list[str]) -> Featurized:
    """``cfg.source`` through the same cleanup and feature stages a model was trained with (a run
    without dedup, augmentation or commit), refusing when their fingerprints differ."""
    featurizer = Featurizer(cfg, model_fps, modalities)
    return featurizer(read_source(cfg.source))


def _run_resident(chain, rows: list[dict], batch_size: int) -> Iterator[dict]:
    """``execution.run_local`` through a chain kept across calls: the same pieces, the same one
    BLAS / OpenCV thread (so the features equal ``predict``'s bit for bit)."""
    import cv2
    from threadpoolctl import threadpool_limits

    cv_threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        with threadpool_limits(limits=1):
            for k in range(0, len(rows), batch_size):
                part = rows[k:k + batch_size]
                yield from chain({key: object_column([r.get(key) for r in part]) for key in part[0]})
    finally:
        cv2.setNumThreads(cv_threads)


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
        for name in (f"{m}_seq", f"{m}_seq_len"):   # for a model with a temporal branch
            cols[name] = sequence_column(batch, FEATURES_SCHEMA.field(name), list(np.flatnonzero(ok)))
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
