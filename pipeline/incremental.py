"""Plan a run against the store bucket by bucket, so that no process holds the input, the store's
lineage or the plan (a hash join on local spills).

1. The scanned rows stream in (``Planner.add``) and are routed by content hash into ``n`` buckets.
2. Per content bucket, exact whole-sample duplicates are marked (all rows with one hash meet
   there); the rows are routed again, by id.
3. The store's lineage (feature and reject rows, the few columns the plan compares) streams into
   the same id buckets.
4. Per id bucket, ``plan_rows`` decides each row against its stored lineage, exactly as for a
   small input held in memory; what to process, the plan-time rejects and the stored keys the
   run supersedes go to spills.
5. Stored duplicates whose kept row changed are looked at again (``reexamine``), against a compact
   set of 64-bit hashes of the ids this run touches (8 bytes per changed id).

``n`` follows the data: ``execution.plan_bucket_rows`` rows per bucket (the larger of the input
and the store). Ids are bucketed by the part before a ``~`` so that repeated ids (``x~2``) and
their first (``x``) meet."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from core.config import Config
from core.schema import FEATURES_SCHEMA, REJECTS_SCHEMA, reject_record
from core.store import Store
from pipeline.plan import (Lineage, Plan, assign_ids, assign_ids_table, mark_content_duplicates, plan_rows,
                           reexamine)
from pipeline.spill import Partitioned, Spill, in_sorted, key_hashes, release_free_heap
from stages.base import MODALITIES
from stages.ingest import SCAN_COLUMNS

_S = pa.string()
SCANNED = pa.schema([("row", pa.int64())] + [(c, _S) for c in SCAN_COLUMNS if c != "row"] + [("sha_sample", _S)])
PLANNED = SCANNED.append(pa.field("fp_all", _S)).append(pa.field("redo", _S)).append(pa.field("keep", _S))
CANDIDATE = PLANNED.append(pa.field("kept_id", _S))
FEATURE_LINEAGE = ["id", "aug", "label", "split"] + [f"sha_{m}" for m in MODALITIES] + [f"fp_{m}" for m in (*MODALITIES, "sample")]
REJECT_LINEAGE = ["id", "reason", "detail", "sha_sample", "fp_all"]
KEYS = pa.schema([("id", _S), ("aug", pa.int32())])
IDS = pa.schema([("id", _S)])


def _select(schema: pa.Schema, names: list[str]) -> pa.Schema:
    return pa.schema([schema.field(n) for n in names])


def base_ids(ids: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """Each id's part before its first ``~`` (a repeated id ``x~2`` and its first ``x`` meet)."""
    return pc.replace_substring_regex(ids, "(?s)~.*", "")


def lineage_of(features: pa.Table, rejects: pa.Table) -> Lineage:
    lin = Lineage()
    for row in features.to_pylist():
        lin.keys.setdefault(row["id"], []).append(row["aug"])
        if row["aug"] == 0:
            lin.features[row["id"]] = row
    for row in rejects.to_pylist():
        lin.rejects[row["id"]] = row
    return lin


@dataclass
class StreamedPlan:
    """A run's plan as spills and counts (the rows stay on disk until the processing pass)."""

    rows: Spill            # PLANNED rows to process, bucket by bucket
    rejects: Spill         # reject records (REJECTS_SCHEMA): plan-time ones; the sink adds the stages'
    feature_tombs: Spill   # stored (id, aug) under every id the run touches; the commit keeps the stale ones
    reject_tombs: Spill    # ids the run touches that have a stored reject
    removed_ids: Spill     # stored ids no longer in the input
    input: int = 0
    planned_rejects: int = 0
    unchanged: int = 0
    removed: int = 0
    partial: int = 0
    buckets: int = 1

    @property
    def to_process(self) -> int:
        return self.rows.rows

    def removed_set(self) -> frozenset[str]:
        return frozenset(self.removed_ids.table()["id"].to_pylist())


class Planner:
    """Takes scanned rows as they come; ``finish`` plans them against the store."""

    def __init__(self, store: Store | None, fps: dict[str, str], cfg: Config, run_id: str, folder: Path,
                 expected_rows: int = 0, dedup: bool = True, derived: dict[str, str] | None = None):
        self.store, self.fps, self.cfg, self.run_id, self.folder, self.dedup = store, fps, cfg, run_id, folder, dedup
        self.derived = derived or {}
        stored = 0 if store is None else store.count("features") + store.count("rejects")
        self.n = max(1, math.ceil(max(expected_rows, stored) / cfg.execution.plan_bucket_rows))
        self.by_content = Partitioned(folder / "by_content", SCANNED, self.n, "sha_sample")
        self.input = 0

    def add(self, scanned: pa.Table | list[dict]) -> None:
        if isinstance(scanned, list):
            assign_ids(scanned, self.cfg, self.derived)
            table = pa.Table.from_pylist(scanned, schema=SCANNED)
        else:
            table = assign_ids_table(scanned, self.cfg, self.derived)
        self.by_content.add(table)
        self.input += table.num_rows

    def finish(self) -> StreamedPlan:
        f = self.folder
        plan = StreamedPlan(Spill(f / "rows.parquet", PLANNED, self.cfg.execution.block_rows),
                            Spill(f / "rejects.parquet", REJECTS_SCHEMA), Spill(f / "feature_tombs.parquet", KEYS),
                            Spill(f / "reject_tombs.parquet", IDS), Spill(f / "removed.parquet", IDS),
                            input=self.input, buckets=self.n)
        by_id = Partitioned(f / "by_id", SCANNED, self.n, "id", base_ids)
        for part in self.by_content.close().parts:   # 2: exact whole-sample duplicates
            by_id.add(self._content_duplicates(part.table()))
        lin_f = Partitioned(f / "lineage_features", _select(FEATURES_SCHEMA, FEATURE_LINEAGE), self.n, "id", base_ids)
        lin_r = Partitioned(f / "lineage_rejects", _select(REJECTS_SCHEMA, REJECT_LINEAGE), self.n, "id", base_ids)
        if self.store is not None:                   # 3: the store's lineage, streamed
            for batch in self.store.batches("features", FEATURE_LINEAGE):
                lin_f.add(batch)
            retry = pa.array(self.cfg.execution.retry_rejects, pa.string())
            for batch in self.store.batches("rejects", REJECT_LINEAGE):
                if len(retry):   # a reject to retry looks changed: its stages' fingerprint is forgotten
                    fp = REJECT_LINEAGE.index("fp_all")
                    batch = batch.set_column(fp, "fp_all", pc.if_else(pc.is_in(batch["reason"], value_set=retry),
                                                                      pa.scalar("", pa.string()), batch["fp_all"]))
                lin_r.add(batch)
        candidates = Spill(f / "candidates.parquet", CANDIDATE)
        touched: list[np.ndarray] = []
        for inputs, stored_f, stored_r in zip(by_id.close().parts, lin_f.close().parts, lin_r.close().parts):
            inputs, stored_f, stored_r = inputs.table(), stored_f.table(), stored_r.table()
            same = self._unchanged(inputs, stored_f, stored_r)   # 4: each id bucket against its lineage
            if len(same):
                plan.unchanged += len(same)
                inputs = inputs.filter(pc.invert(pc.is_in(inputs["id"], value_set=same)))
                stored_f = stored_f.filter(pc.invert(pc.is_in(stored_f["id"], value_set=same)))
            lineage = lineage_of(stored_f, stored_r)
            bucket, found = plan_rows(inputs.to_pylist(), lineage, self.fps, self.cfg, dedup=False)
            self._record(plan, bucket, lineage)
            candidates.add_rows(found)
            # An id lives in one bucket: each bucket's hashes made unique, all of them sorted once.
            touched.append(np.unique(key_hashes(list(bucket.processed_ids | bucket.removed))))
            del bucket, found, inputs, stored_f, stored_r, lineage
            release_free_heap()
        hashes = np.concatenate(touched) if touched else np.zeros(0, np.uint64)
        del touched
        hashes.sort()
        self._reexamine(plan, candidates, hashes)
        for spill in (plan.rows, plan.rejects, plan.feature_tombs, plan.reject_tombs, plan.removed_ids):
            spill.close()
        release_free_heap()
        return plan

    def _content_duplicates(self, rows: pa.Table) -> pa.Table:
        """``mark_content_duplicates`` over one content bucket; nothing to do (and no row made a
        Python object) when every content hash among the rows the scan kept is distinct."""
        kept = rows.filter(pc.equal(rows["reject_reason"], ""))
        if not self.dedup or pc.count_distinct(kept["sha_sample"]).as_py() == kept.num_rows:
            return rows
        out = sorted(rows.to_pylist(), key=lambda r: r["row"])
        mark_content_duplicates(out)
        return pa.Table.from_pylist(out, schema=SCANNED)

    def _unchanged(self, inputs: pa.Table, stored: pa.Table, stored_rejects: pa.Table) -> pa.Array:
        """Ids of one bucket that ``plan_rows`` would find unchanged, found with Arrow joins so
        that a rerun turns no unchanged row into a Python object: kept by the scan, stored as
        an original feature row (and not as a reject) made by today's fingerprints, with the same
        label, split and content hashes. Only for a bucket whose ids are distinct and plain (a
        repeated id's renaming needs every row of it); other rows go through ``plan_rows``."""
        none = pa.array([], pa.string())
        ids = inputs["id"]
        if inputs.num_rows == 0 or stored.num_rows == 0 or pc.count_distinct(ids).as_py() != inputs.num_rows \
                or pc.any(pc.match_substring(ids, "~")).as_py():
            return none
        fp = pc.and_(pc.equal(stored["aug"], 0), pc.equal(stored["fp_sample"], self.fps["sample"]))
        for m in MODALITIES:   # made by today's stages, or before the modality existed (as _redo decides)
            fp = pc.and_(fp, pc.or_kleene(pc.is_null(stored[f"fp_{m}"]), pc.equal(stored[f"fp_{m}"], self.fps[m])))
        compared = ["label", "split"] + [f"sha_{m}" for m in MODALITIES]
        old = stored.filter(fp).select(["id", *compared])
        old = pa.table({c: pc.fill_null(old[c], "") if c.startswith("sha_") else old[c] for c in old.column_names})
        new = inputs.filter(pc.equal(inputs["reject_reason"], "")).select(["id", *compared])
        joined = new.join(old, keys="id", join_type="inner", right_suffix="_old")
        same = pc.equal(joined["label"], joined["label_old"])
        for c in compared[1:]:
            same = pc.and_(same, pc.equal(joined[c], joined[c + "_old"]))
        out = joined.filter(same)["id"].combine_chunks()   # null (a missing value) never counts as same
        return out.filter(pc.invert(pc.is_in(out, value_set=stored_rejects["id"].combine_chunks())))

    def _record(self, plan: StreamedPlan, bucket: Plan, lineage: Lineage) -> None:
        plan.rows.add_rows(bucket.rows)
        plan.rejects.add_rows([reject_record(r, self.run_id) for r in bucket.rejects])
        plan.planned_rejects += len(bucket.rejects)
        plan.unchanged += len(bucket.unchanged)
        plan.removed += len(bucket.removed)
        plan.partial += len(bucket.partial)
        plan.removed_ids.add_rows([{"id": i} for i in sorted(bucket.removed)])
        touched = sorted(bucket.processed_ids | bucket.removed)
        plan.feature_tombs.add_rows([{"id": i, "aug": a} for i in touched for a in lineage.keys.get(i, [])])
        plan.reject_tombs.add_rows([{"id": i} for i in touched if i in lineage.rejects])

    def _reexamine(self, plan: StreamedPlan, candidates: Spill, touched: np.ndarray) -> None:
        """5: stored duplicates whose kept row this run touches are planned again."""
        for batch in candidates.batches():
            rows = batch.to_pylist()
            hit = in_sorted(key_hashes([r["kept_id"] for r in rows]), touched)
            redone = {r["kept_id"] for r, h in zip(rows, hit) if h}
            part = Plan([], [], {r["id"] for r in rows}, set(), set(), [])
            back = reexamine(part, rows, redone.__contains__)
            plan.unchanged -= len(back)
            plan.rows.add_rows(part.rows)
            plan.rejects.add_rows([reject_record(r, self.run_id) for r in part.rejects])
            plan.planned_rejects += len(part.rejects)
            plan.reject_tombs.add_rows([{"id": r["id"]} for r in back])
