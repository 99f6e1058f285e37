"""One orchestration for every pass over the data: ``run`` (then commits), ``predict`` (inference
stages only, no commit) and the benchmarks' plain baseline (no Ray) all resolve the stages, scan,
plan and process through ``Pipeline``. It names no stage: what a stage needs around the rows it
sees (an index, a cache) it opens and closes in its own run hooks, which ``Pipeline`` calls."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import ray

from core.config import Config
from core.store import Store
from pipeline.execution import PlanRows, RayStart, cluster_facts, ensure_ray, process, runs_locally, stage_metrics
from pipeline.plan import (Lineage, Plan, StageSpec, derived_modalities, fingerprints, make_plan, resolve_stages,
                           scan_spec)
from pipeline.sources import SourceRecord, records_table
from stages.base import Batch, RunScope, Stage, StageContext, StageStats
from stages.modalities import MEDIA

SCAN_BATCH = 64   # records per scan call


@dataclass
class Pipeline:
    """The resolved stages of one run and the run-wide state around them."""

    cfg: Config
    run_id: str
    scan: StageSpec
    specs: list[StageSpec]
    store: Store | None = None
    info: dict[str, Any] = field(default_factory=dict)   # cluster facts (``execution.cluster_facts``)
    include: Callable[[type[Stage]], bool] = lambda stage: True
    local: bool = True                                   # the last pass ran in this process
    scan_stats: StageStats | None = None                 # what the last ``scan_chunks`` did
    ray_wait_s: float = 0.0                              # how long the last pass waited for Ray to start
    _open: dict[type[Stage], RunScope] = field(default_factory=dict)   # hooks to close, in order
    _failed: bool = False
    _ray_start: RayStart | None = None
    _started_ray: bool = False

    @classmethod
    def build(cls, cfg: Config, run_id: str, store: Store | None = None,
              include: Callable[[type[Stage]], bool] = lambda stage: True, connect: bool = True) -> "Pipeline":
        """Resolve and validate every stage (before any data is read). ``include`` filters the
        stages (prediction keeps the inference stages); ``connect``: look at (or join) Ray."""
        pipe = cls(cfg, run_id, scan_spec(cfg), [], store, include=include)
        pipe.specs = pipe._resolve(1)
        if connect:
            pipe.info = cluster_facts(cfg)
            pipe.specs = pipe._resolve(pipe.info["num_cpus"])
        else:
            pipe.info = {"num_cpus": 1, "num_gpus": 0, "dashboard_url": "", "remote": False, "connected": False,
                         "ray_started": False}
        return pipe

    def _resolve(self, num_cpus: int) -> list[StageSpec]:
        """The stages with resources sized for ``num_cpus`` (actor pools default to one per CPU)."""
        return [s for s in resolve_stages(self.cfg, num_cpus) if self.include(s.cls)]

    @property
    def fps(self) -> dict[str, str]:
        return fingerprints(self.cfg, self.specs)

    @property
    def derived(self) -> dict[str, str]:
        return derived_modalities(self.specs)

    @property
    def context(self) -> StageContext:
        return StageContext(run_id=self.run_id, seed=self.cfg.seed, bad_modality=self.cfg.bad_modality,
                            store=self.store.uri if self.store else "",
                            decode_timeout_s=self.cfg.execution.decode_timeout_s,
                            cache_dir=str(self.store.local_dir("cache", "http")) if self.store else "")

    # -- run hooks ----------------------------------------------------------------------------
    def _scope(self, spec: StageSpec, local: bool, removed: frozenset[str] = frozenset(), incoming: int = 0) -> RunScope:
        stored = None
        if self.store is not None:
            store = self.store
            stored = lambda columns: store.batches("features", columns, filter=_originals())  # noqa: E731
        return RunScope(self.run_id, spec.cls.Params.model_validate(spec.params), local=local,
                        cache_dir=str(self.store.local_dir("cache")) if self.store else "",
                        stored=stored, removed=removed, incoming=incoming)

    def start_early(self, new_inputs: int) -> None:
        """When the pass will surely run in actors (more inputs are new than
        ``execution.local_max_rows``): start Ray in the background if it is not up (the driver
        reads and plans meanwhile), else call the stages' ``start_run`` now."""
        if new_inputs <= self.cfg.execution.local_max_rows:
            return
        if not self.info.get("ray_started"):
            if self._ray_start is None:
                self._ray_start = RayStart(self.cfg, new_inputs)
            return
        for spec in self.specs:
            scope = self._scope(spec, local=False)
            spec.cls.start_run(scope)
            self._open.setdefault(spec.cls, scope)

    def open_stages(self, specs: list[StageSpec], local: bool, removed: frozenset[str] = frozenset(),
                    incoming: int = 0) -> None:
        for spec in specs:
            scope = self._scope(spec, local, removed, incoming)
            self._open[spec.cls] = scope
            spec.cls.open_run(scope)

    def release_ray(self) -> threading.Thread | None:
        """After the last pass: close the stages' run hooks (their actors) and shut down the Ray
        that this pipeline started, on a thread, so that the driver's commit overlaps Ray's
        shutdown (a second or more). None when it did not start Ray."""
        if not self._started_ray:
            return None
        self.close()
        self._started_ray = False
        stop = self._ray_start.shutdown if self._ray_start is not None else ray.shutdown
        self._ray_start = None
        stopping = threading.Thread(target=stop, name="mmpipe-ray-shutdown")
        stopping.start()
        return stopping

    def close(self) -> None:
        """Every opened stage's ``close_run``, whatever happened (each is called once); a Ray
        started early that no pass used is shut down."""
        while self._open:
            cls, scope = self._open.popitem()
            cls.close_run(scope, self._failed)
        if self._ray_start is not None and not self._started_ray:
            start, self._ray_start = self._ray_start, None
            start.shutdown()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._failed = exc_type is not None
        self.close()

    # -- phases -------------------------------------------------------------------------------
    def scan_chunks(self, chunks: Iterable[pa.Table]) -> Iterator[pa.Table]:
        """Pass 1, chunk by chunk (``SCAN_INPUT`` columns in, the scan's columns out): resolve,
        fetch and hash every record (small output, no media bytes). On a cluster in Ray actors
        near the data; on one machine in this process (an actor pool's start-up is the main fixed
        cost of a small incremental run). What the scan did is ``self.scan_stats`` once the chunks
        are consumed."""
        cls = self.scan.cls
        remote = bool(self.info.get("remote"))
        self.open_stages([self.scan], local=not remote)
        stage = None if remote else cls(self.scan.params, self.context)
        outputs = sorted(cls.columns("writes"))
        self.scan_stats = StageStats(self.scan.name)
        for table in chunks:
            if not table.num_rows:
                continue
            if remote:
                out, stats = _scan_remote(table, self.scan, self.context, self.info["num_cpus"])
                self.scan_stats.add(stats)
                yield out
                continue
            columns = _scan_input(table)
            parts = [stage({c: v[k:k + SCAN_BATCH] for c, v in columns.items()}) for k in range(0, table.num_rows, SCAN_BATCH)]
            yield pa.table({c: pa.array(np.concatenate([p[c] for p in parts]), pa.int64() if c == "row" else pa.string())
                            for c in outputs})
        if stage is not None:
            stats = stage.take_stats()
            metrics = stage_metrics()   # the same per-stage metrics the actors export
            if metrics is not None:
                metrics.record(stats)
            self.scan_stats.add(stats)

    def scan_records(self, records: list[SourceRecord]) -> tuple[list[dict], StageStats]:
        """Pass 1 over records held in memory (``predict``, the plain baseline)."""
        out = [row for table in self.scan_chunks([records_table(records)]) for row in table.to_pylist()]
        return out, self.scan_stats

    def plan(self, scanned: list[dict], lineage: Lineage, dedup: bool = True) -> Plan:
        return make_plan(scanned, lineage, self.fps, self.cfg, dedup=dedup, derived=self.derived)

    def process(self, plan: Plan | PlanRows, shards: Callable[[bool], dict | None] = lambda local: None,
                log: Callable[[str], None] = lambda _: None, removed: frozenset[str] = frozenset()) -> Iterable[Batch]:
        """The processing pass over the plan's rows: in this process for a small plan, else in Ray
        Data actor pools (Ray started now if it was not). ``shards(local)`` says where the last
        pool writes the samples' shards (None: the caller does). ``removed``: the stored ids the
        run removes (the stages' run hooks see them)."""
        if isinstance(plan, Plan):
            rows, removed = PlanRows(plan.rows), frozenset(plan.removed)
        else:
            rows = plan
        if not len(rows):
            return iter(())
        # A stage's run state may grow with the store (dedup's index seeds from every stored row):
        # in the driver only while the store is small too.
        stored = self.store.count("features", _originals()) if self.store is not None else 0
        local = runs_locally(rows, self.specs, self.cfg) and stored <= self.cfg.execution.local_max_stored_rows
        if not local and not self.info.get("ray_started"):
            started = time.perf_counter()
            if self._ray_start is not None:
                self.info = self._ray_start.wait()
                if self.info.get("dashboard_url"):
                    log(f"Ray dashboard: http://{self.info['dashboard_url']}")
            else:
                self.info = ensure_ray(self.cfg, self.info, log, len(rows))
            self.ray_wait_s = time.perf_counter() - started
            self._started_ray = not self.info.get("connected")
            self.specs = self._resolve(self.info["num_cpus"])
        self.open_stages(self.specs, local, removed, len(rows))
        self.local = local
        return process(rows, self.specs, self.context, self.cfg, self.info["num_cpus"], local, shards(local),
                       shared_disk=not self.info.get("remote"))


def _originals():
    import pyarrow.compute as pc

    return pc.field("aug") == 0


def _scan_input(table: pa.Table) -> dict[str, np.ndarray]:
    """A chunk of ``SCAN_INPUT`` as the scan stage's numpy columns, each medium's reference also as
    ``<m>_ref`` (the scan resolves ``<m>`` in place and keeps what the source said)."""
    columns = {c: table[c].to_numpy(zero_copy_only=False) for c in table.column_names}
    columns.update((f"{m}_ref", columns[m].copy()) for m in MEDIA)
    return columns


def _scan_remote(table: pa.Table, spec: StageSpec, context: StageContext, num_cpus: int) -> tuple[pa.Table, StageStats]:
    from pipeline.execution import StageChain
    from stages.base import STATS_COLUMN, decode_stats

    for m in MEDIA:
        table = table.append_column(f"{m}_ref", table[m])
    blocks = max(1, min(table.num_rows, num_cpus * 2))
    step = -(-table.num_rows // blocks)
    ds = ray.data.from_arrow([table.slice(k, step) for k in range(0, table.num_rows, step)])
    ds = ds.map_batches(StageChain, fn_constructor_kwargs={"specs": [spec.to_actor], "context": context.model_dump()},
                        compute=ray.data.ActorPoolStrategy(size=max(1, num_cpus)), batch_size=SCAN_BATCH,
                        batch_format="numpy", zero_copy_batch=False)
    out = ds.take_all()
    stats = StageStats(spec.name)
    for r in out:
        for record in decode_stats(r.get(STATS_COLUMN) or ""):
            stats.add(record)
    outputs = sorted(spec.cls.columns("writes"))
    return pa.Table.from_pylist([{c: r[c] for c in outputs} for r in out]), stats


def timed(seconds: dict[str, float], name: str, peaks: dict[str, float] | None = None):
    """A context manager adding the wall seconds of a block to ``seconds[name]``; with ``peaks``,
    this process's peak RSS (MiB) at the block's end goes to ``peaks[name]`` (the phase where the
    peak first reaches its maximum is the one that made it)."""
    import resource
    from contextlib import contextmanager

    @contextmanager
    def _timer():
        start = time.perf_counter()
        try:
            yield
        finally:
            seconds[name] = round(seconds.get(name, 0.0) + time.perf_counter() - start, 3)
            if peaks is not None:
                peaks[name] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)

    return _timer()
