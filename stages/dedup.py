"""Dedup: exact and near-duplicate removal, within a run and against what the store holds.

Signatures are computed where the rows are (the stage's actors); the shared state lives in one
``DedupIndex`` per run: a Ray actor named ``mmpipe-dedup-<run_id>`` (``IndexActor``) that the
runner creates with ``create_index``, or starts early with ``start_index`` and seeds with
``seed_index``, before the processing pass (an in-process instance when Ray is not running). The
stage sends each block's signatures in one call; the index answers per row: ``None`` (kept and
registered) or the kept id the row duplicates. Matching rules:

- exact, per key listed in ``Params.exact``: ``sample`` (every present modality equal and the same
  modalities present) or one modality alone (``image``, ``text``, ``audio``), on hashes of the
  cleaned content;
- near, at sample level: same modalities present, and each one close to the same kept row's:
  image by perceptual hash (Hamming distance <= ``phash_threshold``), text by MinHash Jaccard over
  word shingles (>= ``minhash_threshold``, among the candidates of datasketch's LSH banding; texts
  shorter than ``min_shingles`` only match exactly), audio exactly.

The first row seen wins: rows already in the store (``existing``) before this run's rows.
"""
from __future__ import annotations

import asyncio
import functools
import gc
import hashlib
import json
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Literal

import imagehash
import numpy as np
import ray
from datasketch import MinHash, MinHashLSH
from PIL import Image
from pydantic import Field

from stages.base import MODALITIES, REDO, Batch, RunScope, Stage, StageParams, live_rows, num_rows, object_column
from stages.media import decode_image
from stages.registry import register_stage

SIG = "dedup_sig"
AUG = "aug"
MINHASH_SCHEME = "affine32"    # datasketch >= 2 needs the scheme to rebuild a MinHash from stored values
WORD = re.compile(r"\w+")

Checker = Callable[[list["Signature"]], list[str | None]]


def index_name(run_id: str) -> str:
    return f"mmpipe-dedup-{run_id}"


class DedupParams(StageParams):
    exact: list[Literal["sample", "image", "text", "audio"]] = ["sample"]
    image_phash: bool = True
    phash_threshold: int = Field(6, ge=0, le=64)
    text_minhash: bool = True
    minhash_threshold: float = Field(0.8, gt=0, le=1)
    num_perm: int = Field(128, ge=16)
    shingle: int = Field(3, ge=1)
    min_shingles: int = Field(5, ge=1)   # fewer shingles than this: the text only matches exactly


# -- signatures -----------------------------------------------------------------------------
@dataclass
class Signature:
    """What the index knows of one row; stored as the ``dedup_sig`` JSON column."""

    id: str
    sha: dict[str, str]                       # modality -> hash of cleaned content, plus "sample"
    image_phash: str | None = None            # 64-bit perceptual hash, hex
    text_minhash: list[int] | None = None     # num_perm MinHash values

    @property
    def modalities(self) -> frozenset[str]:
        return frozenset(k for k in self.sha if k != "sample")

    def to_json(self) -> str:
        out: dict[str, Any] = {"sha": self.sha}
        if self.image_phash is not None:
            out["image_phash"] = self.image_phash
        if self.text_minhash is not None:
            out["text_minhash"] = self.text_minhash
        return json.dumps(out, sort_keys=True)

    @classmethod
    def from_json(cls, row_id: str, text: str) -> "Signature":
        d = json.loads(text)
        return cls(row_id, d["sha"], d.get("image_phash"), d.get("text_minhash"))


def _sha(value: bytes | str) -> str:
    return hashlib.sha256(value.encode() if isinstance(value, str) else value).hexdigest()


def image_phash(data: bytes) -> str:
    return str(imagehash.phash(Image.fromarray(decode_image(data))))


def shingles(text: str, k: int) -> set[str]:
    words = WORD.findall(text.lower())
    return {" ".join(words[i:i + k]) for i in range(len(words) - k + 1)}


@functools.cache
def _permutations(num_perm: int) -> np.ndarray:
    """datasketch draws the permutations (seed 1) anew for every MinHash: a third of the time of
    a short text's signature. They depend only on ``num_perm``."""
    return MinHash(num_perm=num_perm, scheme=MINHASH_SCHEME).permutations


def text_minhash(text: str, p: DedupParams) -> list[int] | None:
    grams = shingles(text, p.shingle)
    if len(grams) < p.min_shingles:
        return None
    m = MinHash(num_perm=p.num_perm, scheme=MINHASH_SCHEME, permutations=_permutations(p.num_perm))
    m.update_batch([g.encode() for g in grams])
    return m.hashvalues.tolist()


def signature_of(row_id: str, media: dict[str, Any], p: DedupParams) -> Signature:
    """Signature of one row from its cleaned media (modality -> value, None where absent)."""
    present = {m: v for m, v in media.items() if v is not None}
    sha = {m: _sha(v) for m, v in present.items()}
    sha["sample"] = _sha(json.dumps(sha, sort_keys=True))
    phash = image_phash(present["image"]) if p.image_phash and "image" in present else None
    mh = text_minhash(present["text"], p) if p.text_minhash and "text" in present else None
    return Signature(row_id, sha, phash, mh)


# -- the index ------------------------------------------------------------------------------
class _HammingTable:
    """64-bit codes searched by Hamming distance with one vectorised popcount."""

    def __init__(self) -> None:
        self._codes = np.zeros(1024, dtype=np.uint64)
        self._alive = np.zeros(1024, dtype=bool)
        self._ids: list[str] = []
        self._pos: dict[str, int] = {}

    def add(self, row_id: str, code: int) -> None:
        n = len(self._ids)
        if n == len(self._codes):
            self._codes = np.concatenate([self._codes, np.zeros(n, dtype=np.uint64)])
            self._alive = np.concatenate([self._alive, np.zeros(n, dtype=bool)])
        self._codes[n], self._alive[n] = code, True
        self._ids.append(row_id)
        self._pos[row_id] = n

    def remove(self, row_id: str) -> None:
        pos = self._pos.pop(row_id, None)
        if pos is not None:
            self._alive[pos] = False

    def near(self, code: int, threshold: int) -> set[str]:
        n = len(self._ids)
        dist = np.bitwise_count(self._codes[:n] ^ np.uint64(code))
        return {self._ids[j] for j in np.flatnonzero((dist <= threshold) & self._alive[:n])}


@contextmanager
def _gc_paused():
    """No garbage collection while an index is seeded: tens of thousands of small objects that all
    live on. In a long-lived driver each full collection walks everything the driver holds (Ray,
    Arrow, the run's rows): seeding 3000 stored signatures took 0.23 s there, 0.07 s with this."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@functools.cache
def _band_ranges(threshold: float, num_perm: int) -> list[tuple[int, int]]:
    """datasketch's bands for this threshold (it integrates false positive and negative rates over
    every split of ``num_perm``: ~40 ms, once per process, not once per run)."""
    return MinHashLSH(threshold=threshold, num_perm=num_perm).hashranges


class _MinHashBands:
    """MinHash LSH: rows whose values agree on every value of any one band are candidates, then
    kept when their estimated Jaccard reaches the threshold. The bands are datasketch's for this
    threshold (``MinHashLSH.hashranges``), so the candidates are the ones ``MinHashLSH.query``
    gives; rows come in a matrix at a time: seeding an index with 3000 stored signatures through
    ``MinHashLSH.insert`` (a numpy call per band per row) took 0.18 s."""

    def __init__(self, threshold: float, num_perm: int):
        self.threshold = threshold
        self.ranges = _band_ranges(threshold, num_perm)
        self.tables: list[dict[bytes, set[str]]] = [{} for _ in self.ranges]
        self.values: dict[str, np.ndarray] = {}

    def add(self, ids: list[str], values: np.ndarray) -> None:
        """``values``: one row of uint32 MinHash values per id."""
        for (start, end), table in zip(self.ranges, self.tables):
            raw, width = np.ascontiguousarray(values[:, start:end]).tobytes(), (end - start) * values.itemsize
            for k, row_id in enumerate(ids):
                table.setdefault(raw[k * width:(k + 1) * width], set()).add(row_id)
        self.values.update(zip(ids, values))

    def remove(self, row_id: str) -> None:
        values = self.values.pop(row_id, None)
        if values is None:
            return
        for (start, end), table in zip(self.ranges, self.tables):
            key = values[start:end].tobytes()
            table[key].discard(row_id)
            if not table[key]:
                del table[key]

    def near(self, values: np.ndarray) -> set[str]:
        found: set[str] = set()
        for (start, end), table in zip(self.ranges, self.tables):
            found |= table.get(values[start:end].tobytes(), set())
        # MinHash.jaccard: the share of equal values
        return {i for i in found if np.count_nonzero(self.values[i] == values) / len(values) >= self.threshold}


@dataclass
class _Entry:
    seq: int
    sig: Signature


class DedupIndex:
    """The run's dedup state. Plain class; ``create_index`` wraps it in a named Ray actor."""

    def __init__(self, params: dict | DedupParams, existing: list[tuple[str, str]] = ()):
        self.params = params if isinstance(params, DedupParams) else DedupParams.model_validate(params)
        p = self.params
        self._seq = 0                                      # registration order: the first seen wins
        self._entries: dict[str, _Entry] = {}
        self._by_sha: dict[str, dict[str, set[str]]] = {key: {} for key in (*MODALITIES, "sample")}
        self._phash = _HammingTable()
        self._text = _MinHashBands(p.minhash_threshold, p.num_perm) if p.text_minhash else None
        with _gc_paused():
            self._seed(existing)

    def _seed(self, existing: list[tuple[str, str]]) -> None:
        texts: dict[str, list[int]] = {}   # stored MinHashes, added to the bands in one matrix
        for row_id, sig in existing:
            if sig:   # rows stored while dedup was off carry no signature
                stored = Signature.from_json(row_id, sig)
                self._remove(row_id)
                texts.pop(row_id, None)
                self._add(stored, text=False)
                if self._comparable(stored):
                    texts[row_id] = stored.text_minhash
        if texts:
            self._text.add(list(texts), np.asarray(list(texts.values()), dtype=np.uint32))

    def size(self) -> int:
        return len(self._entries)

    def check(self, sigs: list[Signature]) -> list[str | None]:
        """Per row, in order: None (kept, now registered) or the kept id it duplicates."""
        out: list[str | None] = []
        for sig in sigs:
            self._remove(sig.id)   # a reprocessed row must not match its own old entry
            kept = self._match(sig)
            if kept is None:
                self._add(sig)
            out.append(kept)
        return out

    # -- matching -------------------------------------------------------------------------
    def _match(self, sig: Signature) -> str | None:
        found: set[str] = set()
        for key in self.params.exact:
            if key in sig.sha:
                found |= self._by_sha[key].get(sig.sha[key], set())
        if sig.image_phash is not None or sig.text_minhash is not None:
            found |= self._near(sig)
        return min(found, key=lambda i: self._entries[i].seq) if found else None

    def _near(self, sig: Signature) -> set[str]:
        """Kept rows with the same modalities, each one near this row's."""
        per_modality = [self._near_in(m, sig) for m in sig.modalities]
        same = set.intersection(*per_modality) if per_modality else set()
        return {i for i in same if self._entries[i].sig.modalities == sig.modalities}

    def _near_in(self, modality: str, sig: Signature) -> set[str]:
        if modality == "image" and sig.image_phash is not None:
            return self._phash.near(int(sig.image_phash, 16), self.params.phash_threshold)
        if modality == "text" and sig.text_minhash is not None and self._text is not None:
            return self._text.near(np.asarray(sig.text_minhash, dtype=np.uint32))
        return set(self._by_sha[modality].get(sig.sha[modality], set()))

    # -- bookkeeping ----------------------------------------------------------------------
    def _comparable(self, sig: Signature) -> bool:
        # a stored signature made with another num_perm cannot be compared: it still matches exactly
        return sig.text_minhash is not None and self._text is not None and len(sig.text_minhash) == self.params.num_perm

    def _add(self, sig: Signature, text: bool = True) -> None:
        self._seq += 1
        self._entries[sig.id] = _Entry(self._seq, sig)
        for key, h in sig.sha.items():
            self._by_sha.setdefault(key, {}).setdefault(h, set()).add(sig.id)
        if sig.image_phash is not None:
            self._phash.add(sig.id, int(sig.image_phash, 16))
        if text and self._comparable(sig):
            self._text.add([sig.id], np.asarray([sig.text_minhash], dtype=np.uint32))

    def _remove(self, row_id: str) -> None:
        entry = self._entries.pop(row_id, None)
        if entry is None:
            return
        for key, h in entry.sig.sha.items():
            ids = self._by_sha[key].get(h)
            if ids is not None:
                ids.discard(row_id)
                if not ids:
                    del self._by_sha[key][h]
        self._phash.remove(row_id)
        if self._text is not None:
            self._text.remove(row_id)


# in-process indexes by name, for when Ray is not running (unit tests, single-process tools)
_LOCAL: dict[str, DedupIndex] = {}
# handles of the actors this process created: a non-detached actor dies with its last handle
_ACTORS: dict[str, Any] = {}


class IndexActor:
    """A ``DedupIndex`` in a Ray actor that may be started before it is seeded: the runner starts
    it before the scan, so that the worker's start-up overlaps the driver's scan, and seeds it
    once the plan says which stored rows count. Async: a check that arrives before the seed
    waits for it (in arrival order; no two checks run at once)."""

    def __init__(self, params: dict):
        self._params = params
        self._index: DedupIndex | None = None
        self._error = ""
        self._seeded = asyncio.Event()

    async def seed(self, existing: list[tuple[str, str]]) -> None:
        try:
            self._index = DedupIndex(self._params, existing)
        except Exception as exc:   # a bad stored signature: every check reports it, none waits forever
            self._error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            self._seeded.set()

    async def check(self, sigs: list[Signature]) -> list[str | None]:
        return (await self._ready()).check(sigs)

    async def size(self) -> int:
        return (await self._ready()).size()

    async def _ready(self) -> DedupIndex:
        await self._seeded.wait()
        if self._index is None:
            raise RuntimeError(f"the dedup index could not be seeded from the store: {self._error}")
        return self._index


def start_index(name: str, params: dict) -> None:
    """Start the run's index actor, empty until ``seed_index`` (checks wait for the seed).
    Replaces an index of the same name."""
    close_index(name)
    _ACTORS[name] = ray.remote(num_cpus=0)(IndexActor).options(name=name).remote(params)


def seed_index(name: str, existing: list[tuple[str, str]]) -> None:
    """Seed a started index with (id, dedup_sig) of rows already stored, which count as seen first.
    Not waited for: the actor seeds itself while the stages' actor pools start."""
    _ACTORS[name].seed.remote(existing)


def create_index(name: str, params: dict, existing: list[tuple[str, str]], local: bool = False) -> Any:
    """Create the run's index (a named Ray actor when Ray is up, unless ``local``: then the stages
    run in this process too); ``existing`` = (id, dedup_sig) of rows already stored, which count
    as seen first. Replaces an index of the same name."""
    if local or not ray.is_initialized():
        close_index(name)
        _LOCAL[name] = DedupIndex(params, existing)
        return _LOCAL[name]
    start_index(name, params)
    seed_index(name, existing)
    return _ACTORS[name]


def stored_signatures(scope: RunScope) -> list[tuple[str, str]]:
    """(id, dedup_sig) of the stored originals that stay in the store."""
    if scope.stored is None:
        return []
    out = []
    for batch in scope.stored(["id", SIG]):
        for row_id, sig in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
            if sig and row_id not in scope.removed:
                out.append((row_id, sig))
    return out


def close_index(name: str) -> None:
    """Drop the named index (call after the run)."""
    _LOCAL.pop(name, None)
    _ACTORS.pop(name, None)
    if ray.is_initialized():
        try:
            ray.kill(ray.get_actor(name))
        except ValueError:   # no such actor
            pass


def open_index(name: str, params: DedupParams) -> Checker:
    """The check function of the named index: in-process when this process holds it (or Ray is
    not running), else the Ray actor."""
    if name in _LOCAL or not ray.is_initialized():
        index = _LOCAL.get(name) or _LOCAL.setdefault(name, DedupIndex(params, []))
        return index.check
    try:
        actor = ray.get_actor(name)
    except ValueError:
        raise RuntimeError(f"dedup index {name!r} not found: call stages.dedup.create_index before the run") from None
    return lambda sigs: ray.get(actor.check.remote(sigs))


# -- the stage ------------------------------------------------------------------------------
@register_stage
class Dedup(Stage):
    """Reject exact and near duplicates (reason ``duplicate``, detail = the kept id); write
    ``dedup_sig`` for kept rows."""

    name = "dedup"
    version = 1
    modality = None
    Params = DedupParams
    whole_block = True   # one round trip to the run's index actor per block, not per stage batch
    inference = False    # every record to predict gets an answer
    runs_after = ("cleanup.",)   # signatures of the cleaned content
    reads = ("id", "image", "text", "audio", REDO, AUG)
    writes = (SIG,)
    reasons = {"duplicate": "an exact or near duplicate of a row kept earlier, in the store or this run "
                            "(detail: the kept id)",
               "dedup_error": "the cleaned image could not be decoded for its perceptual hash"}

    def __init__(self, params: DedupParams | dict | None = None, context=None):
        super().__init__(params, context)
        self._check = open_index(index_name(self.context.run_id), self.params)

    @classmethod
    def start_run(cls, scope: RunScope) -> None:
        """The pass will use actors: start the index actor now, its worker's start-up (~1.5 CPU-s)
        overlapping the driver's scan; ``open_run`` seeds it."""
        start_index(index_name(scope.run_id), scope.params.model_dump())

    @classmethod
    def open_run(cls, scope: RunScope) -> None:
        name = index_name(scope.run_id)
        existing = stored_signatures(scope)
        if name in _ACTORS and not scope.local:
            seed_index(name, existing)
        else:
            create_index(name, scope.params.model_dump(), existing, local=scope.local)

    @classmethod
    def close_run(cls, scope: RunScope, failed: bool) -> None:
        close_index(index_name(scope.run_id))

    def process(self, batch: Batch) -> Batch:
        n = num_rows(batch)
        if SIG not in batch:
            batch[SIG] = object_column([""] * n)
        rows, sigs = [], []
        for i in self._candidates(batch):
            media = {m: batch[m][i] if m in batch else None for m in MODALITIES}
            try:
                sigs.append(signature_of(str(batch["id"][i]), media, self.params))
            except (OSError, ValueError) as exc:   # cleanup let through media we cannot decode
                self.reject(batch, i, "dedup_error", f"{type(exc).__name__}: {exc}")
                continue
            rows.append(i)
        if not sigs:
            return batch
        for i, sig, kept in zip(rows, sigs, self._check(sigs)):
            if kept is None:
                batch[SIG][i] = sig.to_json()
            else:
                self.reject(batch, i, "duplicate", kept)
        return batch

    @staticmethod
    def _candidates(batch: Batch) -> list[int]:
        """Live original rows (aug 0) that this run processes (non-empty redo)."""
        aug = batch.get(AUG)
        return [int(i) for i in live_rows(batch)
                if str(batch[REDO][i] or "") and (aug is None or int(aug[i]) == 0)]
