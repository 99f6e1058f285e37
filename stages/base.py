"""The stage contract: a registered, versioned, parameterised callable over column batches.

A batch is Ray Data's numpy format, ``dict[str, np.ndarray]``, one row per sample. Stages never
drop rows: a bad row gets ``reject_stage`` / ``reject_reason`` / ``reject_detail`` set and every
later stage leaves it alone; the runner routes it to the rejects table.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable

import numpy as np
from pydantic import BaseModel, ConfigDict

from stages.modalities import MODALITIES, REGISTRY  # noqa: F401  (re-exported: stages import it from here)
Batch = dict[str, np.ndarray]

# Columns every batch carries (see core/schema.py for the full row layout).
REJECT_STAGE, REJECT_REASON, REJECT_DETAIL = "reject_stage", "reject_reason", "reject_detail"
REDO = "redo"          # comma-separated modalities this run (re)computes for the row
META = "meta"          # JSON object per row: what stages measured (sizes, durations, ...)
DROPPED = "dropped"    # JSON object per row: modality -> reason, under the drop_modality policy


_USERINFO = re.compile(r"(?<=://)[^/?#@\s]+@")


def redact_urls(text: str) -> str:
    """``text`` with the ``user:password@`` part of every URL in it replaced by ``***@`` (reject
    details and references are stored and shown; credentials must not be)."""
    return _USERINFO.sub("***@", text)


class Reject(Exception):
    """Raised inside a stage for one row (or one modality of it); becomes a recorded reject."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class DecodeTimeout(Reject):
    """A sample's cleanup ran past the run's per-sample budget (``execution.decode_timeout_s``)."""

    def __init__(self, seconds: float, budget: float):
        super().__init__("decode_timeout", f"still decoding after {seconds:.1f} s > decode_timeout_s {budget:g}")


# The running sample's deadline (time.monotonic()); one sample at a time per process.
_deadline = float("inf")
_budget = float("inf")
_started = 0.0


def check_deadline() -> None:
    """Raise ``DecodeTimeout`` once the running sample is past its budget. Decoders call it between
    chunks (``BudgetedBytes`` on every read), so a slow or hostile file stops early; C code that never
    returns to Python is bounded by the size caps checked before decoding (pixels, samples)."""
    now = time.monotonic()
    if now > _deadline:
        raise DecodeTimeout(now - _started, _budget)


class BudgetedBytes(io.BytesIO):
    """In-memory media for a decoder that pulls its input (PIL, PyAV): every read checks the deadline."""

    def read(self, size: int | None = -1) -> bytes:
        check_deadline()
        return super().read(size)

    def readinto(self, buffer) -> int:
        check_deadline()
        return super().readinto(buffer)


class StageParams(BaseModel):
    """Base for every stage's parameters: unknown keys are config errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class StageContext(BaseModel):
    """Run-wide facts a stage may need; identical on every actor."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run_id: str = "adhoc"
    seed: int = 0
    bad_modality: str = "reject_sample"   # or "drop_modality"
    store: str = ""                       # store URI, for stages that consult what is stored
    decode_timeout_s: float = 30.0        # per-sample cleanup budget (decode_timeout past it)
    cache_dir: str = ""                   # where ingest keeps fetched http(s) bodies


@dataclass
class StageStats:
    """What one stage did to one block: the only stats record. The actors send it to the driver
    with the block (``STATS_COLUMN``) and to Prometheus (``pipeline.metrics``); the run record's
    stage table is their sum (datatrove's stat_update, one record per block)."""

    stage: str
    rows_in: int = 0
    rows_out: int = 0
    seconds: float = 0.0
    bytes_in: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    first: float = 0.0      # wall clock (epoch s) when the stage started on its first rows; 0: never
    last: float = 0.0       # ... and when it finished its last ones

    def add(self, other: "StageStats") -> None:
        self.rows_in += other.rows_in
        self.rows_out += other.rows_out
        self.seconds += other.seconds
        self.bytes_in += other.bytes_in
        if other.first:
            self.first = min(self.first or other.first, other.first)
        self.last = max(self.last, other.last)
        for reason, count in other.rejected.items():
            self.rejected[reason] = self.rejected.get(reason, 0) + count

    def count_reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1


STATS_COLUMN = "_stats"   # per block, on its first row: the blocks' StageStats records, JSON


def encode_stats(records: list[StageStats]) -> str:
    return json.dumps([vars(r) for r in records])


def decode_stats(cell: str) -> list[StageStats]:
    return [StageStats(**d) for d in json.loads(cell)] if cell else []


@dataclass(frozen=True)
class RunScope:
    """What a stage's run hooks see (``Stage.start_run`` / ``open_run`` / ``close_run``)."""

    run_id: str
    params: "StageParams"
    local: bool = True                  # the stages run in this process (no Ray actors)
    cache_dir: str = ""                 # a local folder kept between runs of one store ("" = none)
    # The stored original rows (aug 0) as Arrow record batches, for the given columns; None: no store.
    stored: Callable[[list[str]], Iterable[Any]] | None = None
    removed: frozenset[str] = frozenset()   # stored ids this run removes from the store
    incoming: int = 0                       # rows this run's processing pass takes (for sizing)


def fingerprint_of(name: str, version: int, params: dict[str, Any]) -> str:
    blob = json.dumps({"name": name, "version": version, "params": params}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Stage:
    """One step of the pipeline. Subclasses set ``name``, ``version``, ``modality`` and ``Params``,
    declare the columns they read and write and the reasons they reject with, load what they need
    once in ``__init__`` and fill in ``process``. Run-wide state (an index, a cache) is opened and
    closed by the class's run hooks, once per run, around every block it sees."""

    name: ClassVar[str] = ""
    version: ClassVar[int] = 1
    modality: ClassVar[str | None] = None    # whose lineage this stage affects; None = every modality
    Params: ClassVar[type[StageParams]] = StageParams
    # Declared columns ("{modality}" stands for the stage's modality); the plan checks the chain.
    reads: ClassVar[tuple[str, ...]] = ()
    writes: ClassVar[tuple[str, ...]] = ()
    reasons: ClassVar[dict[str, str]] = {}   # reject reason code -> what triggers it (docs, reports)
    whole_block: ClassVar[bool] = False      # True: called once per Ray Data block, not per batch_size rows
    phase: ClassVar[str] = "process"         # "scan": pass 1, before the plan (no media bytes)
    inference: ClassVar[bool] = True         # runs when predicting too (not dedup, not augmentation)
    requires: ClassVar[tuple[str, ...]] = ()  # stages this one is useless without: left out when they are
    # Stages (names or "prefix.") that must run before this one wherever the config lists them:
    # features after augmentation after dedup after cleanup, as the stages' meaning demands.
    runs_after: ClassVar[tuple[str, ...]] = ()
    config_keys: ClassVar[tuple[str, ...]] = ()   # keys of its config entry besides the common ones

    def __init__(self, params: StageParams | dict | None = None, context: StageContext | None = None):
        self.params = params if isinstance(params, self.Params) else self.Params.model_validate(params or {})
        self.context = context or StageContext()
        self.stats = StageStats(self.name)

    # -- declarations -----------------------------------------------------------------------
    @classmethod
    def fingerprint(cls, params: StageParams | dict | None = None) -> str:
        p = params if isinstance(params, cls.Params) else cls.Params.model_validate(params or {})
        return fingerprint_of(cls.name, cls.version, p.model_dump(mode="json"))

    @classmethod
    def reject_reasons(cls) -> dict[str, str]:
        """Every reason the stage can reject with (its own and its role base's), modality filled in."""
        out: dict[str, str] = {}
        for klass in reversed(cls.__mro__):
            for code, what in vars(klass).get("reasons", {}).items():
                out[code.format(modality=cls.modality)] = what.format(modality=cls.modality)
        return out

    @classmethod
    def columns(cls, which: str) -> set[str]:
        """The declared ``reads`` or ``writes``, with the modality filled in."""
        return {c.format(modality=cls.modality) for c in getattr(cls, which)}

    @classmethod
    def from_config(cls, params: dict[str, Any], **keys: Any) -> dict[str, Any]:
        """The stage's parameters from its config entry (``params`` plus its ``config_keys``)."""
        return params

    @classmethod
    def active(cls, params: dict[str, Any]) -> bool:
        """False when these parameters make the stage a no-op (it is then left out of the plan)."""
        return True

    @classmethod
    def expand(cls, params: dict[str, Any]) -> list[tuple[str, dict[str, Any], bool]]:
        """The stages this entry runs as: (name, params, takes the entry's resources). Most run as
        themselves; a pretrained encoder runs as a CPU preprocessing stage and its model stage."""
        return [(cls.name, params, True)]

    @classmethod
    def derives(cls, params: dict[str, Any]) -> dict[str, str]:
        """Modalities these parameters make the stage fill in from another (target -> source), as
        cleanup.video gives a row without audio its clip's audio track. The planner then treats the
        target as present wherever the source is (hashes, lineage, what is recomputed)."""
        return {}

    # -- run hooks (class methods: one call per run, in the driver) -------------------------
    @classmethod
    def start_run(cls, scope: RunScope) -> None:
        """Before the scan, when the pass will run in Ray actors: start slow set-up early."""

    @classmethod
    def open_run(cls, scope: RunScope) -> None:
        """Before the first row reaches the stage."""

    @classmethod
    def close_run(cls, scope: RunScope, failed: bool) -> None:
        """After the last row, whatever happened (``failed``: the run is being abandoned)."""

    # -- rows -------------------------------------------------------------------------------
    def __call__(self, batch: Batch) -> Batch:
        start, wall = time.perf_counter(), time.time()
        n_in = num_rows(batch)
        out = self.process(batch)
        self.stats.rows_in += n_in
        self.stats.rows_out += num_rows(out)
        self.stats.seconds += time.perf_counter() - start
        self.stats.first = self.stats.first or wall
        self.stats.last = time.time()
        return out

    def take_stats(self) -> StageStats:
        """The record of what the stage did since the last call, and a fresh one."""
        record, self.stats = self.stats, StageStats(self.name)
        return record

    def process(self, batch: Batch) -> Batch:
        raise NotImplementedError

    # -- helpers for subclasses -------------------------------------------------------------
    def reject(self, batch: Batch, i: int, reason: str, detail: str = "") -> None:
        batch[REJECT_STAGE][i] = self.name
        batch[REJECT_REASON][i] = reason
        batch[REJECT_DETAIL][i] = detail[:500]
        self.stats.count_reject(reason)


def num_rows(batch: Batch) -> int:
    return len(next(iter(batch.values()))) if batch else 0


def live_rows(batch: Batch, modality: str | None = None, redo_only: bool = True) -> np.ndarray:
    """Indices of rows not rejected; with ``modality``, only rows that carry it and (with
    ``redo_only``) whose features this run recomputes for it.

    Cleanup and augmentation treat every present modality of a processed row (``redo_only=False``)
    so stored media stay consistent; feature stages skip modalities whose stored features are
    still valid (incremental reprocessing)."""
    alive = np.array([r == "" for r in batch[REJECT_REASON]], dtype=bool)
    if modality is not None:
        alive &= np.array([v is not None for v in batch[modality]], dtype=bool)
        if redo_only:
            alive &= np.array([modality in str(r).split(",") for r in batch[REDO]], dtype=bool)
    return np.flatnonzero(alive)


def object_column(values: list[Any]) -> np.ndarray:
    """A 1-D object array (np.array would try to stack equal-length bytes or lists)."""
    col = np.empty(len(values), dtype=object)
    col[:] = values
    return col


def rows_to_batch(rows: list[dict]) -> Batch:
    """Row dicts -> a numpy batch shaped like one out of Ray Data's Arrow blocks: int64 / bool /
    float64 columns where every value is one, else object columns (str, bytes, None). Keys are the
    rows' union in first-seen order; a row without a key has None there."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    batch: Batch = {}
    for key in keys:
        values = [r.get(key) for r in rows]
        kinds = {type(v) for v in values}
        if kinds <= {int, np.int64}:
            batch[key] = np.asarray(values, dtype=np.int64)
        elif kinds <= {bool, np.bool_}:
            batch[key] = np.asarray(values, dtype=bool)
        elif kinds <= {float, np.float64}:
            batch[key] = np.asarray(values, dtype=np.float64)
        else:
            batch[key] = object_column(values)
    return batch


def update_meta(batch: Batch, i: int, **values: Any) -> None:
    meta = json.loads(batch[META][i] or "{}")
    meta.update(values)
    batch[META][i] = json.dumps(meta, sort_keys=True)


@dataclass
class Cleaned:
    """What a modality cleaner returns for one value."""

    value: Any
    meta: dict[str, Any] = field(default_factory=dict)


class ModalityCleaner(Stage):
    """Role base for ``cleanup.<modality>``: fill in ``clean(value) -> Cleaned`` or raise ``Reject``.

    Under the ``drop_modality`` policy a bad modality is removed from the row and recorded in
    ``dropped``; the row is rejected (``no_modality``) only when nothing is left.
    """

    reads = ("{modality}",)
    writes = ("{modality}", META, DROPPED)
    reasons = {"{modality}_error": "the {modality} decoder failed unexpectedly (a bug or an exotic file)",
               "no_modality": "under drop_modality: every modality of the row was dropped",
               "decode_timeout": "cleaning one sample took longer than execution.decode_timeout_s"}

    def clean(self, value: Any) -> Cleaned:
        raise NotImplementedError

    def process(self, batch: Batch) -> Batch:
        m = self.modality
        assert m is not None
        values = batch[m]
        for i in live_rows(batch, m, redo_only=False):
            self.stats.bytes_in += len(values[i]) if isinstance(values[i], (bytes, str)) else 0
            try:
                result = self.clean_within_budget(values[i])
            except Reject as r:
                self.bad_modality(batch, i, r.reason, r.detail)
                continue
            except Exception as exc:  # a decoder bug on one row must not sink the job: record it
                self.bad_modality(batch, i, f"{m}_error", f"{type(exc).__name__}: {exc}")
                continue
            values[i] = result.value
            if result.meta:
                update_meta(batch, i, **{f"{m}_{k}": v for k, v in result.meta.items()})
        return batch

    def clean_within_budget(self, value: Any) -> Cleaned:
        """``clean`` with the sample's deadline set: past it, the sample is rejected
        (``decode_timeout``) whether the decoder noticed on a read or only finished late."""
        global _deadline, _budget, _started
        _budget = self.context.decode_timeout_s
        _started = time.monotonic()
        _deadline = _started + _budget
        try:
            result = self.clean(value)
            check_deadline()
            return result
        finally:
            _deadline = float("inf")

    def derived(self, batch: Batch, i: int) -> bool:
        """The row's value of this modality was made from another (meta ``<m>_from_<source>``)."""
        return _derived_keys(json.loads(batch[META][i] or "{}"), str(self.modality))

    def bad_modality(self, batch: Batch, i: int, reason: str, detail: str) -> None:
        """Reject the row, or (``drop_modality``, or a value another modality's stage made, like a
        clip's audio track: the clip stays good without it) drop the modality and keep the row."""
        if self.context.bad_modality != "drop_modality" and not self.derived(batch, i):
            self.reject(batch, i, reason, detail)
            return
        m = self.modality
        batch[m][i] = None
        for column in REGISTRY[m].extra_columns:
            if column in batch:
                batch[column][i] = None
        dropped = json.loads(batch[DROPPED][i] or "{}")
        dropped[m] = reason
        batch[DROPPED][i] = json.dumps(dropped, sort_keys=True)
        self.stats.count_reject(reason)
        if all(batch[other][i] is None for other in MODALITIES):
            self.reject(batch, i, "no_modality", f"every modality dropped: {dropped}")


def _derived_keys(meta: dict[str, Any], m: str) -> bool:
    return any(k.startswith(f"{m}_from_") and v for k, v in meta.items())


def derived_modalities(batch: Batch, i: int) -> set[str]:
    """The modalities of row ``i`` that a stage made from another (meta ``<m>_from_<source>``)."""
    cells = batch.get(META)
    meta = json.loads(cells[i] or "{}") if cells is not None else {}
    return {m for m in MODALITIES if _derived_keys(meta, m)}


def match_library_threads() -> None:
    """OpenCV sizes its thread pool by the machine's cores, not the actor's CPUs: two 1-CPU actors
    on a 2-core machine would run four busy threads. Ray sets OMP_NUM_THREADS (what numpy's BLAS
    and torch follow) to the actor's CPUs; give OpenCV the same (the benchmarks' single-threaded
    plain loops call it too)."""
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:
        import cv2

        cv2.setNumThreads(int(threads))
