"""The plain single-process baselines: the same stage classes the pipeline runs, instantiated in
this process and called in a loop over the same batches (no Ray, no sinks, no commits).

As a script it is the whole-pipeline baseline in a fresh process, so that it pays for importing
its libraries as the pipeline's actors do: ``python benchmarks/baseline.py MANIFEST --batch-size 32``
prints one JSON line (wall seconds from the process's start; scan and per-stage seconds).
It writes what the pipeline writes (shards, features table), with the pipeline's own sink code.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from common import batches_of
from stages.base import Batch, num_rows, rows_to_batch


def to_rows(batch: Batch) -> list[dict]:
    n = num_rows(batch)
    return [{k: (v[i].item() if isinstance(v[i], np.generic) else v[i]) for k, v in batch.items()} for i in range(n)]


@dataclass
class LoopResult:
    rows: int
    seconds: float
    stage_seconds: dict[str, float] = field(default_factory=dict)
    batches: list[Batch] = field(default_factory=list)

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds else float("nan")


def run_stages(stages: list, rows: list[dict], batch_size: int, keep: bool = False,
               on_batch: Callable[[Batch], None] | None = None) -> LoopResult:
    """Call ``stages`` in order over ``rows`` in batches of ``batch_size``; time each stage;
    hand each output batch to ``on_batch`` (a sink) when given."""
    per_stage: dict[str, float] = defaultdict(float)
    out: list[Batch] = []
    start = time.perf_counter()
    for chunk in batches_of(rows, batch_size):
        batch = rows_to_batch(chunk)
        for stage in stages:
            t = time.perf_counter()
            batch = stage(batch)
            per_stage[stage.name] += time.perf_counter() - t
        if keep:
            out.append(batch)
        if on_batch is not None:
            on_batch(batch)
    return LoopResult(len(rows), time.perf_counter() - start, dict(per_stage), out)


def plain_pipeline(cfg: Any, upto: str | None = None, keep: bool = False,
                   write: bool = False) -> tuple[LoopResult, float]:
    """The whole processing pass in one process: scan, plan, then every stage of ``cfg`` (or those
    before ``upto``) over batches of ``execution.batch_size``. Returns (loop result, scan seconds).
    With ``write``, the outputs the pipeline writes too: WebDataset shards and the features table
    (the pipeline's own sink, then one Delta write); not the rejects table or a run record.

    Runs without Ray: the stages' run-wide state (the dedup index) is then in this process. The
    scan, the plan and the run hooks are the pipeline's own (``pipeline.orchestration``)."""
    import ray

    from pipeline.orchestration import Pipeline
    from pipeline.plan import Lineage
    from pipeline.sources import read_source

    assert not ray.is_initialized(), "the plain baseline runs without Ray"
    with Pipeline.build(cfg, "baseline", connect=False) as pipe:
        start = time.perf_counter()
        scanned, _ = pipe.scan_records(read_source(cfg.source))
        scan_s = time.perf_counter() - start
        plan = pipe.plan(scanned, Lineage())
        if upto is not None:
            pipe.specs = pipe.specs[:[s.name for s in pipe.specs].index(upto)]
        pipe.open_stages(pipe.specs, local=True)
        start = time.perf_counter()
        stages = [s.cls(s.params, pipe.context) for s in pipe.specs]
        sink = _sink(cfg, pipe.run_id, pipe.fps) if write else None
        result = run_stages(stages, plan.rows, cfg.execution.batch_size, keep=keep,
                            on_batch=sink.add if sink else None)
        if sink is not None:
            _commit(sink, pipe.run_id)
        result.seconds = time.perf_counter() - start   # stage construction (model loads) counts too
    return result, scan_s


def _sink(cfg: Any, run_id: str, fps: dict):
    from pipeline.sinks import RunSink
    from core.store import Store

    store = Store(cfg.store)
    return RunSink(store, run_id, fps, store.local_dir("_staging", run_id), cfg.execution.shard_max_count)


def _commit(sink: Any, run_id: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    result = sink.close()
    store = sink.shards.store
    files = store.data_files("features", run_id)   # the pipeline's commit path: data files, one transaction
    for path in result.staged:
        files.write(pq.read_table(path).drop_columns(["keep"]))
    store.commit("features", files, pa.array([], pa.string()), run_id)


def process_start() -> float:
    """This process's start as a ``time.time()`` value (Linux /proc; else now)."""
    try:
        ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        boot = float(open("/proc/stat").read().split("btime")[1].split()[0])
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return time.time()


def main() -> None:
    start = process_start()
    ap = argparse.ArgumentParser()
    ap.add_argument("manifest")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--work", default="pipeline-baseline", help="folder under benchmarks/_work for its outputs")
    args = ap.parse_args()
    from common import pipeline_config, work_dir
    from stages.base import match_library_threads

    match_library_threads()   # OpenCV follows OMP_NUM_THREADS where it is set, as in the actors
    cfg = pipeline_config(args.manifest, work_dir(args.work), batch_size=args.batch_size)
    loop, scan_s = plain_pipeline(cfg, write=True)
    print(json.dumps({"wall_s": time.time() - start, "scan_s": scan_s,
                      "rows": loop.rows, "stage_seconds": loop.stage_seconds}))


if __name__ == "__main__":
    main()
