"""The model half of serving, free of Ray Serve: request records through the same scan, cleanup
and feature stages as ``mmpipe predict`` (``pipeline.predict.Featurizer``, kept loaded), then the
model. A Serve replica holds one ``Predictor``; the benchmark calls one in-process."""
from __future__ import annotations

import base64
import binascii
import re
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes

from core.config import Config
from pipeline.sources import SourceRecord
from stages.base import Reject
from stages.modalities import INLINE, MEDIA
SCAN_STAGE = "ingest.scan"   # the stage that rejects what cannot be fetched; serving uses its codes


class Predictor:
    """A trained model (with its temperature: calibrated probabilities, as ``predict`` gives) and
    the inference stages it was trained with, loaded once."""

    def __init__(self, cfg: Config, model_dir: Path, quantize: str = "none"):
        from pipeline.predict import Featurizer, read_model_metrics
        from training.predict import load_model

        self.cfg = cfg
        self.info = read_model_metrics(model_dir)
        self.loaded = load_model(model_dir)
        if quantize == "int8":
            self.loaded = quantize_int8(self.loaded)
        self.featurizer = Featurizer(cfg, self.info.get("stage_fingerprints", {}), self.loaded.spec.modalities,
                                     connect=False, resident=True)
        self.name = str(self.info.get("name") or model_dir.name)

    def metadata(self) -> dict[str, Any]:
        spec = self.loaded.spec
        return {"model": self.name, "classes": list(spec.classes), "modalities": list(spec.modalities),
                "fusion": spec.fusion, "stage_fingerprints": self.info.get("stage_fingerprints", {}),
                "features_version": self.info.get("features_version"),
                "features_snapshot": self.info.get("features_snapshot"),
                "temperature": self.loaded.temperature}

    def predict_batch(self, requests: list[list[dict]]) -> list[dict]:
        """Each request's ``{"predictions": [...], "rejects": [...]}``, in its records' order; the
        records of all the requests go through the stages and the model together."""
        from pipeline.predict import Featurized
        from training.predict import predict_table

        flat = [r for records in requests for r in records]
        with tempfile.TemporaryDirectory(prefix="mmpipe-serve-") as folder:
            sources, rejects = source_records(flat, Path(folder), self.cfg.source.http.max_bytes)
            feats = self.featurizer(sources, cache_dir=folder) if sources else Featurized(None, [], 0)
        classes = self.loaded.classes
        answers: dict[int, dict] = {}
        if feats.table is not None:
            for p in predict_table(self.loaded, feats.table).to_pylist():
                answers[int(p["id"])] = {"label": p["prediction"], "probs": {c: p[f"p_{c}"] for c in classes}}
        refused = {int(r["id"]): r for r in rejects + feats.rejects}
        out, k = [], 0
        for records in requests:
            result: dict[str, list] = {"predictions": [], "rejects": []}
            for r in records:
                if k in answers:
                    result["predictions"].append({"id": r["id"], **answers[k]})
                else:
                    reject = refused[k]
                    result["rejects"].append({"id": r["id"], "stage": reject["stage"], "reason": reject["reason"],
                                              "detail": _without_folder(reject["detail"])})
                k += 1
            out.append(result)
        return out


class Searcher:
    """``POST /search``: request records through the predictor's stages (the same the store was
    built with), the alignment heads, then the store's vector index of the wanted modality (synced
    by ``mmpipe serve`` before the replicas start; each replica loads the graphs it is asked for)."""

    def __init__(self, predictor: Predictor, store: str, align_dir: Path):
        from training.align import load_aligner
        from training.index import VectorIndex

        self.predictor = predictor
        self.model, _ = load_aligner(align_dir)
        self.indexes = {m: VectorIndex(store, m, align_dir) for m in self.model.spec.modalities}

    def search(self, records: list[dict], modality: str, k: int) -> dict:
        from pipeline.predict import Featurized
        from pipeline.search import query_vectors

        with tempfile.TemporaryDirectory(prefix="mmpipe-search-") as folder:
            sources, rejects = source_records(records, Path(folder), self.predictor.cfg.source.http.max_bytes)
            feats = self.predictor.featurizer(sources, cache_dir=folder) if sources else Featurized(None, [], 0)
        found: dict[int, list[dict]] = {}
        if feats.table is not None and feats.table.num_rows:
            vectors = query_vectors(feats.table, self.model, self.model.spec.modalities)
            for position, results in zip(feats.table["id"].to_pylist(), self.indexes[modality].search(vectors, k)):
                found[int(position)] = results
        refused = {int(r["id"]): r for r in rejects + feats.rejects}
        out: dict[str, list] = {"results": [], "rejects": []}
        for position, r in enumerate(records):
            if position in found:
                out["results"].append({"id": r["id"], "results": found[position]})
            else:
                reject = refused[position]
                out["rejects"].append({"id": r["id"], "stage": reject["stage"], "reason": reject["reason"],
                                       "detail": _without_folder(reject["detail"])})
        return out


def media_ref(value: str, path: Path, max_bytes: int) -> str:
    """The reference the scan gets for a media value: an http(s) URL as it is (fetched by the
    scan, under ``source.http``'s rules); a ``data:`` URI decoded to ``path`` (the file's name: the
    batch's folder is the record's base). Raises ``Reject``: ``url_scheme`` for anything else (a
    path on the server is never read), ``bad_record`` for a data: URI that cannot be used."""
    head = value[:8].lower()
    if head.startswith(("http://", "https://")):
        return value
    if not head.startswith("data:"):
        scheme = value.split(":", 1)[0] if ":" in value[:16] else "no"
        raise Reject("url_scheme", f"media must be an http(s) URL or a data: URI, got {scheme} scheme")
    meta, sep, payload = value[5:].partition(",")
    if not sep:
        raise Reject("bad_record", "a data: URI without a comma")
    is_b64 = meta.lower().endswith(";base64")
    if (len(payload) * 3 // 4 if is_b64 else len(payload) // 3) > max_bytes:   # before decoding any of it
        raise Reject("bad_record", f"the data: URI holds more than {max_bytes} bytes (source.http.max_bytes)")
    try:
        data = base64.b64decode("".join(payload.split()), validate=True) if is_b64 else unquote_to_bytes(payload)
    except (binascii.Error, ValueError) as exc:
        raise Reject("bad_record", f"the data: URI is not valid base64 ({exc})") from None
    if len(data) > max_bytes:
        raise Reject("bad_record", f"the data: URI holds {len(data)} bytes, over {max_bytes} (source.http.max_bytes)")
    path.write_bytes(data)
    return path.name


def source_records(records: list[dict], folder: Path, max_bytes: int) -> tuple[list[SourceRecord], list[dict]]:
    """Request records as the source records of one run (ids made unique: their position in the
    batch; data: URIs as files in ``folder``), and the records refused here, as the scan refuses a
    manifest row: a media value neither http(s) nor ``data:`` (``url_scheme``), a data: URI that
    cannot be used (``bad_record``)."""
    out, rejects = [], []
    for k, r in enumerate(records):
        rec = SourceRecord(row=k, id=str(k), values={m: r[m] for m in INLINE if (r.get(m) or "").strip()},
                           base=str(folder))
        try:
            for m in MEDIA:
                if r.get(m):
                    rec.values[m] = media_ref(r[m], folder / f"{k}.{m}", max_bytes)
        except Reject as refused:
            rejects.append({"id": str(k), "stage": SCAN_STAGE, "reason": refused.reason,
                            "detail": f"{m}: {refused.detail}"})
            continue
        out.append(rec)
    return out, rejects


def _without_folder(detail: str) -> str:
    """A reject's detail without the batch's temporary folder (a data: URI's file is named there)."""
    return re.sub(r"/\S*/mmpipe-serve-[^/\s]+/", "", detail)


def quantize_int8(loaded):
    """Dynamic int8 quantisation of the model's Linear layers (weights int8, activations quantised
    on the fly): for CPU replicas."""
    import torch
    from torch.ao.quantization import quantize_dynamic

    from training.predict import LoadedModel

    return LoadedModel(quantize_dynamic(loaded.model, {torch.nn.Linear}, dtype=torch.qint8).eval(), loaded.spec,
                       loaded.temperature)


