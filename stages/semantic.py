"""``semantic_dedup``: near-duplicates by meaning, from the feature embeddings (as NeMo Curator's
semantic dedup): a sample whose every compared embedding is within a cosine threshold of a sample
kept earlier, in the store or in this run, is rejected as ``duplicate`` with the kept id, like the
exact and perceptual-hash kinds in ``dedup``. It catches what hashes miss (a re-encoded, cropped
image; a reworded caption) as far as the encoders see meaning: pretrained encoders see much more
than the weight-free defaults.

Opt-in (``stages.semantic_dedup: {}`` in a config); it runs after the feature stages. The run's
index holds, per compared modality, an HNSW graph of int8 vectors (usearch, cosine), each vector
scaled by its largest component before rounding (usearch's own cast multiplies by 127, which leaves
a high-dimensional unit vector a few levels per component); the candidates it finds are rescored
with the row's float32 vector. Why usearch int8: a quarter of hnswlib float32's vector bytes, and
only a pair within a rounding error of the threshold changes verdict, where float16 keeps twice the
bytes and FAISS's 8-bit scalar quantizer (a range per dimension) flipped more pairs at the threshold
(benchmarks/RESULTS.md, "Semantic dedup index").

It is seeded from the stored originals' embeddings, streamed in record batches, in a named Ray
actor that checks one block at a time, or in this process for runs in the driver. A store of more
than ``rows_per_shard`` rows is spread over shard actors as SemDeDup spreads its work (one per
``rows_per_shard`` rows, whatever the cluster's CPUs: memory sets the count): per compared
modality, spherical k-means centroids fit on a sample of the stored vectors route each vector to
the shard of its nearest centroid, and a row is looked up in
its ``probe`` nearest shards and in any other about as near (``probe_margin``). The
index actor takes each row's nearest candidates over those shards, checks the candidates' other
modalities on whichever shard holds them, settles the block's rows among themselves, and only then
registers its kept rows in their shards; blocks take turns through all of it. Which of two
near-duplicate inputs of one run is kept follows the order their blocks reach the index; against
the store, the stored sample is always kept.
"""
from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Iterator

import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator

import ray

from stages.base import MODALITIES, REDO, Batch, RunScope, Stage, StageParams, fingerprint_of
from stages.dedup import AUG, SeededActor, _Column, _Strings, originals_to_check, shard_count
from stages.dedup import close_index as _close_actors
from stages.registry import register_stage

M, EF_CONSTRUCTION, EF_SEARCH = 16, 128, 256
RUN_KEY = 1 << 40          # this run's rows are keyed after every stored row (those: their scan position)
SAMPLE_ROWS = 16_384       # stored vectors per modality the routing centroids are fit on
CLUSTERS_PER_SHARD = 4     # more clusters than shards, so that the shards can be balanced by cluster size
KMEANS_ROUNDS = 10
RESCORE_SLACK = 0.02       # candidates whose int8 cosine is this far under the threshold are rescored too
_LOCAL: dict[str, "SemanticIndex"] = {}   # a run's index in this process (runs in the driver)
_ACTORS: dict[str, Any] = {}                # a run's index actor, by name


def index_name(run_id: str) -> str:
    return f"mmpipe-semdedup-{run_id}"


class SemanticParams(StageParams):
    # Whose embeddings are compared: a duplicate must have every one of these the row has.
    modalities: list[str] = Field(default_factory=lambda: ["image", "text"])
    threshold: float = Field(0.95, gt=0.0, le=1.0)   # cosine similarity, every compared modality ...
    thresholds: dict[str, float] = Field(default_factory=dict)   # ... or its own, e.g. {text: 0.85}
    candidates: int = Field(10, ge=1)   # nearest rows looked at per row and modality (graph search width: 2x, >= 256)
    rows_per_shard: int = Field(500_000, ge=1)        # stored rows per index shard actor
    shards: int = Field(0, ge=0)        # 0: ceil(stored rows / rows_per_shard)
    probe: int = Field(2, ge=1)         # shards a row is looked up in, nearest first (by their centroids) ...
    # ... and any other whose nearest centroid is within probe_margin x tan(arccos threshold) (cosine)
    # of the row's nearest: the looser the threshold, the farther from its centroid a duplicate may lie.
    probe_margin: float = Field(0.1, ge=0.0)

    # Where the index's rows live and where a row is looked up are left out of the stage
    # fingerprint: they decide which rows get compared, not the rule, and stores keep their rows.
    RUNTIME_ONLY: ClassVar[frozenset[str]] = frozenset({"rows_per_shard", "shards", "probe", "probe_margin"})

    @field_validator("modalities")
    @classmethod
    def _known(cls, modalities: list[str]) -> list[str]:
        unknown = sorted(set(modalities) - set(MODALITIES))
        if unknown or not modalities:
            raise ValueError(f"modalities must be some of {', '.join(MODALITIES)}, got {modalities}")
        return [m for m in MODALITIES if m in modalities]

    @field_validator("thresholds")
    @classmethod
    def _in_range(cls, thresholds: dict[str, float]) -> dict[str, float]:
        for m, t in thresholds.items():
            if m not in MODALITIES or not 0.0 < t <= 1.0:
                raise ValueError(f"thresholds: {m}: {t} (a modality and a cosine similarity in (0, 1])")
        return thresholds

    def limit(self, modality: str) -> float:
        return self.thresholds.get(modality, self.threshold)

    def margin(self, modality: str) -> float:
        t = self.limit(modality)
        return self.probe_margin * math.sqrt(1.0 - t * t) / t

    def fingerprint_fields(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude=set(self.RUNTIME_ONLY))


def _params(params: dict | SemanticParams) -> SemanticParams:
    return params if isinstance(params, SemanticParams) else SemanticParams.model_validate(params)


# -- vectors --------------------------------------------------------------------------------
@dataclass
class _Query:
    """Rows as the index sees them: per compared modality unit float32 vectors and whether the row has it."""

    ids: list[str]
    vectors: dict[str, np.ndarray]
    present: dict[str, np.ndarray]

    @classmethod
    def of(cls, ids: list[str], vectors: dict[str, np.ndarray], present: dict[str, np.ndarray]) -> "_Query":
        return cls(list(ids), {m: _unit(v) for m, v in vectors.items()},
                   {m: np.asarray(p, bool) for m, p in present.items()})

    def __len__(self) -> int:
        return len(self.ids)


def _matrix(column: pa.Array) -> np.ndarray:
    n = len(column)
    lengths = column.value_lengths().fill_null(0).to_numpy(zero_copy_only=False) if n else np.zeros(0)
    dim = int(lengths.max()) if n else 0
    if n and (lengths == dim).all():
        return column.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(n, dim)
    out = np.zeros((n, dim), np.float32)
    for i, v in enumerate(column.to_pylist()):
        if v:
            out[i, : len(v)] = v
    return out


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _int8(x: np.ndarray) -> np.ndarray:
    """Vectors as int8, each scaled so that its largest component is 127 (the cosine ignores the scale)."""
    top = np.abs(x).max(axis=1, keepdims=True) if x.size else np.ones((len(x), 1), np.float32)
    return np.rint(x * (127.0 / np.maximum(top, 1e-12))).astype(np.int8)


@dataclass(frozen=True)
class StoredEmbeddings:
    """Where an index reads the stored originals' embeddings: ``RunScope.stored`` (shipped to the
    index's actors), streamed in record batches; ``removed`` ids are skipped."""

    stored: Callable[[list[str]], Iterable[Any]] | None = None
    removed: frozenset[str] = frozenset()
    incoming: int = 0                   # rows the run will check (they grow the index too)

    def count(self) -> int:
        """Stored rows, counted without reading their embeddings."""
        return sum(b.num_rows for b in self.stored([])) if self.stored is not None else 0

    def blocks(self, modalities: list[str]) -> Iterator[tuple[np.ndarray, _Query]]:
        """(keys, rows) per record batch of the rows not removed; a stored row's key is its scan position."""
        if self.stored is None:
            return
        position = 0
        for batch in self.stored(["id", *(c for m in modalities for c in (f"has_{m}", f"{m}_emb"))]):
            ids = batch.column("id").to_pylist()
            keep = np.array([i not in self.removed for i in ids], bool)
            vectors = {m: _matrix(batch.column(f"{m}_emb"))[keep] for m in modalities}
            present = {m: np.asarray(batch.column(f"has_{m}").fill_null(False).to_numpy(zero_copy_only=False),
                                     bool)[keep] for m in modalities}
            yield position + np.flatnonzero(keep), _Query.of([i for i, k in zip(ids, keep) if k], vectors, present)
            position += len(ids)


# -- routing --------------------------------------------------------------------------------
@dataclass
class _Router:
    """Which shard holds a vector (its nearest centroid's) and which shards a row is looked up in,
    per modality. A modality with no stored vectors to fit centroids on: spread by key, looked up
    everywhere."""

    shards: int = 1
    centroids: dict[str, np.ndarray] = field(default_factory=dict)   # per modality, unit, [clusters, dim]
    homes: dict[str, np.ndarray] = field(default_factory=dict)       # per modality, cluster -> shard
    probe: int = 2
    margins: dict[str, float] = field(default_factory=dict)          # per modality, cosine

    def owners(self, q: _Query, keys: np.ndarray, rows: np.ndarray) -> list[dict[str, np.ndarray]]:
        """Per shard, per modality: which of ``rows`` (bool) register their vector there."""
        out: list[dict[str, np.ndarray]] = [{} for _ in range(self.shards)]
        for m, present in q.present.items():
            take = present & rows
            if self.shards == 1:
                out[0][m] = take
                continue
            c = self.centroids.get(m)
            home = keys % self.shards if c is None else self.homes[m][np.argmax(q.vectors[m] @ c.T, axis=1)]
            for k in range(self.shards):
                out[k][m] = take & (home == k)
        return out

    def lookups(self, q: _Query) -> list[dict[str, np.ndarray]]:
        """Per shard, per modality: which rows are looked up there."""
        out: list[dict[str, np.ndarray]] = [{} for _ in range(self.shards)]
        for m, present in q.present.items():
            c = self.centroids.get(m)
            if self.shards == 1 or c is None:
                for k in range(self.shards):
                    out[k][m] = present
                continue
            sims = q.vectors[m] @ c.T
            best = np.full((len(q), self.shards), -np.inf, np.float32)
            for k in range(self.shards):
                mine = self.homes[m] == k
                if mine.any():
                    best[:, k] = sims[:, mine].max(axis=1)
            nearest = best.max(axis=1)
            for k in range(self.shards):
                nearer = (best > best[:, [k]]).sum(axis=1)
                out[k][m] = present & ((nearer < self.probe) | (best[:, k] >= nearest - self.margins[m]))
        return out


def _fit_router(source: StoredEmbeddings, p: SemanticParams, shards: int) -> _Router:
    """Per compared modality, spherical k-means on every ``step``-th stored vector (streamed), its
    clusters dealt to the shards largest first, each to the least loaded."""
    step = max(1, math.ceil(source.count() / SAMPLE_ROWS))
    parts: dict[str, list[np.ndarray]] = {m: [] for m in p.modalities}
    for keys, q in source.blocks(p.modalities):
        picked = keys % step == 0
        for m in p.modalities:
            parts[m].append(q.vectors[m][picked & q.present[m]])
    router = _Router(shards, probe=p.probe, margins={m: p.margin(m) for m in p.modalities})
    for m, chunks in parts.items():
        x = np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)
        if not len(x):
            continue
        centroids = _kmeans(x, min(len(x), shards * CLUSTERS_PER_SHARD))
        sizes = np.bincount(np.argmax(x @ centroids.T, axis=1), minlength=len(centroids))
        home, load = np.zeros(len(centroids), np.int64), np.zeros(shards)
        for j in np.argsort(-sizes, kind="stable"):
            home[j] = int(load.argmin())
            load[home[j]] += sizes[j]
        router.centroids[m], router.homes[m] = centroids, home
    return router


def _kmeans(x: np.ndarray, k: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    centroids = x[rng.choice(len(x), k, replace=False)]
    for _ in range(KMEANS_ROUNDS):
        nearest = np.argmax(x @ centroids.T, axis=1)
        sums = np.zeros_like(centroids)
        np.add.at(sums, nearest, x)
        filled = np.bincount(nearest, minlength=k) > 0   # an emptied cluster keeps its centroid
        centroids = np.where(filled[:, None], _unit(sums), centroids)
    return centroids


# -- a shard --------------------------------------------------------------------------------
@dataclass
class _Hits:
    """Rows found within the threshold: the block's row, the found row's key and id, the cosine."""

    row: np.ndarray
    key: np.ndarray
    sim: np.ndarray
    ids: list[str]

    @classmethod
    def cat(cls, parts: list["_Hits"]) -> "_Hits":
        return cls(np.concatenate([h.row for h in parts]) if parts else np.zeros(0, np.int64),
                   np.concatenate([h.key for h in parts]) if parts else np.zeros(0, np.int64),
                   np.concatenate([h.sim for h in parts]) if parts else np.zeros(0, np.float32),
                   [i for h in parts for i in h.ids])


class _Shard:
    """The rows whose vectors route here (all, with one shard): per compared modality an int8 HNSW
    graph keyed by row number, and each row's key and id in arrays. Also the body of a shard actor."""

    def __init__(self, params: dict | SemanticParams, home: int = 0, router: _Router | None = None):
        self.p = _params(params)
        self.home, self.router = home, router or _Router()
        self.keys = _Column(np.int64)    # row number -> key, increasing
        self.ids = _Strings()
        self.graphs: dict[str, Any] = {}
        self.count = 0                   # rows whose first compared modality is here: each row counts once

    def size(self) -> int:
        return self.count

    def nbytes(self) -> int:
        return self.keys.nbytes + self.ids.nbytes + sum(g.memory_usage for g in self.graphs.values())

    def seed(self, source: StoredEmbeddings) -> int:
        """Add the stored vectors that route here, streamed; returns how many rows count here."""
        for keys, q in source.blocks(self.p.modalities):
            self.add(q, keys, self.router.owners(q, keys, np.ones(len(q), bool))[self.home])
        self.keys.trim()
        self.ids.trim()
        return self.size()

    def search(self, q: _Query, rows: dict[str, np.ndarray]) -> dict[str, _Hits]:
        """Per modality, the rows here within its threshold of each of ``rows``, among its
        ``candidates`` nearest."""
        out = {}
        for m, wanted in rows.items():
            graph, which = self.graphs.get(m), np.flatnonzero(wanted)
            if graph is None or not len(graph) or not len(which):
                continue
            k = min(self.p.candidates, len(graph))
            graph.expansion_search = max(EF_SEARCH, 2 * k)
            found = graph.search(_int8(q.vectors[m][which]), k, threads=1)
            keys = np.asarray(found.keys).reshape(len(which), -1)
            counts = np.asarray(getattr(found, "counts", [keys.shape[1]]))
            valid = np.arange(keys.shape[1])[None, :] < counts[:, None]
            row, local = np.repeat(which, counts), keys[valid].astype(np.int64)
            near = 1.0 - np.asarray(found.distances).reshape(keys.shape)[valid] >= self.p.limit(m) - RESCORE_SLACK
            row, local = row[near], local[near]
            sim = self._cosine(m, q.vectors[m][row], local)
            ok = sim >= self.p.limit(m)
            out[m] = _Hits(row[ok], self.keys.data[local[ok]], sim[ok], [self.ids[int(r)] for r in local[ok]])
        return out

    def similar(self, q: _Query, pairs: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
        """Per modality, the cosine of each (block row, key) pair whose key's vector is here; NaN elsewhere."""
        out = {}
        for m, (rows, keys) in pairs.items():
            sim = np.full(len(rows), np.nan, np.float32)
            graph = self.graphs.get(m)
            if graph is not None and self.keys.n:
                local = np.minimum(np.searchsorted(self.keys.data, keys), self.keys.n - 1)
                held = self.keys.data[local] == keys
                held[held] = np.asarray(graph.contains(local[held].astype(np.uint64)), bool)
                sim[held] = self._cosine(m, q.vectors[m][rows[held]], local[held])
            out[m] = sim
        return out

    def add(self, q: _Query, keys: np.ndarray, owned: dict[str, np.ndarray]) -> None:
        """Register the rows ``owned`` gives this shard, per modality, with their keys. One thread:
        usearch's multi-threaded insertion now and then left a near neighbour unreachable."""
        rows = np.flatnonzero(np.logical_or.reduce([owned[m] for m in owned])) if owned else np.zeros(0, np.int64)
        if not len(rows):
            return
        start = self.keys.n
        self.keys.extend(keys[rows])
        self.ids.extend([q.ids[i] for i in rows])
        local = np.arange(start, start + len(rows), dtype=np.uint64)
        seen = np.zeros(len(q), bool)
        for m in self.p.modalities:
            mine = owned[m]
            self.count += int((mine & ~seen).sum())
            seen |= q.present[m]
            pick = mine[rows]
            if pick.any():
                self._graph(m, q.vectors[m].shape[1]).add(local[pick], _int8(q.vectors[m][rows[pick]]), threads=1)

    def _graph(self, m: str, dim: int) -> Any:
        if m not in self.graphs:
            from usearch.index import Index

            self.graphs[m] = Index(ndim=dim, metric="cos", dtype="i8", connectivity=M,
                                   expansion_add=EF_CONSTRUCTION, expansion_search=EF_SEARCH)
        return self.graphs[m]

    def _cosine(self, m: str, vectors: np.ndarray, local: np.ndarray) -> np.ndarray:
        if not len(local):
            return np.zeros(0, np.float32)
        stored = np.stack(self.graphs[m].get(local.astype(np.uint64))).astype(np.float32)
        return np.einsum("ij,ij->i", vectors, stored) / np.maximum(np.linalg.norm(stored, axis=1), 1e-12)


# -- the block's verdicts -------------------------------------------------------------------
class _Candidates:
    """Per row of a block, the rows it may duplicate in the order they are tried (per compared
    modality, nearest first, at most ``candidates`` over every shard looked in), and the cosines known
    per (row, key, modality)."""

    def __init__(self, q: _Query, hits: list[dict[str, _Hits]], p: SemanticParams):
        self.q, self.p = q, p
        self.order: list[list[int]] = [[] for _ in range(len(q))]
        self.ids: dict[int, str] = {}
        self.sims: dict[tuple[int, int, str], float] = {}
        for m in p.modalities:
            h = _Hits.cat([found[m] for found in hits if m in found])
            taken = np.zeros(len(q), np.int64)
            for i in np.lexsort((h.key, -h.sim, h.row)):
                row, key = int(h.row[i]), int(h.key[i])
                self.sims[row, key, m], self.ids[key] = float(h.sim[i]), h.ids[i]
                if taken[row] < p.candidates:
                    taken[row] += 1
                    self.order[row].append(key)
        for row, keys in enumerate(self.order):
            self.order[row] = [k for k in dict.fromkeys(keys) if self.ids[k] != q.ids[row]]

    def unchecked(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per modality, the (row, key) pairs of a candidate and a row that has it, cosine unknown."""
        out = {}
        for m in self.p.modalities:
            pairs = [(r, k) for r, keys in enumerate(self.order) if self.q.present[m][r]
                     for k in keys if (r, k, m) not in self.sims]
            if pairs:
                out[m] = tuple(np.array(c, np.int64) for c in zip(*pairs))
        return out

    def fill(self, asked: dict[str, tuple[np.ndarray, np.ndarray]], answers: list[dict[str, np.ndarray]]) -> None:
        """Take the shards' answers to ``unchecked``; a pair no shard holds never matches."""
        for m, (rows, keys) in asked.items():
            sims = np.stack([a[m] for a in answers])
            best = np.where(np.isnan(sims), -np.inf, sims).max(axis=0)
            for r, k, s in zip(rows.tolist(), keys.tolist(), best.tolist()):
                self.sims[r, k, m] = s

    def first(self) -> dict[int, str]:
        """Row -> id of its first candidate within the threshold in every modality the row has."""
        found = {}
        for r, keys in enumerate(self.order):
            mods = [m for m in self.p.modalities if self.q.present[m][r]]
            for k in keys:
                if all(self.sims.get((r, k, m), -np.inf) >= self.p.limit(m) for m in mods):
                    found[r] = self.ids[k]
                    break
        return found


def _settle(q: _Query, stored: dict[int, str], p: SemanticParams) -> tuple[list[str | None], np.ndarray]:
    """The block's verdicts, and which rows are new (to register): a row matched in the index
    duplicates that row; else, in order, the first earlier row of the block it matches that was kept."""
    n = len(q)
    compared = np.logical_or.reduce([q.present[m] for m in p.modalities])
    verdicts: list[str | None] = [stored.get(i) for i in range(n)]
    ids = np.asarray(q.ids, object)
    same = _same(q, p) & (ids[:, None] != ids[None, :])
    kept = np.array([v is None for v in verdicts]) & compared
    for j in range(n):   # in order: a row may only duplicate an earlier row that was kept
        if not kept[j]:
            continue
        earlier = np.flatnonzero(same[j, :j] & kept[:j])
        if len(earlier):
            verdicts[j], kept[j] = q.ids[earlier[0]], False
    return verdicts, kept


def _same(q: _Query, p: SemanticParams) -> np.ndarray:
    """[j, i]: row j is within the threshold of row i in every compared modality j has (and i
    has them all); one matrix product per modality for the whole block."""
    n = len(q)
    same = np.ones((n, n), bool)
    for m in p.modalities:
        present = q.present[m]
        close = (q.vectors[m] @ q.vectors[m].T >= p.limit(m)) & present[None, :]
        same &= close | ~present[:, None]
    return same


# -- the index, in this process or as actors -------------------------------------------------
class SemanticIndex:
    """The run's rows as seen so far, in this process: one shard, or ``shards`` routed as the shard
    actors are (tests, benchmarks)."""

    def __init__(self, params: dict | SemanticParams, stored: StoredEmbeddings | Callable | None = None,
                 removed: frozenset[str] = frozenset(), shards: int = 1):
        self.p = _params(params)
        source = stored if isinstance(stored, StoredEmbeddings) else StoredEmbeddings(stored, removed)
        self.router = _fit_router(source, self.p, shards) if shards > 1 else _Router()
        self.shards = [_Shard(self.p, k, self.router) for k in range(shards)]
        for shard in self.shards:
            shard.seed(source)
        self._next = RUN_KEY

    def size(self) -> int:
        return sum(s.size() for s in self.shards)

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.shards)

    def check(self, ids: list[str], vectors: dict[str, np.ndarray], present: dict[str, np.ndarray]) -> list[str | None]:
        """The kept id each row duplicates (None: new, and added). Against the store and the rows
        added before, then within the block in order."""
        q = _Query.of(ids, vectors, present)
        if not len(q):
            return []
        found = _Candidates(q, [s.search(q, look) for s, look in zip(self.shards, self.router.lookups(q))], self.p)
        asked = found.unchecked()
        if asked:
            found.fill(asked, [s.similar(q, asked) for s in self.shards])
        verdicts, kept = _settle(q, found.first(), self.p)
        keys = self._next + np.arange(len(q), dtype=np.int64)
        self._next += len(q)
        for shard, owned in zip(self.shards, self.router.owners(q, keys, kept)):
            shard.add(q, keys, owned)
        return verdicts


class SemanticActor(SeededActor):
    """The run's index as a Ray actor, seeded (``seed``) from the store by itself or by the shard
    actors it starts. Async: a check that arrives before the seed waits for it. Checks take turns,
    each to its end, registration included, so two near-duplicates in blocks of different stage
    actors cannot both be kept."""

    WHAT = "the semantic dedup index"

    def __init__(self, params: dict, name: str = ""):
        self.p = SemanticParams.model_validate(params)
        self._name = name
        self._index: SemanticIndex | None = None   # every row here, or
        self._shards: list[Any] = []                # shard actors, routed by
        self._router = _Router()
        self._next = RUN_KEY
        self._error = ""
        self._seeded = asyncio.Event()
        self._turn = asyncio.Lock()

    async def seed(self, source: StoredEmbeddings) -> None:
        try:
            count = shard_count(self.p, source)
            if count == 1:
                self._index = await asyncio.to_thread(SemanticIndex, self.p, source)
            else:
                self._router = await asyncio.to_thread(_fit_router, source, self.p, count)
                options = {"num_cpus": 0, "scheduling_strategy": "SPREAD"}
                shards = [ray.remote(_Shard).options(**options, name=f"{self._name}-shard-{k}" if self._name else None)
                          .remote(self.p.model_dump(), k, self._router) for k in range(count)]
                await asyncio.gather(*(s.seed.remote(source) for s in shards))   # each reads the store itself
                self._shards = shards
        except Exception as exc:   # every check reports it, none waits forever
            self._error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            self._seeded.set()

    async def check(self, ids: list[str], vectors: dict[str, np.ndarray],
                    present: dict[str, np.ndarray]) -> list[str | None]:
        await self._ready()
        async with self._turn:
            if self._index is not None:
                return self._index.check(ids, vectors, present)
            q = _Query.of(ids, vectors, present)
            if not len(q):
                return []
            ref = ray.put(q)
            looks = self._router.lookups(q)
            busy = [k for k, look in enumerate(looks) if any(v.any() for v in look.values())]
            hits = await asyncio.gather(*(self._shards[k].search.remote(ref, looks[k]) for k in busy))
            found = _Candidates(q, list(hits), self.p)
            asked = found.unchecked()
            if asked:
                found.fill(asked, list(await asyncio.gather(*(s.similar.remote(ref, asked) for s in self._shards))))
            verdicts, kept = _settle(q, found.first(), self.p)
            keys = self._next + np.arange(len(q), dtype=np.int64)
            self._next += len(q)
            owners = self._router.owners(q, keys, kept)
            await asyncio.gather(*(s.add.remote(ref, keys, owned) for s, owned in zip(self._shards, owners)
                                   if any(v.any() for v in owned.values())))
            return verdicts



def close_index(name: str) -> None:
    """Drop the named index and its shard actors."""
    _LOCAL.pop(name, None)
    _ACTORS.pop(name, None)
    _close_actors(name)


@register_stage
class SemanticDedup(Stage):
    """Reject samples whose embeddings are within ``threshold`` (cosine) of a sample kept earlier."""

    name = "semantic_dedup"
    version = 1
    modality = None
    Params = SemanticParams
    whole_block = True    # one round trip to the run's index per block
    inference = False
    runs_after = ("features.",)
    reads = ("id", REDO, AUG)
    writes = ()
    reasons = {"duplicate": "an exact or near duplicate of a row kept earlier, in the store or this run "
                            "(detail: the kept id)"}

    def __init__(self, params: SemanticParams | dict | None = None, context=None):
        super().__init__(params, context)
        self._check = _open(index_name(self.context.run_id), self.params)

    @classmethod
    def fingerprint(cls, params: StageParams | dict | None = None) -> str:
        p = params if isinstance(params, SemanticParams) else SemanticParams.model_validate(params or {})
        return fingerprint_of(cls.name, cls.version, p.fingerprint_fields())

    @classmethod
    def open_run(cls, scope: RunScope) -> None:
        name = index_name(scope.run_id)
        close_index(name)   # an index left by a run of the same id
        source = StoredEmbeddings(scope.stored, scope.removed, scope.incoming)
        if scope.local or not ray.is_initialized():
            _LOCAL[name] = SemanticIndex(scope.params, source)
            return
        # The handle is kept: an actor nothing refers to is destroyed. Not waited for: it seeds
        # itself while the stages' actor pools start.
        actor = _ACTORS[name] = ray.remote(num_cpus=0)(SemanticActor).options(name=name).remote(
            scope.params.model_dump(), name)
        actor.seed.remote(source)

    @classmethod
    def close_run(cls, scope: RunScope, failed: bool) -> None:
        close_index(index_name(scope.run_id))

    def process(self, batch: Batch) -> Batch:
        rows = originals_to_check(batch)
        if not rows:
            return batch
        vectors, present = {}, {}
        for m in self.params.modalities:
            emb, has = batch.get(f"{m}_emb"), batch.get(f"has_{m}")
            if emb is None or has is None:
                raise RuntimeError(f"semantic_dedup compares {m} but no features.{m} stage ran before it")
            vectors[m] = np.stack([np.asarray(emb[i], np.float32) for i in rows])
            present[m] = np.array([bool(has[i]) for i in rows])
        for i, kept in zip(rows, self._check([str(batch["id"][i]) for i in rows], vectors, present)):
            if kept is not None:
                self.reject(batch, i, "duplicate", kept)
        return batch


def _open(name: str, params: SemanticParams) -> Callable:
    if name in _LOCAL or not ray.is_initialized():
        index = _LOCAL.get(name) or _LOCAL.setdefault(name, SemanticIndex(params))
        return index.check
    try:
        actor = ray.get_actor(name)
    except ValueError:
        raise RuntimeError(f"semantic dedup index {name!r} not found: the run did not open it") from None
    return lambda ids, vectors, present: ray.get(actor.check.remote(ids, vectors, present))
