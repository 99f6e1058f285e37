"""``mmpipe run``: source -> scan -> plan -> Ray Data processing pass -> sinks -> commits."""
from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from core.config import Config, redacted
from core.schema import FEATURES_SCHEMA
from core.store import Store, row_keys
from pipeline.execution import PlanRows, shards_in_actors
from pipeline.incremental import Planner, StreamedPlan
from pipeline.spill import Spill
from pipeline.orchestration import Pipeline, timed
from pipeline.progress import Progress
from pipeline.sinks import SHARD_WRITING, RunSink, SinkResult
from pipeline.sources import iter_source_tables, source_size
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


PARTIAL_CHUNK = 100_000   # partial rows filled from the store per pass over the staged features


def _staged_batches(staged: list[Path], columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
    for path in staged:
        # Small batches, no pre-buffering (it reads every row group of the file up front): a
        # feature row is kilobytes decoded.
        yield from pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20).iter_batches(batch_size=1024, columns=columns)


def _fill_partial(store: Store, staged: list[Path], rejected: pa.Array, folder: Path) -> Spill:
    """Rows that recomputed only some modalities (``keep``) take the others from the stored row,
    ``PARTIAL_CHUNK`` ids per pass over the staged rows, column by column in Arrow (an embedding
    never becomes Python floats); written to a spill, read by the commit."""
    filled = Spill(folder / "partial.parquet", FEATURES_SCHEMA)
    partial: list[str] = []
    for batch in _staged_batches(staged, ["id", "aug", "keep"]):
        keep = pc.and_(pc.not_equal(batch["keep"], ""), pc.invert(pc.is_in(batch["id"], value_set=rejected)))
        partial += batch.filter(pc.and_(keep, pc.equal(batch["aug"], 0)))["id"].to_pylist()
    kept_columns = {m: [f"has_{m}", f"{m}_emb", f"{m}_seq", f"{m}_seq_len"] for m in MODALITIES}
    columns = ["id", "aug"] + [c for m in MODALITIES for c in kept_columns[m]]
    stored_schema = pa.schema([FEATURES_SCHEMA.field(c) for c in columns])
    for k in range(0, len(partial), PARTIAL_CHUNK):
        ids = pa.array(partial[k:k + PARTIAL_CHUNK], pa.string())
        old = pa.Table.from_batches([b.cast(stored_schema) for b in store.batches("features", columns, pc.field("id").isin(ids))],
                                    schema=stored_schema)
        old_keys = row_keys(old, "features").combine_chunks()
        for batch in _staged_batches(staged):
            part = pa.Table.from_batches([batch]).filter(
                pc.and_(pc.not_equal(batch["keep"], ""), pc.is_in(batch["id"], value_set=ids)))
            if part.num_rows == 0:
                continue
            at = pc.index_in(row_keys(part, "features"), value_set=old_keys)
            if at.null_count:
                lost = part.filter(pc.is_null(at)).slice(0, 1).to_pylist()[0]
                raise RuntimeError(f"stored row {lost['id']} aug={lost['aug']} vanished during the run")
            prev = old.take(at)
            for m in MODALITIES:
                kept = pc.match_substring_regex(part["keep"], f"(^|,){m}(,|$)")
                for col in kept_columns[m]:
                    part = part.set_column(part.schema.get_field_index(col), col, pc.if_else(kept, prev[col], part[col]))
            filled.add(part)
    return filled.close()


def _new_features(staged: list[Path], filled: Spill, rejected: pa.Array) -> Iterator[pa.RecordBatch]:
    """The staged feature rows to commit, batch by batch: rows under a rejected id left out (the
    augmented copies of a rejected original), partial rows as ``_fill_partial`` completed them."""
    for batch in _staged_batches(staged):
        yield batch.filter(pc.and_(pc.equal(batch["keep"], ""), pc.invert(pc.is_in(batch["id"], value_set=rejected)))
                           ).drop_columns(["keep"])
    yield from filled.batches()


def commit(store: Store, plan: StreamedPlan, sink: SinkResult, run_id: str, dims: dict,
           vectors_from: int | None = None) -> dict:
    """One Delta transaction per table: the run's rows written as new data files, the stored rows
    it supersedes (every stored key of an id it touched) removed by rewriting the files that hold
    them. Everything streams from the run's spills; the driver holds ids and keys, never rows."""
    rejected = pc.unique(plan.rejects.table(["id"])["id"].combine_chunks())
    run_rejects: Counter = Counter()
    for batch in plan.rejects.batches(["reason"]):
        for item in pc.value_counts(batch.column(0)).to_pylist():
            run_rejects[item["values"]] += item["counts"]
    filled = _fill_partial(store, sink.staged, rejected, plan.rows.path.parent)
    features, written = store.data_files("features", run_id), 0
    for batch in _new_features(sink.staged, filled, rejected):
        features.write(batch)
        written += batch.num_rows
    stale = row_keys(plan.feature_tombs.table(), "features").combine_chunks()
    v_features = store.commit("features", features, stale, run_id, {"mmpipe.dims": json.dumps(dims)}, vectors_from)
    _fault_point("between_commits")
    rejects = store.data_files("rejects", run_id)
    for batch in plan.rejects.batches():
        rejects.write(batch)
    v_rejects = store.commit("rejects", rejects, plan.reject_tombs.table()["id"].combine_chunks(), run_id,
                             vectors_from=vectors_from)
    return {"features_version": v_features, "rejects_version": v_rejects,
            "rows_written": written, "run_rejects": run_rejects}


def _stage_table(stats: dict[str, StageStats]) -> dict[str, dict]:
    stats = {name: s for name, s in stats.items() if name != SHARD_WRITING}
    return {name: {"rows": s.rows_in, "rows_out": s.rows_out, "seconds": round(s.seconds, 3),
                   "rows_per_s": round(s.rows_in / s.seconds, 1) if s.seconds > 0 else None,
                   "rejected": dict(s.rejected)}
            for name, s in stats.items()}


def run(cfg: Config, log: Callable[[str], None] = print, release_ray: bool = False) -> RunResult:
    """Resolve, read and scan, plan, process, commit, record: one run, its phases timed. Every
    phase streams: the source in chunks, the plan bucket by bucket on local spills, the rows
    through the stages block by block, the commit from the staged files. ``release_ray``: shut
    down the Ray this run started as soon as the processing pass is over (``mmpipe run``, whose
    process ends with the run), while the driver commits."""
    store = Store(cfg.store)
    run_id = new_run_id()
    pipe = Pipeline.build(cfg, run_id, store)   # every stage validated before any data is read
    expected = source_size(cfg.source)
    started, phases, peaks = time.time(), {}, {}
    with store.lock(run_id), pipe:
        if pipe.info.get("dashboard_url"):
            log(f"Ray dashboard: http://{pipe.info['dashboard_url']}")
        store.recover()
        staging = store.local_dir("_staging", run_id)
        planner = Planner(store, pipe.fps, cfg, run_id, staging / "plan", expected, derived=pipe.derived)
        pipe.start_early(expected - store.count("features", pc.field("aug") == 0) - store.count("rejects"))
        with timed(phases, "scan", peaks):
            for scanned in pipe.scan_chunks(iter_source_tables(cfg.source, cfg.execution.scan_chunk_rows)):
                planner.add(scanned)
        with timed(phases, "plan", peaks):
            plan = planner.finish()
        log(f"run {run_id}: {plan.input} input, {plan.to_process} to process, {plan.unchanged} unchanged, "
            f"{plan.removed} removed, {plan.planned_rejects} rejected at ingest")
        sink = RunSink(store, run_id, pipe.fps, staging, cfg.execution.shard_max_count, rejects=plan.rejects)
        sink.add_stats(pipe.scan_stats)
        pass_start = time.time()
        progress = Progress(plan.to_process, enabled=progress_line(cfg))
        with timed(phases, "process", peaks):
            batches = pipe.process(PlanRows(spill=plan.rows),
                                   lambda local: _actor_shards(cfg, store, run_id, pipe.info, local), log,
                                   removed=plan.removed_set() if plan.removed else frozenset())
            for batch in batches:
                sink.add(batch)
                progress.add(batch)
                _fault_point("during_stages")
            progress.close()
            result = sink.close()
        marks = {"started": started, "pass_start": pass_start, "pass_end": time.time()}
        stopping = pipe.release_ray() if release_ray else None
        _fault_point("before_commit")
        with timed(phases, "commit", peaks):
            committed = commit(store, plan, result, run_id, result.dims, cfg.execution.vectors_from_rows())
    record = _record(cfg, store, run_id, plan, result, committed, started, phases, pipe, peaks)
    record["profile"] = _profile(marks, result, pipe)
    _fault_point("before_record")
    store.write_text(f"runs/{run_id}.json", json.dumps(record, indent=2, default=str))
    shutil.rmtree(staging, ignore_errors=True)
    if stopping is not None:
        wait = time.perf_counter()
        stopping.join()
        record["profile"]["ray_shutdown_wait_s"] = round(time.perf_counter() - wait, 3)
    return RunResult(run_id, record, store)


def progress_line(cfg: Config) -> bool:
    """The live line on a terminal, unless turned off or Ray Data's own bars are on (they would
    draw over each other)."""
    return cfg.execution.progress_line and not cfg.ray.progress_bars and sys.stderr.isatty()


def _profile(marks: dict[str, float], result: SinkResult, pipe: Pipeline) -> dict:
    """Where the wall time went besides the phases: waiting for Ray, the pass's start-up (to the
    first row in one of its stages) and drain (after the last), shard writing. Times are epoch s."""
    names = {s.name for s in pipe.specs}
    stats = [s for name, s in result.stage_stats.items() if name in names and s.first]
    shards = result.stage_stats.get(SHARD_WRITING)
    return {**{k: round(v, 3) for k, v in marks.items()}, "ray_wait_s": round(pipe.ray_wait_s, 3),
            "first_row": round(min(s.first for s in stats), 3) if stats else None,
            "last_row": round(max(s.last for s in stats), 3) if stats else None,
            "shard_writing_s": round(shards.seconds, 3) if shards else 0.0}



def _actor_shards(cfg: Config, store: Store, run_id: str, info: dict, local: bool) -> dict | None:
    """Where the stage actors write the samples' shards, or None when the driver does."""
    if local or not shards_in_actors(cfg, store.is_local, info["remote"]):
        return None
    # The actors write into the run's folder; only the driver makes it (see write_block_shards).
    store.fs.create_dir(store.path_of("samples", run_id), recursive=True)
    return {"store_uri": store.uri, "run_id": run_id, "max_count": cfg.execution.shard_max_count}


def _record(cfg: Config, store: Store, run_id: str, plan: StreamedPlan, result: SinkResult, committed: dict,
            started: float, phases: dict[str, float], pipe: Pipeline, peaks: dict[str, float]) -> dict:
    by_reason = store.value_counts("rejects", "reason")
    return {
        "run_id": run_id,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "wall_s": round(time.time() - started, 2),
        "process_s": phases.get("process", 0.0),
        "store": store.uri,
        "counts": {"input": plan.input, "accepted": store.count("features", pc.field("aug") == 0),
                   "rejected": sum(by_reason.values()),
                   "processed": plan.to_process + plan.planned_rejects, "unchanged": plan.unchanged,
                   "removed": plan.removed, "partial": plan.partial,
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
        "driver_peak_rss_mb": peaks,   # this process's peak RSS at the end of each phase
        "plan_buckets": plan.buckets,
        "execution": "driver" if pipe.local else "ray-data",
        "shard_writer": "driver" if pipe.local or not shards_in_actors(cfg, store.is_local, pipe.info["remote"]) else "actors",
        "config": redacted(cfg.model_dump(mode="json")),   # credentials never reach a run record
    }
