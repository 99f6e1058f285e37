"""``mmpipe run``: source -> scan -> plan -> Ray Data processing pass -> sinks -> commits."""
from __future__ import annotations

import json
import os
import shutil
import signal
import time
import uuid
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from pipeline.config import Config
from pipeline.execution import (StageChain, cluster_facts, ensure_ray, process, runs_locally, shards_in_actors,
                                stage_metrics)
from pipeline.plan import Lineage, Plan, StageSpec, build_stages, fingerprints, make_plan
from pipeline.schema import FEATURES_SCHEMA
from pipeline.sinks import RunSink, SinkResult, rejects_table
from pipeline.sources import SourceRecord, read_source
from pipeline.store import Store
from stages.base import MODALITIES, StageContext
from stages.ingest import SCAN_COLUMNS


def _fault_point(name: str) -> None:
    """Crash-safety tests SIGKILL the run here (MMPIPE_KILL_AT=name); a no-op otherwise."""
    if os.environ.get("MMPIPE_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


class _Phases:
    """Wall seconds per phase of a run, for the run record."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - start, 3)


@dataclass
class RunResult:
    run_id: str
    record: dict
    store: Store


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def scan(records: list[SourceRecord], cfg: Config, context: StageContext, num_cpus: int,
         on_cluster: bool = False, hash_cache: dict | None = None) -> tuple[list[dict], list]:
    """Pass 1: resolve, fetch and hash every record (small output, no media bytes).

    On a cluster the scan runs in Ray actors near the data; on one machine it runs in the driver
    (one thread: see ``_scan_local``), which saves an actor pool's start-up on every run, the main
    fixed cost of a small incremental run."""
    rows = []
    for rec in records:
        d = rec.to_dict()
        d["text"] = d["text"] or ""
        d["image"], d["audio"] = d["image"] or "", d["audio"] or ""
        d["image_ref"], d["audio_ref"] = d["image"], d["audio"]
        rows.append(d)
    params = {"roots": cfg.source.roots, "http": cfg.source.http.model_dump()}
    if not on_cluster:
        return _scan_local(rows, params, context, hash_cache), []
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), num_cpus * 2)))
    ds = ds.map_batches(StageChain, fn_constructor_kwargs={"specs": [("ingest.scan", params)],
                                                           "context": context.model_dump(), "group": 0},
                        compute=ray.data.ActorPoolStrategy(size=max(1, num_cpus)), batch_size=64,
                        batch_format="numpy", zero_copy_batch=False)
    out = ds.take_all()
    stats = [r["_stats_0"] for r in out if r.get("_stats_0")]
    return [{k: r[k] for k in SCAN_COLUMNS} for r in out], stats


def _scan_local(rows: list[dict], params: dict, context: StageContext,
                hash_cache: dict | None) -> list[dict]:
    from stages.base import object_column
    from stages.ingest import IngestScan

    stage = IngestScan(params, context, hash_cache)
    chunks = [rows[k:k + 64] for k in range(0, len(rows), 64)]

    def one(chunk: list[dict]) -> list[dict]:
        batch = {key: object_column([r[key] for r in chunk]) for key in chunk[0]}
        out = stage(batch)
        return [{k: out[k][i] for k in SCAN_COLUMNS} for i in range(len(chunk))]

    start = time.perf_counter()
    # Local files: one thread (stat, realpath and small reads hold the GIL; two threads measured
    # 2.0 s vs 1.1 s for 3000 rows). http(s) fetches have their own bounded concurrency.
    out = [row for chunk in chunks for row in one(chunk)]
    metrics = stage_metrics()   # the same per-stage metrics the actors export
    if metrics is not None:
        metrics.record(stage, len(rows), len(out), time.perf_counter() - start, {})
    if hash_cache is not None:   # keep only what this input needed: the cache does not grow forever
        hash_cache.clear()
        hash_cache.update(stage.hash_used)
    return out


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
    rejects = rejects_table([{k: r.get(k, "") for k in ("id", "sha_sample", "fp_all")} |
                             {"stage": r["reject_stage"], "reason": r["reject_reason"],
                              "detail": r["reject_detail"], "run_id": run_id,
                              "ref": json.dumps({m: r.get(f"{m}_ref") for m in ("image", "audio") if r.get(f"{m}_ref")})}
                             for r in plan.rejects] + sink.rejects)
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


def _stage_table(stats: dict[str, list[float]]) -> dict[str, dict]:
    return {name: {"rows": int(rows), "seconds": round(secs, 3),
                   "rows_per_s": round(rows / secs, 1) if secs > 0 else None}
            for name, (rows, secs) in stats.items()}


def run(cfg: Config, log: Callable[[str], None] = print) -> RunResult:
    store = Store(cfg.store)
    run_id = new_run_id()
    build_stages(cfg)                       # validate every stage before any data is read
    records = read_source(cfg.source)
    started = time.time()
    with store.lock(run_id):
        info = cluster_facts(cfg)
        if info.get("dashboard_url"):
            log(f"Ray dashboard: http://{info['dashboard_url']}")
        specs: list[StageSpec] = build_stages(cfg, info["num_cpus"])
        fps = fingerprints(cfg, specs)
        store.recover()
        context = StageContext(run_id=run_id, seed=cfg.seed, bad_modality=cfg.bad_modality, store=store.uri,
                               cache_dir=str(store.local_dir("cache", "http")))
        phases = _Phases()
        with phases("lineage"):
            lineage = store.lineage()
        index = _early_index(cfg, specs, run_id, info, len(records), lineage)
        try:
            with phases("scan"):
                hashes = store.hash_cache()
                scanned, _ = scan(records, cfg, context, info["num_cpus"], on_cluster=info["remote"], hash_cache=hashes)
                store.save_hash_cache(hashes)
            scan_s = phases.seconds["scan"]
            with phases("plan"):
                plan = make_plan(scanned, lineage, fps, cfg)
            log(f"run {run_id}: {len(records)} input, {len(plan.rows)} to process, "
                f"{len(plan.unchanged)} unchanged, {len(plan.removed)} removed, {len(plan.rejects)} rejected at ingest")
            local = runs_locally(plan.rows, specs, cfg)
            if plan.rows and not local and not info["ray_started"]:
                with phases("ray_start"):   # only now: a small or empty plan never pays for it
                    info = ensure_ray(cfg, info, log)
                    specs = build_stages(cfg, info["num_cpus"])
            with phases("dedup_index"):
                index = _start_dedup(cfg, specs, store, plan, run_id, local, early=index)
            staging = store.local_dir("_staging", run_id)
            sink = RunSink(store, run_id, fps, staging, cfg.execution.shard_max_count)
            shards = None if local or not shards_in_actors(cfg, store.is_local, info["remote"]) else {
                "store_uri": store.uri, "run_id": run_id, "max_count": cfg.execution.shard_max_count}
            if shards:   # the actors write into it; only the driver makes it (see write_block_shards)
                store.fs.create_dir(store.path_of("samples", run_id), recursive=True)
            t1 = time.perf_counter()
            if plan.rows:
                for batch in process(plan.rows, specs, context, cfg, info["num_cpus"], local, shards):
                    sink.add(batch)
                    _fault_point("during_stages")
            result = sink.close()
            _fault_point("before_commit")
            process_s = time.perf_counter() - t1
            phases.seconds["process"] = round(process_s, 3)
            with phases("commit"):
                committed = commit(store, plan, lineage, result, run_id, result.dims)
        finally:
            if index is not None:
                from stages.dedup import close_index

                close_index(index)
        stats = {"ingest.scan": [len(records), scan_s]} | result.stage_stats
        record = _record(cfg, store, run_id, plan, result, committed, stats, started, process_s, info)
        record["fingerprints"] = {s.name: s.fingerprint for s in specs}
        record["phases_s"] = phases.seconds
        record["execution"] = "driver" if local else "ray-data"
        record["shard_writer"] = "actors" if shards else "driver"
        _fault_point("before_record")
        store.write_text(f"runs/{run_id}.json", json.dumps(record, indent=2, default=str))
        shutil.rmtree(staging, ignore_errors=True)
    return RunResult(run_id, record, store)


def _dedup_spec(specs: list[StageSpec]) -> StageSpec | None:
    return next((s for s in specs if s.name == "dedup"), None)


def _early_index(cfg: Config, specs: list[StageSpec], run_id: str, info: dict, n_inputs: int,
                 lineage: Lineage) -> str | None:
    """Start the run's dedup index actor before the scan when the plan will go to actor pools for
    sure: Ray is up already (a long-lived driver, a job on a cluster) and more inputs are new to the
    store than ``execution.local_max_rows``. Its worker's start-up (~1.5 CPU-s) then overlaps the
    scan, which keeps one core of the driver busy, instead of the stage actors' start-up."""
    spec = _dedup_spec(specs)
    new_inputs = n_inputs - len(lineage.keys.keys() | lineage.rejects.keys())
    if spec is None or not info["ray_started"] or new_inputs <= cfg.execution.local_max_rows:
        return None
    from stages.dedup import index_name, start_index

    name = index_name(run_id)
    start_index(name, spec.params)
    return name


def _start_dedup(cfg: Config, specs: list[StageSpec], store: Store, plan: Plan, run_id: str, local: bool,
                 early: str | None) -> str | None:
    """The run's dedup index, seeded with the stored signatures: ``early`` (the actor started before
    the scan) when the plan goes to actors, else a new one (in this process for a local plan). Returns
    the index the run closes at its end: ``early`` as it is when the plan has no rows."""
    spec = _dedup_spec(specs)
    if spec is None or not plan.rows:
        return early
    from stages.dedup import create_index, index_name, seed_index

    existing = store.dedup_signatures(exclude=plan.removed)
    if early and not local:
        seed_index(early, existing)
        return early
    name = index_name(run_id)
    create_index(name, spec.params, existing, local=local)   # replaces an early actor
    return name


def _record(cfg, store, run_id, plan, result, committed, stats, started, process_s, info) -> dict:
    feats = store.read("features", columns=["id"], filter=pc.field("aug") == 0)["id"].to_pylist()
    rejects = store.read("rejects", columns=["id", "reason"])
    return {
        "run_id": run_id,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "wall_s": round(time.time() - started, 2),
        "process_s": round(process_s, 2),
        "store": store.uri,
        "counts": {"input": len(plan.input_ids), "accepted": len(feats), "rejected": rejects.num_rows,
                   "processed": len(plan.rows) + len(plan.rejects), "unchanged": len(plan.unchanged),
                   "removed": len(plan.removed), "partial": len(plan.partial),
                   "feature_rows_written": committed["rows_written"],
                   "aug_rejected": result.aug_rejected, "samples_written": result.samples_written},
        "rejects_by_reason": dict(Counter(rejects["reason"].to_pylist())),
        "run_rejects_by_reason": dict(committed["run_rejects"]),
        "stages": _stage_table(stats),
        "versions": {"features": committed["features_version"], "rejects": committed["rejects_version"]},
        "dims": result.dims,
        "cluster": {k: v for k, v in info.items()},
        "config": cfg.model_dump(mode="json"),
    }
