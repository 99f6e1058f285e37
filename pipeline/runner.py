"""``mmpipe run``: source -> scan -> plan -> Ray Data processing pass -> sinks -> commits."""
from __future__ import annotations

import json
import os
import shutil
import signal
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from core.config import Config
from core.schema import FEATURES_SCHEMA, reject_record
from core.store import Store
from pipeline.execution import shards_in_actors
from pipeline.orchestration import Pipeline, timed
from pipeline.plan import Lineage, Plan, read_lineage
from pipeline.sinks import RunSink, SinkResult, rejects_table
from pipeline.sources import read_source
from stages.base import MODALITIES, StageStats


def _fault_point(name: str) -> None:
    """Crash-safety tests SIGKILL the run here (MMPIPE_KILL_AT=name); a no-op otherwise."""
    if os.environ.get("MMPIPE_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class RunResult:
    run_id: str
    record: dict
    store: Store


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def _fill_partial(new: pa.Table, store: Store, partial: set[str]) -> pa.Table:
    """Rows that recomputed only some modalities take the others from the stored row."""
    if not partial or new.num_rows == 0:
        return new
    old = store.read("features", filter=pc.field("id").isin(list(partial)),
                     columns=["id", "aug"] + [f"has_{m}" for m in MODALITIES] + [f"{m}_emb" for m in MODALITIES])
    by_key = {(r["id"], r["aug"]): r for r in old.to_pylist()}
    rows = new.to_pylist()
    for r in rows:
        if not r["keep"]:
            continue
        prev = by_key.get((r["id"], r["aug"]))
        if prev is None:
            raise RuntimeError(f"stored row {r['id']} aug={r['aug']} vanished during the run")
        for m in r["keep"].split(","):
            r[f"has_{m}"], r[f"{m}_emb"] = prev[f"has_{m}"], prev[f"{m}_emb"]
    return pa.Table.from_pylist(rows, schema=new.schema)


def commit(store: Store, plan: Plan, lineage: Lineage, sink: SinkResult, run_id: str, dims: dict) -> dict:
    """One Delta commit per table: upsert what this run produced, delete what it superseded."""
    rejects = rejects_table([reject_record(r, run_id) for r in plan.rejects] + sink.rejects)
    rejected_ids = set(rejects["id"].to_pylist())
    schema = FEATURES_SCHEMA.append(pa.field("keep", pa.string()))
    new = pa.concat_tables([pq.read_table(p) for p in sink.staged]) if sink.staged else schema.empty_table()
    new = new.filter(pc.invert(pc.is_in(new["id"], pa.array(sorted(rejected_ids), pa.string()))))
    new = _fill_partial(new, store, plan.partial).drop_columns(["keep"])
    touched = plan.processed_ids | plan.removed
    new_keys = set(zip(new["id"].to_pylist(), new["aug"].to_pylist()))
    stale = [(i, a) for i in touched for a in lineage.keys.get(i, []) if (i, a) not in new_keys]
    feature_tombs = pa.table({"id": pa.array([k[0] for k in stale], pa.string()),
                              "aug": pa.array([k[1] for k in stale], pa.int32())})
    reject_tombs = pa.table({"id": pa.array(sorted(i for i in touched if i in lineage.rejects and i not in rejected_ids), pa.string())})
    meta = {"mmpipe.dims": json.dumps(dims)}
    v_features = store.merge("features", new, feature_tombs, run_id, meta)
    _fault_point("between_commits")
    v_rejects = store.merge("rejects", rejects, reject_tombs, run_id)
    return {"features_version": v_features, "rejects_version": v_rejects,
            "rows_written": new.num_rows, "run_rejects": Counter(rejects["reason"].to_pylist())}


def _stage_table(stats: dict[str, StageStats]) -> dict[str, dict]:
    return {name: {"rows": s.rows_in, "rows_out": s.rows_out, "seconds": round(s.seconds, 3),
                   "rows_per_s": round(s.rows_in / s.seconds, 1) if s.seconds > 0 else None,
                   "rejected": dict(s.rejected)}
            for name, s in stats.items()}


def run(cfg: Config, log: Callable[[str], None] = print) -> RunResult:
    """Resolve, read, scan, plan, process, commit, record: one run, its phases timed."""
    store = Store(cfg.store)
    run_id = new_run_id()
    pipe = Pipeline.build(cfg, run_id, store)   # every stage validated before any data is read
    records = read_source(cfg.source)
    started, phases = time.time(), {}
    with store.lock(run_id), pipe:
        if pipe.info.get("dashboard_url"):
            log(f"Ray dashboard: http://{pipe.info['dashboard_url']}")
        store.recover()
        with timed(phases, "lineage"):
            lineage = read_lineage(store)
        pipe.start_early(len(records) - len(lineage.keys.keys() | lineage.rejects.keys()))
        with timed(phases, "scan"):
            scanned, scan_stats = pipe.scan_records(records)
        with timed(phases, "plan"):
            plan = pipe.plan(scanned, lineage)
        log(f"run {run_id}: {len(records)} input, {len(plan.rows)} to process, "
            f"{len(plan.unchanged)} unchanged, {len(plan.removed)} removed, {len(plan.rejects)} rejected at ingest")
        staging = store.local_dir("_staging", run_id)
        sink = RunSink(store, run_id, pipe.fps, staging, cfg.execution.shard_max_count)
        sink.add_stats(scan_stats)
        with timed(phases, "process"):
            for batch in pipe.process(plan, lambda local: _actor_shards(cfg, store, run_id, pipe.info, local), log):
                sink.add(batch)
                _fault_point("during_stages")
            result = sink.close()
        _fault_point("before_commit")
        with timed(phases, "commit"):
            committed = commit(store, plan, lineage, result, run_id, result.dims)
    record = _record(cfg, store, run_id, plan, result, committed, started, phases, pipe)
    _fault_point("before_record")
    store.write_text(f"runs/{run_id}.json", json.dumps(record, indent=2, default=str))
    shutil.rmtree(staging, ignore_errors=True)
    return RunResult(run_id, record, store)


def _actor_shards(cfg: Config, store: Store, run_id: str, info: dict, local: bool) -> dict | None:
    """Where the stage actors write the samples' shards, or None when the driver does."""
    if local or not shards_in_actors(cfg, store.is_local, info["remote"]):
        return None
    # The actors write into the run's folder; only the driver makes it (see write_block_shards).
    store.fs.create_dir(store.path_of("samples", run_id), recursive=True)
    return {"store_uri": store.uri, "run_id": run_id, "max_count": cfg.execution.shard_max_count}


def _record(cfg: Config, store: Store, run_id: str, plan: Plan, result: SinkResult, committed: dict,
            started: float, phases: dict[str, float], pipe: Pipeline) -> dict:
    by_reason = store.value_counts("rejects", "reason")
    return {
        "run_id": run_id,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "wall_s": round(time.time() - started, 2),
        "process_s": phases.get("process", 0.0),
        "store": store.uri,
        "counts": {"input": len(plan.input_ids), "accepted": store.count("features", pc.field("aug") == 0),
                   "rejected": sum(by_reason.values()),
                   "processed": len(plan.rows) + len(plan.rejects), "unchanged": len(plan.unchanged),
                   "removed": len(plan.removed), "partial": len(plan.partial),
                   "feature_rows_written": committed["rows_written"],
                   "aug_rejected": result.aug_rejected, "samples_written": result.samples_written},
        "rejects_by_reason": by_reason,
        "run_rejects_by_reason": dict(committed["run_rejects"]),
        "stages": _stage_table(result.stage_stats),
        "versions": {"features": committed["features_version"], "rejects": committed["rejects_version"]},
        "dims": result.dims,
        "cluster": dict(pipe.info),
        "fingerprints": {s.name: s.fingerprint for s in pipe.specs},
        "phases_s": phases,
        "execution": "driver" if pipe.local else "ray-data",
        "shard_writer": "driver" if pipe.local or not shards_in_actors(cfg, store.is_local, pipe.info["remote"]) else "actors",
        "config": cfg.model_dump(mode="json"),
    }
