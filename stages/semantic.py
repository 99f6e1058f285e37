"""``semantic_dedup``: near-duplicates by meaning, from the feature embeddings (as NeMo Curator's
semantic dedup): a sample whose every compared embedding is within a cosine threshold of a sample
kept earlier, in the store or in this run, is rejected as ``duplicate`` with the kept id, like the
exact and perceptual-hash kinds in ``dedup``. It catches what hashes miss (a re-encoded, cropped
image; a reworded caption) as far as the encoders see meaning: pretrained encoders see much more
than the weight-free defaults.

Opt-in (``stages.semantic_dedup: {}`` in a config); it runs after the feature stages. The run's
index is one HNSW graph per compared modality (hnswlib, cosine), seeded from the stored originals'
embeddings, in a named Ray actor that checks a whole block at a time, or in this process for runs
in the driver. Its memory is about ``dim x 4 + 200`` bytes per stored row and compared modality.
Which of two near-duplicate inputs of one run is kept follows the order their blocks reach the
index; against the store, the stored sample is always kept.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator

import ray

from stages.base import MODALITIES, REDO, Batch, RunScope, Stage, StageParams
from stages.dedup import AUG, _kill, _Strings, originals_to_check
from stages.registry import register_stage

M, EF_CONSTRUCTION = 16, 128
_LOCAL: dict[str, "SemanticIndex"] = {}   # a run's index in this process (runs in the driver)
_ACTORS: dict[str, Any] = {}                # a run's index actor, by name


def index_name(run_id: str) -> str:
    return f"mmpipe-semdedup-{run_id}"


class SemanticParams(StageParams):
    # Whose embeddings are compared: a duplicate must have every one of these the row has.
    modalities: list[str] = Field(default_factory=lambda: ["image", "text"])
    threshold: float = Field(0.95, gt=0.0, le=1.0)   # cosine similarity, every compared modality ...
    thresholds: dict[str, float] = Field(default_factory=dict)   # ... or its own, e.g. {text: 0.85}
    candidates: int = Field(10, ge=1)                 # nearest stored rows looked at per row and modality

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


class SemanticIndex:
    """The run's rows as seen so far: per modality an HNSW graph keyed by row number, and the ids."""

    def __init__(self, params: dict | SemanticParams, stored: Callable[[list[str]], Iterable[Any]] | None = None,
                 removed: frozenset[str] = frozenset()):
        self.p = params if isinstance(params, SemanticParams) else SemanticParams.model_validate(params)
        self.graphs: dict[str, Any] = {}
        self.ids = _Strings()   # row number -> id, packed (dedup's: no Python object per row)
        self.count = 0
        if stored is not None:
            self._seed(stored, removed)

    def _seed(self, stored: Callable[[list[str]], Iterable[Any]], removed: frozenset[str]) -> None:
        columns = ["id", *(c for m in self.p.modalities for c in (f"has_{m}", f"{m}_emb"))]
        for batch in stored(columns):
            ids = batch.column("id").to_pylist()
            keep = np.array([i not in removed for i in ids], bool)
            vectors = {m: _matrix(batch.column(f"{m}_emb")) for m in self.p.modalities}
            present = {m: np.asarray(batch.column(f"has_{m}").fill_null(False).to_numpy(zero_copy_only=False), bool) & keep
                       for m in self.p.modalities}
            self._add([i for i, k in zip(ids, keep) if k], {m: v[keep] for m, v in vectors.items()},
                      {m: p[keep] for m, p in present.items()})

    def size(self) -> int:
        return self.count

    def check(self, ids: list[str], vectors: dict[str, np.ndarray], present: dict[str, np.ndarray]) -> list[str | None]:
        """The kept id each row duplicates (None: new, and added). Against the store and the rows
        added before, then within the block in order."""
        n = len(ids)
        vectors = {m: _unit(v) for m, v in vectors.items()}
        compared = np.zeros(n, bool)
        for m in self.p.modalities:
            compared |= present[m]
        verdicts: list[str | None] = [None] * n
        for i, key in self._stored_matches(ids, vectors, present).items():
            verdicts[i] = self.ids[key]
        same = self._same(vectors, present) & (np.asarray(ids, object)[:, None] != np.asarray(ids, object)[None, :])
        kept = np.array([v is None for v in verdicts]) & compared
        for j in range(n):   # in order: a row may only duplicate an earlier row that was kept
            if not kept[j]:
                continue
            earlier = np.flatnonzero(same[j, :j] & kept[:j])
            if len(earlier):
                verdicts[j], kept[j] = ids[earlier[0]], False
        new = kept
        self._add([ids[i] for i in np.flatnonzero(new)], {m: v[new] for m, v in vectors.items()},
                  {m: p[new] for m, p in present.items()})
        return verdicts

    def _same(self, vectors: dict[str, np.ndarray], present: dict[str, np.ndarray]) -> np.ndarray:
        """[j, i]: row j is within the threshold of row i in every compared modality j has (and i
        has them all); one matrix product per modality for the whole block."""
        n = len(next(iter(present.values())))
        same = np.ones((n, n), bool)
        for m in self.p.modalities:
            close = (vectors[m] @ vectors[m].T >= self.p.limit(m)) & present[m][None, :]
            same &= close | ~present[m][:, None]
        return same

    def _stored_matches(self, ids: list[str], vectors: dict[str, np.ndarray], present: dict[str, np.ndarray]) -> dict[int, int]:
        """Row -> key of the first candidate (nearest first) that passes in every modality."""
        candidates: dict[int, list[int]] = {}
        for m in self.p.modalities:
            graph, rows = self.graphs.get(m), np.flatnonzero(present[m])
            if graph is None or not len(rows) or graph.get_current_count() == 0:
                continue
            k = min(self.p.candidates, graph.get_current_count())
            graph.set_ef(max(64, 2 * k))
            keys, dists = graph.knn_query(vectors[m][rows], k)
            for r, ks, ds in zip(rows, keys, dists):
                candidates.setdefault(int(r), []).extend(int(key) for key, d in zip(ks, ds) if 1.0 - d >= self.p.limit(m))
        found = {}
        for r, keys in candidates.items():
            for key in dict.fromkeys(keys):
                if self.ids[key] != ids[r] and self._matches(r, key, vectors, present):
                    found[r] = key
                    break
        return found

    def _matches(self, r: int, key: int, vectors: dict[str, np.ndarray], present: dict[str, np.ndarray]) -> bool:
        for m in self.p.modalities:
            if not present[m][r]:
                continue
            try:
                stored = np.asarray(self.graphs[m].get_items([key])[0], np.float32)
            except (KeyError, RuntimeError):   # that row has no such modality
                return False
            if float(_unit(stored[None])[0] @ vectors[m][r]) < self.p.limit(m):
                return False
        return True

    def _add(self, ids: list[str], vectors: dict[str, np.ndarray], present: dict[str, np.ndarray]) -> None:
        import hnswlib

        start = self.count
        self.ids.extend(ids)
        self.count += len(ids)
        keys = np.arange(start, start + len(ids), dtype=np.uint64)
        for m in self.p.modalities:
            rows = np.flatnonzero(present[m])
            if not len(rows):
                continue
            graph = self.graphs.get(m)
            if graph is None:
                graph = self.graphs[m] = hnswlib.Index(space="cosine", dim=vectors[m].shape[1])
                graph.init_index(max_elements=max(1024, len(rows)), ef_construction=EF_CONSTRUCTION, M=M)
            needed = graph.get_current_count() + len(rows)
            if needed > graph.get_max_elements():
                graph.resize_index(max(needed, 2 * graph.get_max_elements()))
            graph.add_items(vectors[m][rows], keys[rows])


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


class SemanticActor:
    """The run's index in a named Ray actor: one block checked at a time, so two near-duplicates
    in blocks of different stage actors cannot both be kept."""

    def __init__(self, params: dict, stored: Callable | None, removed: frozenset[str]):
        self.index = SemanticIndex(params, stored, removed)

    def check(self, ids, vectors, present):
        return self.index.check(ids, vectors, present)


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
    def open_run(cls, scope: RunScope) -> None:
        name = index_name(scope.run_id)
        params = scope.params.model_dump()
        if scope.local or not ray.is_initialized():
            _LOCAL[name] = SemanticIndex(params, scope.stored, scope.removed)
            return
        _kill(name)   # an index left by a run of the same id
        # The handle is kept: an actor nothing refers to is destroyed.
        _ACTORS[name] = ray.remote(num_cpus=0)(SemanticActor).options(name=name).remote(
            params, scope.stored, scope.removed)

    @classmethod
    def close_run(cls, scope: RunScope, failed: bool) -> None:
        name = index_name(scope.run_id)
        _LOCAL.pop(name, None)
        _ACTORS.pop(name, None)
        if ray.is_initialized():
            _kill(name)

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


