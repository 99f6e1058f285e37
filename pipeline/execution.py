"""Turning stage specs into a Ray Data plan: consecutive stages with equal resources share one
actor pool (models load once per actor; no serialisation between them), each group is one
``map_batches`` over a callable class."""
from __future__ import annotations

import math
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np
import ray

from core.config import Config, Resources
from pipeline.plan import StageSpec
from pipeline.spill import Spill
from core.schema import normalize_batch
from stages.media import forget_decoded
from stages.base import (STATS_COLUMN, Batch, StageContext, StageStats, decode_stats, encode_stats, match_library_threads, num_rows,
                         object_column, rows_to_batch)

@dataclass
class PlanRows:
    """The rows a processing pass takes: a list (a small plan, ``predict``) or a spill read block
    by block, never whole (a streamed plan)."""

    rows: list[dict] | None = None
    spill: Spill | None = None

    def __len__(self) -> int:
        return len(self.rows) if self.rows is not None else self.spill.rows if self.spill is not None else 0

    def all(self) -> list[dict]:
        return self.rows if self.rows is not None else list(self.spill.dicts()) if self.spill is not None else []

    def chunks(self, size: int) -> Iterator[list[dict]]:
        if self.rows is not None:
            for k in range(0, len(self.rows), size):
                yield self.rows[k:k + size]
            return
        chunk: list[dict] = []
        for row in self.spill.dicts() if self.spill is not None else ():
            chunk.append(row)
            if len(chunk) == size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk


TASKS_IN_FLIGHT = 4   # Ray Data tasks queued per actor
BLOCKS_PER_CPU = 8    # blocks at least, where the rows allow: the last ones keep every actor busy
INPUT_BLOCK = "_input_block"   # the first pool's input column: which of ``inputs`` a block stands for


DASHBOARD_ROWS = 100_000   # ray.dashboard: auto starts the dashboard for a run of at least this many new inputs


def init_ray(cfg: Config, rows: int | None = None) -> dict[str, Any]:
    """Connect to ``ray.address`` / RAY_ADDRESS, or start Ray in-process (with the dashboard as
    ``ray.dashboard`` says; ``rows``: the new inputs of the run Ray starts for, None for other
    work). Returns cluster facts."""
    dashboard = ""
    remote = bool(cfg.ray.address or os.environ.get("RAY_ADDRESS"))
    if not ray.is_initialized():
        address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
        kwargs: dict[str, Any] = {"ignore_reinit_error": True, "logging_level": "WARNING"}
        if address:
            kwargs["address"] = address
        else:
            kwargs.update(num_cpus=cfg.ray.num_cpus, num_gpus=cfg.ray.num_gpus,
                          include_dashboard=dashboard_wanted(cfg, rows))
            if cfg.ray.metrics_export_port:
                kwargs["_metrics_export_port"] = cfg.ray.metrics_export_port
        context = ray.init(**kwargs)
        dashboard = getattr(context, "dashboard_url", "") or ""
        # Progress bars on a terminal; in logs (CI, jobs) they are noise.
        ray.data.DataContext.get_current().enable_progress_bars = cfg.ray.progress_bars and sys.stderr.isatty()
    res = ray.cluster_resources()
    alive = [node for node in ray.nodes() if node.get("Alive", True)]
    return {"num_cpus": int(res.get("CPU", 1)), "num_gpus": int(res.get("GPU", 0)), "dashboard_url": dashboard,
            "remote": beyond_this_machine(alive, ray.util.get_node_ip_address()), "connected": remote,
            "ray_started": True}


def beyond_this_machine(nodes: list[dict], here: str) -> bool:
    """Whether Ray's workers may run where this machine's disk is not: more than one node, or one
    on another address. A Ray kept running on this machine (``ray start --head``, then
    ``ray.address: auto``) is not: its actors read and write the local store as an in-process
    Ray's do, and the scan stays in the driver."""
    return len(nodes) > 1 or any(node.get("NodeManagerAddress") != here for node in nodes)


def dashboard_wanted(cfg: Config, rows: int | None) -> bool:
    if cfg.ray.dashboard == "auto":
        return rows is None or rows >= DASHBOARD_ROWS
    return bool(cfg.ray.dashboard)


class RayStart:
    """``ray.init`` on a thread of its own, so that the driver reads and plans while Ray's
    processes start (3-4 s on a 2-core machine, RESULTS.md). The thread stays parked until
    ``shutdown`` (or the process's end): Linux ties Ray's child processes to the thread that
    started them (PR_SET_PDEATHSIG), and they would be killed, not shut down, with it."""

    def __init__(self, cfg: Config, rows: int | None = None):
        self.info: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self._ready, self._release = threading.Event(), threading.Event()
        threading.Thread(target=self._run, args=(cfg, rows), name="mmpipe-ray-start", daemon=True).start()

    def _run(self, cfg: Config, rows: int | None) -> None:
        try:
            self.info = init_ray(cfg, rows)
        except BaseException as exc:   # handed to the thread that waits for Ray
            self.error = exc
        finally:
            self._ready.set()
        self._release.wait()

    def wait(self) -> dict[str, Any]:
        self._ready.wait()
        if self.error is not None:
            raise self.error
        assert self.info is not None
        return self.info

    def shutdown(self) -> None:
        self._ready.wait()
        try:
            ray.shutdown()
        finally:
            self._release.set()


def cluster_facts(cfg: Config) -> dict[str, Any]:
    """Ray's facts when Ray is up or the config names a cluster (connecting to it); otherwise this
    machine's, without starting Ray: a run whose plan the driver handles alone (``runs_locally``)
    never needs it, and starting it costs seconds. ``ensure_ray`` starts it when a plan does."""
    if ray.is_initialized() or cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        return init_ray(cfg)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return {"num_cpus": int(cfg.ray.num_cpus or cpus), "num_gpus": int(cfg.ray.num_gpus or 0), "dashboard_url": "",
            "remote": False, "connected": False, "ray_started": False}


def ensure_ray(cfg: Config, info: dict[str, Any], log, rows: int | None = None) -> dict[str, Any]:
    """Start (or connect to) Ray if ``cluster_facts`` did not; logs the dashboard address."""
    if info["ray_started"]:
        return info
    info = init_ray(cfg, rows)
    if info.get("dashboard_url"):
        log(f"Ray dashboard: http://{info['dashboard_url']}")
    return info


class StageChain:
    """Runs a fused group of stages inside one Ray actor (or the driver). What each stage did to
    each block is one ``StageStats`` record: recorded as Prometheus metrics here and sent to the
    driver with the block (``STATS_COLUMN``, on its first row) for the run record."""

    def __init__(self, specs: list[tuple[str, dict]], context: dict, batch_size: int | None = None,
                 shards: dict | None = None, drop_media: bool = False, inputs: list | None = None):
        from stages.registry import resolve_stage

        match_library_threads()
        ctx = StageContext(**context)
        self.stages = [resolve_stage(ref)(params, ctx) for ref, params in specs]
        self.batch_size = batch_size
        self.shards = shards   # the last group writes the samples: {store_uri, run_id, max_count}
        self.drop_media = drop_media   # the last group sends no media back (they are in the shards, or unwanted)
        self.metrics = stage_metrics()
        self.inputs = inputs   # the first pool of ``build_dataset``: its blocks' rows, by reference

    def __call__(self, batch: Batch) -> Iterator[Batch]:
        """A block may hold several stage batches. Each stage runs over the whole block in turn, in
        pieces of ``batch_size`` rows (an encoder's batch), or in one piece when it asks for the
        block (``Stage.whole_block``: dedup, one index round trip per block, not per piece). The
        stages see rows in block order, so the result does not depend on the block size."""
        if self.inputs is not None:
            batch = rows_to_batch([row for k in batch[INPUT_BLOCK] for row in _input_rows(self.inputs[k])])
        batch = self.run_block(batch)
        if not num_rows(batch):
            return
        if self.shards is not None:
            from pipeline.sinks import SHARD_WRITING, write_block_shards

            start, wall = time.perf_counter(), time.time()
            out = write_block_shards([batch], **self.shards)
            n = num_rows(batch)
            record = StageStats(SHARD_WRITING, rows_in=n, rows_out=n, seconds=time.perf_counter() - start,
                                first=wall, last=time.time())
            first = out[0][STATS_COLUMN]
            first[0] = encode_stats(decode_stats(first[0]) + [record])
            yield from out
        elif self.drop_media:
            from pipeline.sinks import drop_media

            yield drop_media(batch)
        else:
            yield batch

    def run_block(self, batch: Batch) -> Batch:
        try:
            return self._run_block(batch)
        finally:
            forget_decoded()   # the block's decoded media served its stages (stages/media.py)

    def _run_block(self, batch: Batch) -> Batch:
        batch = normalize_batch(batch)
        # Earlier pools' records leave the rows while the stages run (a stage that copies rows
        # would copy them too) and come back on the first row.
        records = [r for cell in batch.pop(STATS_COLUMN, ()) for r in decode_stats(cell)]
        for stage in self.stages:
            n = num_rows(batch)
            if n == 0:
                break
            size = n if stage.whole_block else self.batch_size or n
            parts = [stage(_rows(batch, k, k + size)) for k in range(0, n, size)]
            batch = parts[0] if len(parts) == 1 else {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
            records.append(stage.take_stats())
            if self.metrics is not None:
                self.metrics.record(records[-1])
        n = num_rows(batch)
        if n:
            batch[STATS_COLUMN] = object_column([encode_stats(records)] + [""] * (n - 1))
        return batch


def _input_rows(source) -> list[dict]:
    """One input block's rows: an object-store reference, or (path, row group) of a plan spill."""
    if isinstance(source, tuple):
        import pyarrow.parquet as pq

        path, group = source
        return pq.ParquetFile(path).read_row_group(group).to_pylist()
    return ray.get(source)


def _rows(batch: Batch, start: int, stop: int) -> Batch:
    return batch if start == 0 and stop >= num_rows(batch) else {key: col[start:stop] for key, col in batch.items()}


def stage_metrics():
    try:
        from pipeline.metrics import StageMetrics
    except ImportError:
        return None
    return StageMetrics()


@dataclass
class Group:
    specs: list[StageSpec]
    resources: Resources


def group_stages(specs: list[StageSpec], fuse: bool) -> list[Group]:
    groups: list[Group] = []
    for spec in specs:
        if fuse and groups and groups[-1].resources == spec.resources:
            groups[-1].specs.append(spec)
        else:
            groups.append(Group([spec], spec.resources))
    return groups


def block_rows(n_rows: int, groups: list[Group], cfg: Config, num_cpus: int) -> int:
    """Rows per Ray Data block, the unit of a task. Each task costs a scheduling round trip, an
    object-store put and a batch conversion, so a block holds several stage batches (up to
    ``execution.block_rows``) — but no fewer than BLOCKS_PER_CPU blocks per CPU where the rows allow
    (the last blocks keep every actor busy to the end), and never less than the largest stage batch
    (a GPU encoder's batch is not cut up)."""
    largest = max((g.resources.batch_size for g in groups), default=cfg.execution.batch_size)
    spread = math.ceil(n_rows / max(1, num_cpus * BLOCKS_PER_CPU))
    return max(largest, min(cfg.execution.block_rows, spread))


def build_dataset(rows: PlanRows | list[dict], specs: list[StageSpec], context: StageContext, cfg: Config,
                  num_cpus: int, shards: dict | None = None, drop_media: bool = False,
                  shared_disk: bool = True) -> "ray.data.Dataset":
    """The processing pass as a lazy Ray Dataset (nothing runs until it is iterated). With
    ``shards`` ({store_uri, run_id, max_count}) the last actor pool writes the samples' shards;
    either that or ``drop_media`` keeps the media bytes in the actors (``has_<modality>`` says
    what each row had)."""
    # No stages still makes one pool: it turns the input references back into rows.
    groups = group_stages(specs, cfg.execution.fuse) or [Group([], Resources(batch_size=cfg.execution.batch_size))]
    rows = rows if isinstance(rows, PlanRows) else PlanRows(rows)
    per_block = block_rows(len(rows), groups, cfg, num_cpus)
    if rows.spill is not None and shared_disk and rows.spill.group_rows == per_block:
        # A streamed plan on one machine: each task reads its block's row group of the plan spill.
        inputs: list = rows.spill.groups()
    else:
        # Each block's rows go to the object store as they are, one pickled list (a memory copy of
        # its media); the first pool's actors make their numpy batches from them. ``from_items``
        # turned every row into Arrow in the driver and the actors turned it back: 0.85 s of the
        # driver's CPU at 30000 media rows against 0.4 s for the puts (RESULTS.md).
        inputs = [ray.put(chunk) for chunk in rows.chunks(per_block)]
    inputs = inputs or [ray.put([])]
    blocks = len(inputs)
    ds = ray.data.from_items([{INPUT_BLOCK: k} for k in range(blocks)], override_num_blocks=blocks)
    for k, g in enumerate(groups):
        # A small run (an incremental one) starts no more actors than it has blocks: each actor
        # start imports and loads every stage of its group, seconds of work for nothing.
        actors = max(1, min(g.resources.concurrency, blocks))
        ds = ds.map_batches(
            StageChain,
            fn_constructor_kwargs={"specs": [s.to_actor for s in g.specs],
                                   "context": context.model_dump(),
                                   "batch_size": g.resources.batch_size,
                                   "shards": shards if k == len(groups) - 1 else None,
                                   "drop_media": drop_media and k == len(groups) - 1,
                                   "inputs": inputs if k == 0 else None},
            # Four tasks queued per actor (Ray Data's default is two): with two, each actor on a busy
            # 2-core machine was busy only 68 % of the time, waiting for its next block; over 12000
            # feature rows the machine was 82 % busy with two queued, 96 % with four (RESULTS.md).
            compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=TASKS_IN_FLIGHT),
            num_cpus=g.resources.num_cpus,
            num_gpus=g.resources.num_gpus or None,
            # The first pool takes whole blocks (StageChain cuts them into stage batches); later
            # ones re-bundle what rejects and dedup thinned out, so a GPU batch stays full.
            batch_size=None if k == 0 else per_block,
            batch_format="numpy",
            zero_copy_batch=False,
            # Ray Data's actor pools restart a dead actor and retry its batches by default
            # (max_restarts=-1, max_task_retries=-1): a killed stage actor loses nothing.
        )
    return ds


def run_local(rows: PlanRows | list[dict], specs: list[StageSpec], context: StageContext, batch_size: int) -> Iterable[Batch]:
    """The same stages, fused into one chain, in this process: the small-plan fast path. With the
    threads of a 1-CPU actor: a BLAS or OpenCV reduction over more threads sums in another order,
    and the driver's features must equal the actors' bit for bit."""
    import cv2
    from threadpoolctl import threadpool_limits

    chain = StageChain([s.to_actor for s in specs], context.model_dump(), batch_size)
    cv_threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        with threadpool_limits(limits=1):
            for part in (rows if isinstance(rows, PlanRows) else PlanRows(rows)).chunks(batch_size):
                yield from chain({key: object_column([r.get(key) for r in part]) for key in part[0]})
    finally:
        cv2.setNumThreads(cv_threads)


def runs_locally(rows: PlanRows | list[dict], specs: list[StageSpec], cfg: Config) -> bool:
    return 0 < len(rows) <= cfg.execution.local_max_rows and not any(s.resources.num_gpus for s in specs)


def process(rows: PlanRows | list[dict], specs: list[StageSpec], context: StageContext, cfg: Config, num_cpus: int,
            local: bool, shards: dict | None = None, shared_disk: bool = True) -> Iterable[Batch]:
    """The processing pass: in this process for small plans, else through Ray Data actor pools
    (whose last pool writes the shards when ``shards`` is given). ``shared_disk``: the actors can
    read this machine's files (Ray runs here), so a spilled plan is read by the tasks themselves."""
    if local:
        return run_local(rows, specs, context, cfg.execution.batch_size)
    return iter_output(build_dataset(rows, specs, context, cfg, num_cpus, shards, shared_disk=shared_disk))


def shards_in_actors(cfg: Config, store_is_local: bool, remote: bool) -> bool:
    """Whether the stage actors write the shards (``execution.shard_writer``; ``auto``: yes, unless
    the store is a local path and Ray is a cluster (``remote``): only the driver's disk has it)."""
    if cfg.execution.shard_writer != "auto":
        return cfg.execution.shard_writer == "actors"
    return not (store_is_local and remote)


def iter_output(ds: "ray.data.Dataset") -> Iterable[Batch]:
    yield from ds.iter_batches(batch_format="numpy", batch_size=None)
