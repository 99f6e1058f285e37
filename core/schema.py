"""Row layouts: the batch that flows between stages, and the stored tables (public contract)."""
from __future__ import annotations

import json
from typing import Any, Mapping

import pyarrow as pa

from stages.base import redact_urls
from stages.modalities import MEDIA, MODALITIES, REGISTRY

# Columns of the in-flight batch. Media columns hold raw bytes after ingest, cleaned media after
# cleanup (image: encoded jpg/png bytes, audio: FLAC bytes, video: mp4 bytes, text: str); None
# where absent. A modality's extra columns (video_frames) are bytes or None like its own.
BATCH_STR_COLUMNS = (
    "id", "label", "split", *(f"{m}_ref" for m in MEDIA),
    *(f"sha_{m}" for m in (*MODALITIES, "sample")),
    "redo", "reject_stage", "reject_reason", "reject_detail", "meta", "dropped", "aug_params", "dedup_sig",
)
MEDIA_COLUMNS = (*MODALITIES, *(c for m in MODALITIES for c in REGISTRY[m].extra_columns))


def normalize_batch(batch: dict) -> dict:
    """Undo what a trip through Arrow does to a numpy batch: fixed-width string columns become
    object columns (stages write longer strings back), and media values that an all-null column
    turned into float NaN become None again."""
    import numpy as np

    out = {}
    for key, col in batch.items():
        if col.dtype.kind in "US":
            col = col.astype(object)
        if key in MEDIA_COLUMNS:
            fixed = np.empty(len(col), dtype=object)
            fixed[:] = [v if isinstance(v, (bytes, str)) else None for v in col]
            col = fixed
        out[key] = col
    return out


FEATURES_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("label", pa.string()),
        ("split", pa.string()),
        ("aug", pa.int32()),
    ]
    + [(f"has_{m}", pa.bool_()) for m in MODALITIES]
    + [(f"{m}_emb", pa.list_(pa.float32())) for m in MODALITIES]
    + [(f"sha_{m}", pa.string()) for m in (*MODALITIES, "sample")]
    + [(f"fp_{m}", pa.string()) for m in (*MODALITIES, "sample")]
    + [
        ("aug_params", pa.string()),   # JSON: ops and drawn parameters per modality (lineage)
        ("dedup_sig", pa.string()),    # JSON: near-dup signatures (image phash, text minhash)
        ("dropped", pa.string()),      # JSON: modality -> reason, under drop_modality
        ("meta", pa.string()),         # JSON: what stages measured
        ("shard", pa.string()),        # samples/ shard holding this row's media
        ("run_id", pa.string()),
    ]
    # Sequence features (an encoder's ``sequence`` option): frames x dims, zero-padded to a fixed
    # number of frames, and how many are real; null where the encoder stores none.
    + [(f"{m}_seq", pa.list_(pa.list_(pa.float32()))) for m in MODALITIES]
    + [(f"{m}_seq_len", pa.int32()) for m in MODALITIES]
)

REJECTS_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("run_id", pa.string()),
        ("sha_sample", pa.string()),
        ("fp_all", pa.string()),
        ("ref", pa.string()),          # where the record came from (paths / urls), for humans
    ]
)


def reject_record(row: Mapping[str, Any], run_id: str, fp_all: str = "") -> dict[str, Any]:
    """The rejects-table row for a rejected row (a planner dict or one row of a batch): the one
    place a reject record is built."""
    refs = {m: redact_urls(str(row.get(f"{m}_ref") or "")) for m in MEDIA}
    return {"id": str(row["id"]), "stage": str(row["reject_stage"]), "reason": str(row["reject_reason"]),
            "detail": redact_urls(str(row["reject_detail"] or "")), "run_id": run_id,
            "sha_sample": str(row.get("sha_sample") or ""), "fp_all": str(row.get("fp_all") or fp_all),
            "ref": json.dumps({k: v for k, v in refs.items() if v})}
