"""Dedup: exact and near-duplicate removal, within a run and against what the store holds.

Signatures are computed where the rows are (the stage's actors) and sent a block at a time, packed
in arrays, to the run's index: a Ray actor named ``mmpipe-dedup-<run_id>`` (``IndexActor``) that
the runner starts with ``start_index`` and seeds with ``seed_index`` (or ``create_index``) before
the processing pass, or an in-process ``DedupIndex`` when the stages run in the driver. The index
answers per row: ``None`` (kept and registered) or the kept id the row duplicates. Matching rules:

- exact, per key listed in ``Params.exact``: ``sample`` (every present modality equal and the same
  modalities present) or one modality alone (``image``, ``text``, ``audio``, ``video``), on hashes
  of the cleaned content;
- near, at sample level: same modalities present, and each one close to the same kept row's:
  image by perceptual hash (Hamming distance <= ``phash_threshold``), text by MinHash Jaccard over
  word shingles (>= ``minhash_threshold``, among the candidates of datasketch's LSH banding; texts
  shorter than ``min_shingles`` only match exactly), video by the perceptual hashes of
  ``VIDEO_HASHES`` frames evenly spread over the clip (mean Hamming distance <=
  ``video_phash_threshold``: the same clip re-encoded, rescaled or recoloured, not a sub-clip),
  audio exactly.

The first row seen wins: rows already in the store before this run's rows; within a block, the
earlier row. Blocks in flight together reach the index in the order they finish, so which of two
duplicates in different blocks of one run is kept can differ between runs of the same input (the
other is always rejected with the kept id; a rerun keeps what the store holds).

The index keeps its rows in numpy arrays (``_Shard``), no Python object per row, and reads the
stored signatures itself, streamed from the store. A store of more than ``rows_per_shard`` rows
is spread by id hash over shard actors, one per ``rows_per_shard`` rows (0-CPU actors: their
count follows the data, not the cluster's CPUs). The index actor then sends each block to every
shard, takes the earliest match any shard reports, settles the block's rows among themselves, and
only then registers its kept rows in their shards; blocks take turns through all of it, so two
near duplicates in concurrent blocks are never both kept.
"""
from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import sys
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Iterator

import mmh3
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from PIL import Image
from pydantic import Field, field_validator

from stages.base import (MODALITIES, REDO, Batch, RunScope, Stage, StageParams, derived_modalities, fingerprint_of,
                         live_rows, num_rows, object_column)
from stages.media import decode_image
from stages.video import FRAMES, frames_from_bytes
from stages.registry import register_stage

SIG = "dedup_sig"
AUG = "aug"
MINHASH_SCHEME = "affine32"    # datasketch >= 2 needs the scheme to rebuild a MinHash from stored values
WORD = re.compile(r"\w+")
RUN_SEQ = 1 << 40              # this run's rows register after every stored row (those: their scan position)
SEED_CHUNK = 8192              # stored signatures parsed and added at a time
SAVE_FORMAT = 2                # a saved shard's layout (2: murmur3 id hashes, rows keyed by id and version)
COMPACT_MIN = 1 << 16          # replaced or removed rows a shard carries before it compacts
QUERY_GROUP = 128              # rows of a block matched at a time
VIDEO_HASHES = 4               # frames of a clip (evenly spread) whose perceptual hashes are its near-dup key

Checker = Callable[[list["Signature"]], list[str | None]]


def index_name(run_id: str) -> str:
    return f"mmpipe-dedup-{run_id}"


class DedupParams(StageParams):
    exact: list[str] = ["sample"]        # "sample" and / or modalities
    image_phash: bool = True
    phash_threshold: int = Field(6, ge=0, le=64)
    video_phash: bool = True             # near-duplicate clips by frame perceptual hashes (else exact only)
    video_phash_threshold: int = Field(8, ge=0, le=64)   # mean Hamming distance over the VIDEO_HASHES frames
    text_minhash: bool = True
    minhash_threshold: float = Field(0.8, gt=0, le=1)
    num_perm: int = Field(128, ge=16)
    shingle: int = Field(3, ge=1)
    min_shingles: int = Field(5, ge=1)   # fewer shingles than this: the text only matches exactly
    rows_per_shard: int = Field(1_000_000, ge=1)   # stored rows per index shard actor
    shards: int = Field(0, ge=0)         # 0: ceil(stored rows / rows_per_shard)

    # How the index spreads over actors changes no verdict: left out of the stage fingerprint.
    RUNTIME_ONLY: ClassVar[frozenset[str]] = frozenset({"rows_per_shard", "shards"})
    # Added after stores were written: at their defaults they leave the fingerprint (and so every
    # stored row's lineage) as it was; a changed value changes it.
    ADDED_LATER: ClassVar[frozenset[str]] = frozenset({"video_phash", "video_phash_threshold"})

    def fingerprint_fields(self) -> dict[str, Any]:
        defaults = type(self)()
        later = {k for k in self.ADDED_LATER if getattr(self, k) == getattr(defaults, k)}
        return self.model_dump(mode="json", exclude=set(self.RUNTIME_ONLY) | later)

    @field_validator("exact")
    @classmethod
    def _known_keys(cls, keys: list[str]) -> list[str]:
        unknown = [k for k in keys if k not in _KEYS]
        if unknown:
            raise ValueError(f"exact: unknown key(s) {unknown}; use sample or a modality ({', '.join(MODALITIES)})")
        return keys


# -- signatures -----------------------------------------------------------------------------
@dataclass
class Signature:
    """What the index knows of one row; stored as the ``dedup_sig`` JSON column."""

    id: str
    sha: dict[str, str]                       # modality -> hash of cleaned content, plus "sample"
    image_phash: str | None = None            # 64-bit perceptual hash, hex
    text_minhash: list[int] | None = None     # num_perm MinHash values
    video_phash: list[str] | None = None      # VIDEO_HASHES frames' 64-bit perceptual hashes, hex

    @property
    def modalities(self) -> frozenset[str]:
        return frozenset(k for k in self.sha if k != "sample")

    def to_json(self) -> str:
        """The MinHash as base64 of its little-endian uint32 values (a JSON list of ints before)."""
        out: dict[str, Any] = {"sha": self.sha}
        if self.image_phash is not None:
            out["image_phash"] = self.image_phash
        if self.text_minhash is not None:
            out["text_minhash"] = base64.b64encode(np.asarray(self.text_minhash, "<u4").tobytes()).decode()
        if self.video_phash is not None:
            out["video_phash"] = self.video_phash
        return json.dumps(out, sort_keys=True)

    @classmethod
    def from_json(cls, row_id: str, text: str) -> "Signature":
        d = json.loads(text)
        minhash = _minhash_values(d.get("text_minhash"))
        if isinstance(minhash, np.ndarray):
            minhash = minhash.tolist()
        return cls(row_id, d["sha"], d.get("image_phash"), minhash, d.get("video_phash"))


def _minhash_values(stored: str | list[int] | None) -> np.ndarray | list[int] | None:
    """A stored MinHash: base64 of little-endian uint32 (a JSON list of ints before)."""
    return np.frombuffer(base64.b64decode(stored), "<u4") if isinstance(stored, str) else stored


def _sha(value: bytes | str) -> str:
    return hashlib.sha256(value.encode() if isinstance(value, str) else value).hexdigest()


def image_phash(data: bytes) -> str:
    import imagehash   # here, like datasketch below: they pull in scipy, which the driver never needs

    return str(imagehash.phash(Image.fromarray(decode_image(data))))


def video_phash(frames: bytes) -> list[str]:
    """Perceptual hashes of VIDEO_HASHES frames evenly spread over a clip's sampled frames."""
    import imagehash

    pictures = frames_from_bytes(frames)
    if pictures.ndim != 4 or not len(pictures):
        raise ValueError(f"video frames of shape {pictures.shape}, expected (frames, height, width, 3)")
    picks = np.linspace(0, len(pictures) - 1, VIDEO_HASHES).round().astype(int)
    return [str(imagehash.phash(Image.fromarray(pictures[k]))) for k in picks]


def shingles(text: str, k: int) -> set[str]:
    words = WORD.findall(text.lower())
    return {" ".join(words[i:i + k]) for i in range(len(words) - k + 1)}


@functools.cache
def _permutations(num_perm: int) -> np.ndarray:
    """datasketch draws the permutations (seed 1) anew for every MinHash: a third of the time of
    a short text's signature. They depend only on ``num_perm``."""
    from datasketch import MinHash

    return MinHash(num_perm=num_perm, scheme=MINHASH_SCHEME).permutations


def text_minhash(text: str, p: DedupParams) -> list[int] | None:
    grams = shingles(text, p.shingle)
    if len(grams) < p.min_shingles:
        return None
    from datasketch import MinHash

    m = MinHash(num_perm=p.num_perm, scheme=MINHASH_SCHEME, permutations=_permutations(p.num_perm))
    m.update_batch([g.encode() for g in grams])
    return m.hashvalues.tolist()


def signature_of(row_id: str, media: dict[str, Any], p: DedupParams, frames: bytes | None = None) -> Signature:
    """Signature of one row from its cleaned media (modality -> value, None where absent) and its
    clip's sampled frames."""
    present = {m: v for m, v in media.items() if v is not None}
    sha = {m: _sha(v) for m, v in present.items()}
    sha["sample"] = _sha(json.dumps(sha, sort_keys=True))
    phash = image_phash(present["image"]) if p.image_phash and "image" in present else None
    mh = text_minhash(present["text"], p) if p.text_minhash and "text" in present else None
    vph = video_phash(frames) if p.video_phash and "video" in present and frames is not None else None
    return Signature(row_id, sha, phash, mh, vph)


# -- signatures in arrays -------------------------------------------------------------------
_BIT = {m: 1 << k for k, m in enumerate(MODALITIES)}
_KEYS = ("sample", *MODALITIES)


def _hash64(text: str) -> int:
    """A row id's 64-bit hash: the shard that holds the row, and the by-id index's key (murmur3:
    every shard hashes every stored id while it seeds, so this is on a per-row path)."""
    return mmh3.hash64(text, signed=False)[0]


def _hash128(value: str) -> tuple[int, int]:
    """A content hash as two uint64: the first 128 bits of a sha256 hex digest (another string hashed)."""
    if len(value) == 64:
        try:
            return int(value[:16], 16), int(value[16:32], 16)
        except ValueError:
            pass
    digest = hashlib.blake2b(value.encode(), digest_size=16).digest()
    return int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:], "little")


@dataclass
class _Block:
    """Signatures packed in arrays, a row each: what the stage sends and what a shard stores."""

    ids: list[str]
    id_hash: np.ndarray               # uint64
    mask: np.ndarray                  # uint8: a bit per modality present
    sha: dict[str, np.ndarray]        # key -> (n, 2) uint64: the first 128 bits of its sha256
    has_sha: dict[str, np.ndarray]    # key -> bool
    phash: np.ndarray                 # uint64
    has_phash: np.ndarray             # bool
    minhash: np.ndarray               # (n, num_perm) uint32
    has_minhash: np.ndarray           # bool: any MinHash (then the row looks for near duplicates)
    minhash_ok: np.ndarray            # bool: a MinHash of the index's num_perm, comparable
    vphash: np.ndarray                # (n, VIDEO_HASHES) uint64
    has_vphash: np.ndarray            # bool

    @classmethod
    def of(cls, sigs: list[Signature], num_perm: int) -> "_Block":
        block = cls.empty([s.id for s in sigs], num_perm)
        for i, s in enumerate(sigs):
            block._fill(i, s.sha, s.image_phash, s.text_minhash, s.video_phash)
        return block

    @classmethod
    def parse(cls, ids: list[str], texts: list[str], num_perm: int) -> "_Block":
        """From stored ``dedup_sig`` strings (either form), with no Signature made per row."""
        block = cls.empty(ids, num_perm)
        for i, text in enumerate(texts):
            d = json.loads(text)
            block._fill(i, d["sha"], d.get("image_phash"), _minhash_values(d.get("text_minhash")), d.get("video_phash"))
        return block

    @classmethod
    def empty(cls, ids: list[str], num_perm: int) -> "_Block":
        n = len(ids)
        return cls(ids, np.array([_hash64(i) for i in ids], np.uint64), np.zeros(n, np.uint8),
                   {k: np.zeros((n, 2), np.uint64) for k in _KEYS}, {k: np.zeros(n, bool) for k in _KEYS},
                   np.zeros(n, np.uint64), np.zeros(n, bool), np.zeros((n, num_perm), np.uint32), np.zeros(n, bool),
                   np.zeros(n, bool), np.zeros((n, VIDEO_HASHES), np.uint64), np.zeros(n, bool))

    def _fill(self, i: int, sha: dict[str, str], phash: str | None, minhash: Any, vphash: list[str] | None) -> None:
        for key, h in sha.items():
            if key in self.sha:
                self.sha[key][i], self.has_sha[key][i] = _hash128(h), True
            self.mask[i] |= _BIT.get(key, 0)
        if phash is not None:
            self.phash[i], self.has_phash[i] = int(phash, 16), True
        if minhash is not None:
            self.has_minhash[i] = True
            if len(minhash) == self.minhash.shape[1]:
                self.minhash[i], self.minhash_ok[i] = minhash, True
        if vphash is not None and len(vphash) == VIDEO_HASHES:
            self.vphash[i], self.has_vphash[i] = [int(h, 16) for h in vphash], True

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, rows: slice) -> "_Block":
        return _Block(self.ids[rows], self.id_hash[rows], self.mask[rows], {k: v[rows] for k, v in self.sha.items()},
                      {k: v[rows] for k, v in self.has_sha.items()}, self.phash[rows], self.has_phash[rows],
                      self.minhash[rows], self.has_minhash[rows], self.minhash_ok[rows], self.vphash[rows],
                      self.has_vphash[rows])

    @property
    def near(self) -> np.ndarray:
        return self.has_phash | self.has_minhash | self.has_vphash


def _packed(sigs: list[Signature] | _Block, p: DedupParams) -> _Block:
    return sigs if isinstance(sigs, _Block) else _Block.of(list(sigs), p.num_perm)


def _pack(queries: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """(query, row) pairs as one int64 each, to sort, intersect and count them."""
    return (np.asarray(queries, np.int64) << 32) | np.asarray(rows, np.int64)


def _unpack(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return codes >> 32, codes & 0xFFFFFFFF


def _cat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


# -- arrays that grow -----------------------------------------------------------------------
class _Column:
    """A numpy array grown by appends (capacity x1.125: at a million rows, spare capacity costs more
    than the copies); ``trim`` drops the spare capacity."""

    def __init__(self, dtype: Any, width: int = 0):
        self._shape = (width,) if width else ()
        self._a = np.zeros((0, *self._shape), dtype)
        self.n = 0

    @property
    def data(self) -> np.ndarray:
        return self._a[:self.n]

    def extend(self, values: Any) -> None:
        need = self.n + len(values)
        if need > len(self._a):
            grown = np.empty((max(need, len(self._a) * 9 // 8 + 1024), *self._shape), self._a.dtype)
            grown[:self.n] = self.data
            self._a = grown
        self._a[self.n:need] = values
        self.n = need

    def keep(self, which: np.ndarray) -> None:
        self._a = self.data[which]
        self.n = len(self._a)

    def trim(self) -> None:
        if len(self._a) > self.n:
            self._a = self.data.copy()

    @property
    def nbytes(self) -> int:
        return self._a.nbytes


class _Strings:
    """Strings in one UTF-8 byte buffer with their end offsets."""

    def __init__(self) -> None:
        self._bytes, self._ends = _Column(np.uint8), _Column(np.int64)

    def extend(self, strings: list[str]) -> None:
        raw = [s.encode() for s in strings]
        start = self._ends.data[-1] if self._ends.n else 0
        self._ends.extend(start + np.cumsum([len(r) for r in raw], dtype=np.int64))
        self._bytes.extend(np.frombuffer(b"".join(raw), np.uint8))

    def __getitem__(self, i: int) -> str:
        ends = self._ends.data
        return self._bytes.data[ends[i - 1] if i else 0:ends[i]].tobytes().decode()

    def keep(self, which: np.ndarray) -> None:
        """Keep the strings where ``which`` (bool) is set."""
        ends = self._ends.data
        starts, ends = np.r_[0, ends[:-1]][which], ends[which]
        lengths = ends - starts
        new_ends = np.cumsum(lengths)
        total = int(new_ends[-1]) if len(new_ends) else 0
        self._bytes.keep(np.repeat(starts - new_ends + lengths, lengths) + np.arange(total))
        self._ends = _Column(np.int64)
        self._ends.extend(new_ends)

    def trim(self) -> None:
        self._bytes.trim()
        self._ends.trim()

    @property
    def nbytes(self) -> int:
        return self._bytes.nbytes + self._ends.nbytes


@dataclass
class _Run:
    keys: np.ndarray
    values: np.ndarray               # uint32: rows (or MinHash slots)
    aux: np.ndarray | None = None    # uint64: a second key that must match too

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes + (0 if self.aux is None else self.aux.nbytes)


def _merge(runs: list[_Run]) -> _Run:
    """One sorted run of all the pairs; equal keys stay in the order given (timsort: sorted runs
    merge in linear time)."""
    keys = np.concatenate([r.keys for r in runs])
    order = np.argsort(keys, kind="stable")
    aux = None if runs[0].aux is None else np.concatenate([r.aux for r in runs])[order]
    return _Run(keys[order], np.concatenate([r.values for r in runs])[order], aux)


class _KeyIndex:
    """key -> values in sorted runs, LSM-style: inserts merge into a small run, which merges into the
    large one once it holds a sixteenth of it, so no insert copies the whole index; a seed's chunks
    wait unsorted and are sorted once (``flush``)."""

    SMALL = 1 << 14

    def __init__(self, dtype: Any, aux: bool = False):
        self._dtype, self._aux = dtype, aux
        self._large, self._small = self._empty(), self._empty()
        self._waiting: list[_Run] = []

    def _empty(self) -> _Run:
        return _Run(np.zeros(0, self._dtype), np.zeros(0, np.uint32), np.zeros(0, np.uint64) if self._aux else None)

    def insert(self, keys: np.ndarray, values: np.ndarray, aux: np.ndarray | None = None, wait: bool = False) -> None:
        run = _Run(keys.astype(self._dtype), values.astype(np.uint32), aux)
        if wait:
            self._waiting.append(run)
            return
        self._small = _merge([self._small, run])
        if len(self._small) > max(self.SMALL, len(self._large) // 16):
            self._large, self._small = _merge([self._large, self._small]), self._empty()

    def flush(self) -> None:
        if self._waiting:
            self._large = _merge([self._large, self._small, *self._waiting])
            self._small, self._waiting = self._empty(), []

    def lookup(self, keys: np.ndarray, which: np.ndarray,
               aux: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(query, value) for each stored key equal to ``keys[q]`` (and aux to ``aux[q]``), q in ``which``."""
        queries, values = [np.zeros(0, np.int64)], [np.zeros(0, np.uint32)]
        for run in (self._large, self._small):
            if not len(run) or not len(which):
                continue
            q = keys[which].astype(self._dtype)
            lo = np.searchsorted(run.keys, q, "left")
            counts = np.searchsorted(run.keys, q, "right") - lo
            pos = np.repeat(lo - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
            qi = np.repeat(np.asarray(which, np.int64), counts)
            if aux is not None:
                same = run.aux[pos] == aux[qi]
                pos, qi = pos[same], qi[same]
            queries.append(qi)
            values.append(run.values[pos])
        return np.concatenate(queries), np.concatenate(values)

    def shared_keys(self) -> Iterator[np.ndarray]:
        """Values that share a key with another, a group at a time, in insertion order (after ``flush``)."""
        keys, values = self._large.keys, self._large.values
        same = np.flatnonzero(keys[1:] == keys[:-1])
        for start in same[np.r_[True, np.diff(same) > 1]] if len(same) else ():
            end = start + 1
            while end < len(keys) and keys[end] == keys[start]:
                end += 1
            yield values[start:end]

    def compact(self, keep: np.ndarray, remap: np.ndarray) -> None:
        """Drop the pairs of values not kept; renumber the others."""
        self.flush()
        for name in ("_large", "_small"):
            run = getattr(self, name)
            sel = keep[run.values]
            setattr(self, name, _Run(run.keys[sel], remap[run.values[sel]].astype(np.uint32),
                                     None if run.aux is None else run.aux[sel]))

    @property
    def nbytes(self) -> int:
        return self._large.nbytes + self._small.nbytes + sum(r.nbytes for r in self._waiting)


# -- the index ------------------------------------------------------------------------------
@functools.cache
def _band_ranges(threshold: float, num_perm: int) -> list[tuple[int, int]]:
    """datasketch's bands for this threshold (it integrates false positive and negative rates over
    every split of ``num_perm``: ~40 ms, once per process, not once per run)."""
    from datasketch import MinHashLSH

    return MinHashLSH(threshold=threshold, num_perm=num_perm).hashranges


@functools.cache
def _multipliers(num_perm: int) -> np.ndarray:
    """Odd 64-bit multipliers, one per MinHash position, for the band keys."""
    return np.random.default_rng(27).integers(0, 2**63, num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)


class _MinHashBands:
    """MinHash LSH: rows whose values agree on every value of any one band are candidates, then
    kept when their estimated Jaccard (the share of equal values) reaches the threshold. The bands
    are datasketch's for this threshold (``MinHashLSH.hashranges``), so the candidates are the ones
    ``MinHashLSH.query`` gives. A band is looked up by a 32-bit hash of its values and its values
    compared: a hash collision costs a comparison, never a candidate."""

    def __init__(self, threshold: float, num_perm: int):
        self.threshold, self.num_perm = threshold, num_perm
        self.ranges = _band_ranges(threshold, num_perm)
        self.values = _Column(np.uint32, num_perm)   # by slot
        self.rows = _Column(np.uint32)               # slot -> row
        self.bands = [_KeyIndex(np.uint32) for _ in self.ranges]

    def _keys(self, values: np.ndarray) -> np.ndarray:
        mixed = values.astype(np.uint64) * _multipliers(self.num_perm)
        return np.stack([(mixed[:, start:end].sum(axis=1, dtype=np.uint64) >> np.uint64(32)).astype(np.uint32)
                         for start, end in self.ranges], axis=1)

    def add(self, rows: np.ndarray, values: np.ndarray, wait: bool = False) -> None:
        """``values``: one row of uint32 MinHash values per row number in ``rows``."""
        slots = np.arange(self.rows.n, self.rows.n + len(rows), dtype=np.uint32)
        keys = self._keys(values)
        self.values.extend(values)
        self.rows.extend(rows)
        for b, band in enumerate(self.bands):
            band.insert(keys[:, b], slots, wait=wait)

    def pairs(self, values: np.ndarray, which: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(query, row) for the rows near ``values[q]``, q in ``which``."""
        if not len(which) or not self.rows.n:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        q, stored = values[which], self.values.data
        keys, everyone = self._keys(q), np.arange(len(which))
        codes = []
        for b, ((start, end), band) in enumerate(zip(self.ranges, self.bands)):
            qi, slots = band.lookup(keys[:, b], everyone)
            same = _equal_values(stored, slots, q, qi, slice(start, end)) == end - start
            codes.append(_pack(qi[same], slots[same]))
        qi, slots = _unpack(np.unique(_cat(codes)))
        close = _equal_values(stored, slots, q, qi, slice(None)) / self.num_perm >= self.threshold   # MinHash.jaccard
        return np.asarray(which, np.int64)[qi[close]], self.rows.data[slots[close]].astype(np.int64)

    def compact(self, keep: np.ndarray, remap: np.ndarray) -> None:
        sel = keep[self.rows.data]
        slot_remap = np.cumsum(sel) - 1
        self.values.keep(sel)
        self.rows.keep(sel)
        self.rows.data[:] = remap[self.rows.data]
        for band in self.bands:
            band.compact(sel, slot_remap)

    def flush(self) -> None:
        for band in self.bands:
            band.flush()

    def trim(self) -> None:
        self.values.trim()
        self.rows.trim()

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.rows.nbytes + sum(b.nbytes for b in self.bands)


_SAVED = (_Column, _Strings, _Run, _KeyIndex, _MinHashBands)   # what a saved shard may hold


def _equal_values(a: np.ndarray, rows_a: np.ndarray, b: np.ndarray, rows_b: np.ndarray, cols: slice) -> np.ndarray:
    """Per pair k, how many of ``a[rows_a[k], cols]`` equal ``b[rows_b[k], cols]``; a slice of pairs
    at a time, so that a band thousands of rows share costs time, not memory."""
    step = 1 << 15
    return _cat([np.count_nonzero(a[rows_a[k:k + step], cols] == b[rows_b[k:k + step], cols], axis=1)
                 for k in range(0, len(rows_a), step)])


def _sha_keys(p: DedupParams) -> set[str]:
    """The content hashes an index looks up: the exact keys and, for near matching, every modality
    that may be compared exactly (audio; text too short for a MinHash; images when pHash is off)."""
    keys = set(p.exact)
    if p.image_phash or p.text_minhash or p.video_phash:
        keys |= {"text", "audio"} | (set() if p.image_phash else {"image"}) | (set() if p.video_phash else {"video"})
    return keys


def _chunks(rows: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """``rows`` in lists of ``size`` (the last one shorter)."""
    it = iter(rows)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def _row_keys(ids: Iterable[str], versions: Iterable[str]) -> np.ndarray:
    """(n, 2) uint64: a 128-bit hash of each stored row's id and version, to tell a saved row still stored."""
    return np.array([mmh3.hash64(f"{i}\0{v}", signed=False) for i, v in zip(ids, versions)], np.uint64).reshape(-1, 2)


def _flatten(value: Any, path: str, arrays: dict[str, np.ndarray]) -> Any:
    """A shard's state as a JSON outline, its arrays moved to ``arrays`` under their path (the
    index's own classes only: a saved file never names code to run)."""
    if isinstance(value, np.ndarray):
        arrays[path] = value
        return {"array": path}
    if isinstance(value, type):
        return {"dtype": np.dtype(value).str}
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return {type(value).__name__: [_flatten(v, f"{path}.{k}", arrays) for k, v in enumerate(value)]}
    if isinstance(value, dict):
        return {"dict": {k: _flatten(v, f"{path}.{k}", arrays) for k, v in value.items()}}
    if type(value) in _SAVED:
        state = dict(vars(value), _a=value.data) if isinstance(value, _Column) else vars(value)   # not its spare rows
        return {"object": type(value).__name__, "state": {k: _flatten(v, f"{path}.{k}", arrays) for k, v in state.items()}}
    raise TypeError(f"cannot save {type(value).__name__} at {path}")


class _SavedArrays:
    """The arrays of a saved shard, each read from its .npy file when asked for, straight into an
    array with ``spare`` more rows (a column then grows by this run's rows without a copy)."""

    def __init__(self, folder: str):
        self.folder = folder

    def __getitem__(self, name: str) -> np.ndarray:
        return self.load(name)

    def load(self, name: str, spare: int = 0) -> np.ndarray:
        with open(os.path.join(self.folder, f"{name}.npy"), "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = header(f)
            if fortran or dtype.hasobject or not shape:
                raise ValueError(f"{name}: not an array a shard saves")
            out = np.empty((shape[0] + spare, *shape[1:]), dtype)
            view = memoryview(out[:shape[0]]).cast("B")
            if f.readinto(view) != view.nbytes:
                raise ValueError(f"{name}: cut short")
        return out


def _unflatten(value: Any, arrays: Any) -> Any:
    if not isinstance(value, dict):
        return value
    (kind, inner), = value.items() if len(value) == 1 else (("object", value),)
    if kind == "array":
        return arrays[inner]
    if kind == "dtype":
        return np.dtype(inner).type
    if kind in ("list", "tuple"):
        items = [_unflatten(v, arrays) for v in inner]
        return items if kind == "list" else tuple(items)
    if kind == "dict":
        return {k: _unflatten(v, arrays) for k, v in inner.items()}
    cls = {c.__name__: c for c in _SAVED}[value["object"]]
    obj = cls.__new__(cls)
    state = value["state"]
    if cls is _Column and isinstance(arrays, _SavedArrays):   # room for the rows a run adds
        obj._a = arrays.load(state["_a"]["array"], spare=state["n"] // 16 + 1024)
        state = {k: v for k, v in state.items() if k != "_a"}
    vars(obj).update({k: _unflatten(v, arrays) for k, v in state.items()})
    return obj


@dataclass
class _Found:
    """A shard's answer for a block: per row, the seq of the earliest row it matches (-1: none) and that row's id."""

    seq: np.ndarray
    kept: list[str | None]


class _Shard:
    """Rows of the run's index (all, or those whose id hash falls to shard ``home`` of ``shards``) in
    arrays: no Python object per row. Rows are appended in registration order; a replaced one is
    marked dead and dropped by the next compaction. Also the body of a shard actor."""

    def __init__(self, params: DedupParams | dict, home: int = 0, shards: int = 1):
        self.params = p = params if isinstance(params, DedupParams) else DedupParams.model_validate(params)
        self.home, self.shards = home, shards
        self.seq = _Column(np.int64)        # registration order: the first seen wins
        self.alive = _Column(bool)
        self.mask = _Column(np.uint8)
        self.phash, self.has_phash = _Column(np.uint64), _Column(bool)
        self.vphash, self.has_vphash = _Column(np.uint64, VIDEO_HASHES), _Column(bool)
        self.ids = _Strings()
        self.key = _Column(np.uint64, 2)     # a stored row's 128-bit hash of (id, run id); 0 for this run's
        self.by_id = _KeyIndex(np.uint64)
        self.by_sha = {key: _KeyIndex(np.uint64, aux=True) for key in sorted(_sha_keys(p))}
        self.text = _MinHashBands(p.minhash_threshold, p.num_perm) if p.text_minhash else None
        self.dead = 0

    def size(self) -> int:
        return self.seq.n - self.dead

    def nbytes(self) -> int:
        arrays = (self.seq, self.alive, self.mask, self.phash, self.has_phash, self.vphash, self.has_vphash, self.ids, self.key,
                  self.by_id,
                  *self.by_sha.values(), *([self.text] if self.text else []))
        return sum(a.nbytes for a in arrays)

    def owns(self, row_id: str) -> bool:
        return self.shards == 1 or _hash64(row_id) % self.shards == self.home

    # -- seeding ------------------------------------------------------------------------------
    def seed(self, source: "StoredSignatures", snapshot: str = "") -> int:
        """Add the stored rows that fall to this shard, in store order; returns how many it holds.
        With ``snapshot`` (the folder ``save`` wrote in an earlier run), start from it: only the
        stored rows whose id and signature it does not hold are parsed (``_refresh``)."""
        restored = bool(snapshot) and self._restore(snapshot)
        if restored:
            self._refresh(source)
        else:
            self._seed_rows(source.rows(self.owns), 0)
        for index in (self.by_id, *self.by_sha.values(), *([self.text] if self.text else [])):
            index.flush()
        self._drop_repeated_ids()
        if self.dead > max(COMPACT_MIN, self.seq.n // 4):
            self.compact()
        if not restored:   # (a restored shard's columns were read with a little room to grow: kept)
            for column in (self.seq, self.alive, self.mask, self.phash, self.has_phash, self.vphash, self.has_vphash,
                           self.ids, self.key, *([self.text] if self.text else [])):
                column.trim()
        return self.size()

    def _seed_rows(self, rows: Iterable[tuple[int, str, str, str]], base: int) -> None:
        """Parse and add stored rows (scan position, id, signature, version), as seq ``base + position``."""
        for chunk in _chunks(rows, SEED_CHUNK):
            self._seed_chunk(chunk, base)

    def _seed_chunk(self, rows: list[tuple[int, str, str, str]], base: int = 0) -> None:
        if rows:
            seqs, ids, texts, versions = zip(*rows)
            block = _Block.parse(list(ids), list(texts), self.params.num_perm)
            self._append(block, np.arange(len(rows)), base + np.array(seqs, np.int64), wait=True,
                         keys=_row_keys(ids, versions))

    def _refresh(self, source: "StoredSignatures") -> None:
        """A restored shard brought up to date with the store: its rows whose (id, version) is
        still stored stay, the others die; stored rows it lacks are parsed and added after it."""
        alive = np.flatnonzero(self.alive.data)
        held = self.key.data[alive]
        order = np.argsort(held[:, 0], kind="stable")   # by the first 64 bits; a hit must match all 128
        held = held[order]
        first = np.ascontiguousarray(held[:, 0])
        seen = np.zeros(len(alive), bool)
        base = int(self.seq.data[alive].max()) + 1 if len(alive) else 0
        missing: list[tuple[int, str, str, str]] = []
        for positions, ids, versions, sigs in source.owned(self.owns):
            keys = _row_keys(ids, versions)
            at = np.minimum(np.searchsorted(first, keys[:, 0]), max(len(held) - 1, 0))
            hit = (held[at] == keys).all(axis=1) if len(held) else np.zeros(len(keys), bool)
            seen[order[at[hit]]] = True   # (a 64-bit collision only costs a row parsed again)
            lack = np.flatnonzero(~hit)
            texts = sigs.take(pa.array(lack, pa.int64())).to_pylist()
            missing.extend((positions[k], ids[k], text, versions[k]) for k, text in zip(lack.tolist(), texts))
            if len(missing) >= SEED_CHUNK:
                self._seed_chunk(missing, base)
                missing.clear()
        self._seed_chunk(missing, base)
        gone = alive[~seen]
        self.alive.data[gone] = False
        self.dead += len(gone)

    def next_seq(self) -> int:
        """The seq after every row held (a run's rows register after those a saved shard kept)."""
        return int(self.seq.data.max()) + 1 if self.seq.n else 0

    def save(self, path: str, run_id: str = "") -> None:
        """Write the rows this shard holds to the folder ``path``: an .npy file per array and a JSON
        outline (no pickle). The shard's last call. This run's rows (no key yet) are kept under the
        key its commit stores them with, (id, ``run_id``): the next run's refresh finds them stored,
        or, if they never were (a later stage rejected them, the commit failed), drops them.
        Without ``run_id`` they are left out."""
        mine = np.flatnonzero(self.alive.data & ~self.key.data.any(axis=1))
        if run_id:
            self.key.data[mine] = _row_keys([self.ids[int(k)] for k in mine], itertools.repeat(run_id))
        else:
            self.alive.data[mine] = False
        self.dead = int(np.count_nonzero(~self.alive.data))
        if self.dead:
            self.compact()
        arrays: dict[str, np.ndarray] = {}
        state = {k: _flatten(v, k, arrays) for k, v in vars(self).items() if k != "params"}
        tmp, old = f"{path}.{os.getpid()}.tmp", f"{path}.old"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        for name, array in arrays.items():
            np.save(os.path.join(tmp, f"{name}.npy"), array, allow_pickle=False)
        with open(os.path.join(tmp, "outline.json"), "w") as f:
            json.dump({"format": SAVE_FORMAT, "params": self.params.model_dump(mode="json"), "state": state}, f)
        shutil.rmtree(old, ignore_errors=True)
        if os.path.exists(path):
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)

    def _restore(self, path: str) -> bool:
        """Take the state ``save`` wrote, when it was written with these parameters for this shard."""
        try:
            with open(os.path.join(path, "outline.json")) as f:
                meta = json.load(f)
            if meta.get("format") != SAVE_FORMAT or meta.get("params") != self.params.model_dump(mode="json"):
                return False
            state = {k: _unflatten(v, _SavedArrays(path)) for k, v in meta["state"].items()}
        except (OSError, ValueError, KeyError, TypeError, EOFError):   # absent, partial, from another version
            return False
        if (state.get("home"), state.get("shards")) != (self.home, self.shards) or set(state) != set(vars(self)) - {"params"}:
            return False
        vars(self).update(state)
        return True

    def _drop_repeated_ids(self) -> None:
        """An id stored twice counts once, as its last copy."""
        for rows in self.by_id.shared_keys():
            last = {self.ids[int(r)]: int(r) for r in rows}
            for r in rows:
                if last[self.ids[int(r)]] != r and self.alive.data[r]:
                    self.alive.data[r] = False
                    self.dead += 1

    # -- matching -------------------------------------------------------------------------------
    def match(self, q: _Block) -> _Found:
        """Per row of the block, the earliest row here it matches. An entry of the row's own id, or
        of an id earlier in the block, does not count: those rows replace their entries."""
        qi, rows = self.pairs(q)
        eq, erows = self._entries(q, np.arange(len(q)))
        if len(qi) and len(eq):
            order = np.lexsort((eq, erows))
            erows, first = np.unique(erows[order], return_index=True)
            first = eq[order][first]
            at = np.minimum(np.searchsorted(erows, rows), len(erows) - 1)
            gone = (erows[at] == rows) & (first[at] <= qi)
            qi, rows = qi[~gone], rows[~gone]
        seq, kept = np.full(len(q), -1, np.int64), [None] * len(q)
        if len(qi):
            order = np.lexsort((self.seq.data[rows], qi))
            qi, rows = qi[order], rows[order]
            first = np.r_[True, qi[1:] != qi[:-1]]
            for i, r in zip(qi[first].tolist(), rows[first].tolist()):
                seq[i], kept[i] = self.seq.data[r], self.ids[r]
        return _Found(seq, kept)

    def pairs(self, q: _Block) -> tuple[np.ndarray, np.ndarray]:
        """(query, row) for every alive row that each row of the block matches; a group of queries
        at a time, which bounds the candidates held when many rows share a key or a band."""
        codes = _cat([np.unique(_cat([self._exact(part), self._near(part)])) + (start << 32)
                      for start in range(0, len(q), QUERY_GROUP) for part in [q[start:start + QUERY_GROUP]]])
        qi, rows = _unpack(codes)
        alive = self.alive.data[rows]
        return qi[alive], rows[alive]

    def _exact(self, q: _Block) -> np.ndarray:
        return _cat([_pack(*self.by_sha[key].lookup(q.sha[key][:, 0], np.flatnonzero(q.has_sha[key]), q.sha[key][:, 1]))
                     for key in self.params.exact])

    def _near(self, q: _Block) -> np.ndarray:
        """Near matches: the same modalities present, each close to the row's. A pair must be in one
        candidate set per modality compared by hash or MinHash; images by pHash are then checked
        among those candidates, or against every row when the image is all the row has."""
        need = np.zeros(len(q), np.int64)
        sets: list[np.ndarray] = []
        by_phash = np.zeros(len(q), bool)
        by_vphash = np.zeros(len(q), bool)
        for m in MODALITIES:
            has = q.near & ((q.mask & _BIT[m]) > 0)
            if m == "image":
                by_phash, has = has & q.has_phash, has & ~q.has_phash
            elif m == "video":
                by_vphash, has = has & q.has_vphash, has & ~q.has_vphash
            elif m == "text" and self.text is not None:
                banded, has = has & q.has_minhash, has & ~q.has_minhash
                need += banded
                sets.append(_pack(*self.text.pairs(q.minhash, np.flatnonzero(banded & q.minhash_ok))))
            if has.any():
                need += has
                if m in self.by_sha:
                    sets.append(_pack(*self.by_sha[m].lookup(q.sha[m][:, 0], np.flatnonzero(has), q.sha[m][:, 1])))
        codes, counts = np.unique(_cat(sets), return_counts=True)
        qi, rows = _unpack(codes[counts == need[codes >> 32]])
        close = np.ones(len(qi), bool)
        check = by_phash[qi]
        close[check] = self._phash_close(q.phash[qi[check]], rows[check])
        check = by_vphash[qi]
        close[check] &= self._vphash_close(q.vphash[qi[check]], rows[check])
        found = [_pack(qi[close], rows[close])]
        for i in np.flatnonzero((by_phash | by_vphash) & (need == 0)):   # only perceptual keys: every row
            hit = np.ones(self.seq.n, bool)
            if by_phash[i]:
                hit &= self._phash_close(q.phash[i], slice(None))
            if by_vphash[i]:
                hit &= self._vphash_close(q.vphash[i], slice(None))
            hits = np.flatnonzero(hit)
            found.append(_pack(np.full(len(hits), i), hits))
        qi, rows = _unpack(_cat(found))
        same = self.mask.data[rows] == q.mask[qi]
        return _pack(qi[same], rows[same])

    def _phash_close(self, codes: np.ndarray, rows: Any) -> np.ndarray:
        distance = np.bitwise_count(self.phash.data[rows] ^ codes)
        return self.has_phash.data[rows] & (distance <= self.params.phash_threshold)

    def _vphash_close(self, codes: np.ndarray, rows: Any) -> np.ndarray:
        distance = np.bitwise_count(self.vphash.data[rows] ^ codes).mean(axis=-1)
        return self.has_vphash.data[rows] & (distance <= self.params.video_phash_threshold)

    # -- registering ----------------------------------------------------------------------------
    def commit(self, q: _Block, keep: np.ndarray, seq0: int) -> None:
        """After a block's verdicts: its ids' old entries here go (kept or not, a reprocessed row
        replaces its entry); its kept rows that fall here are added, row i as seq ``seq0 + i``."""
        own = (q.id_hash % np.uint64(self.shards)) == np.uint64(self.home)
        self._remove(q, np.flatnonzero(own))
        add = np.flatnonzero(own & keep)
        self._append(q, add, seq0 + add)
        if self.dead > max(COMPACT_MIN, self.seq.n // 4):
            self.compact()

    def _entries(self, q: _Block, which: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(query, row) of the alive rows with the id of ``q``'s row, for the queries in ``which``."""
        qi, rows = self.by_id.lookup(q.id_hash, which)
        rows = rows.astype(np.int64)
        same = np.array([self.ids[r] == q.ids[i] for i, r in zip(qi.tolist(), rows.tolist())], bool)
        ok = self.alive.data[rows] & same
        return qi[ok], rows[ok]

    def _remove(self, q: _Block, which: np.ndarray) -> None:
        rows = np.unique(self._entries(q, which)[1])
        self.alive.data[rows] = False
        self.dead += len(rows)

    def _append(self, q: _Block, which: np.ndarray, seq: np.ndarray, wait: bool = False,
                keys: np.ndarray | None = None) -> None:
        if not len(which):
            return
        rows = np.arange(self.seq.n, self.seq.n + len(which), dtype=np.uint32)
        self.seq.extend(seq)
        self.key.extend(np.zeros((len(which), 2), np.uint64) if keys is None else keys)
        self.alive.extend(np.ones(len(which), bool))
        self.mask.extend(q.mask[which])
        self.phash.extend(q.phash[which])
        self.has_phash.extend(q.has_phash[which])
        self.vphash.extend(q.vphash[which])
        self.has_vphash.extend(q.has_vphash[which])
        self.ids.extend([q.ids[i] for i in which])
        self.by_id.insert(q.id_hash[which], rows, wait=wait)
        for key, index in self.by_sha.items():
            sel = which[q.has_sha[key][which]]
            index.insert(q.sha[key][sel, 0], rows[q.has_sha[key][which]], q.sha[key][sel, 1], wait=wait)
        if self.text is not None:
            ok = q.minhash_ok[which]
            self.text.add(rows[ok], q.minhash[which[ok]], wait=wait)

    def compact(self) -> None:
        """Drop the dead rows, renumbering the others."""
        keep = self.alive.data.copy()
        remap = np.cumsum(keep) - 1
        for column in (self.seq, self.alive, self.mask, self.phash, self.has_phash, self.vphash, self.has_vphash, self.key):
            column.keep(keep)
        self.ids.keep(keep)
        for index in (self.by_id, *self.by_sha.values(), *([self.text] if self.text else [])):
            index.compact(keep, remap)
        self.dead = 0


def _resolve(q: _Block, found: list[_Found], params: DedupParams) -> tuple[list[str | None], np.ndarray]:
    """A block's verdicts, in order, and which of its rows stay registered. A row duplicates the
    earliest row it matches: one registered before the block (``found``, one answer per shard),
    else one kept earlier in the block; a row replaces the block's earlier row of its id."""
    n = len(q)
    seqs = np.stack([f.seq for f in found])
    first = np.where(seqs < 0, np.iinfo(np.int64).max, seqs).argmin(axis=0)
    block = _Shard(params)
    block._append(q, np.arange(n), np.arange(n))
    qi, rows = block.pairs(q)
    before = rows < qi
    within: list[list[int]] = [[] for _ in range(n)]
    for i, j in zip(qi[before].tolist(), rows[before].tolist()):
        within[i].append(j)
    registered = np.zeros(n, bool)
    holder: dict[str, int] = {}          # id -> its row registered in this block
    verdicts: list[str | None] = []
    for i, row_id in enumerate(q.ids):
        if row_id in holder:
            registered[holder.pop(row_id)] = False
        kept = found[first[i]].kept[i]
        if kept is None:
            earlier = [j for j in within[i] if registered[j]]
            kept = q.ids[min(earlier)] if earlier else None
        if kept is None:
            registered[i], holder[row_id] = True, i
        verdicts.append(kept)
    return verdicts, registered


@dataclass(frozen=True)
class StoredSignatures:
    """Where an index reads the stored rows' signatures: streamed from the store (``RunScope.stored``,
    shipped to the index's actors), or given inline (tests, tiny data); ``removed`` ids are skipped."""

    stored: Callable[[list[str]], Iterable[Any]] | None = None
    removed: frozenset[str] = frozenset()
    pairs: tuple[tuple[str, str], ...] = ()     # (id, dedup_sig)
    incoming: int = 0                           # rows the run will check (they grow the index too)
    # A stored column that changes whenever a row's signature may ("run_id": the run that wrote the
    # row, kept when a commit copies it into a new file); "": the signature is its own version.
    version: str = ""

    def count(self) -> int:
        """Stored rows, counted without reading their signatures."""
        return len(self.pairs) + (sum(b.num_rows for b in self.stored([])) if self.stored is not None else 0)

    def rows(self, owns: Callable[[str], bool] | None = None) -> Iterator[tuple[int, str, str, str]]:
        """(scan position, id, signature, version) of each row that has a signature and is not
        removed (and ``owns`` takes)."""
        for positions, ids, versions, sigs in self.owned(owns):
            yield from zip(positions, ids, sigs.to_pylist(), versions)

    def owned(self, owns: Callable[[str], bool] | None = None) -> Iterator[tuple[list[int], list[str], list[str], pa.Array]]:
        """Per stored batch, its rows that have a signature, are not removed and that ``owns`` takes:
        their scan positions, ids, versions (what tells a held row still stored: the ``version``
        column, else the signature itself) and signatures, these left in Arrow (a refresh reads into
        Python only those of the rows it does not hold)."""
        position = 0
        for ids, versions, sigs in self._batches():
            signed = pc.fill_null(pc.greater(pc.binary_length(sigs), 0), False).to_pylist()   # stored while dedup was off: none
            keep = [k for k, row_id in enumerate(ids)
                    if signed[k] and row_id not in self.removed and (owns is None or owns(row_id))]
            kept = sigs.take(pa.array(keep, pa.int64()))
            yield ([position + k for k in keep], [ids[k] for k in keep],
                   kept.to_pylist() if versions is None else [versions[k] for k in keep], kept)
            position += len(ids)

    def _batches(self) -> Iterator[tuple[list[str], list[str] | None, pa.Array]]:
        if self.pairs:
            yield [i for i, _ in self.pairs], None, pa.array([s for _, s in self.pairs], pa.string())
        if self.stored is not None:
            columns = ["id", *([self.version] if self.version else []), SIG]
            for batch in self.stored(columns):
                versions = batch.column(1).to_pylist() if self.version else None
                yield batch.column(0).to_pylist(), versions, batch.column(len(columns) - 1)


Existing = StoredSignatures | Iterable[tuple[str, str]]


def _source(existing: Existing) -> StoredSignatures:
    return existing if isinstance(existing, StoredSignatures) else StoredSignatures(pairs=tuple(existing))


class DedupIndex:
    """The run's dedup state in this process: one shard of every row. Plain class; ``IndexActor``
    holds one, or spreads the rows over shard actors."""

    def __init__(self, params: dict | DedupParams, existing: Existing = (), snapshot: str = ""):
        self.params = params if isinstance(params, DedupParams) else DedupParams.model_validate(params)
        self._shard = _Shard(self.params)
        self._shard.seed(_source(existing), snapshot)
        self._next = max(RUN_SEQ, self._shard.next_seq())

    def size(self) -> int:
        return self._shard.size()

    def nbytes(self) -> int:
        return self._shard.nbytes()

    def check(self, sigs: list[Signature] | _Block) -> list[str | None]:
        """Per row, in order: None (kept, now registered) or the kept id it duplicates."""
        q = _packed(sigs, self.params)
        if not len(q):
            return []
        verdicts, keep = _resolve(q, [self._shard.match(q)], self.params)
        self._shard.commit(q, keep, self._next)
        self._next += len(q)
        return verdicts


# in-process indexes by name, for when Ray is not running (unit tests, single-process tools)
_LOCAL: dict[str, DedupIndex] = {}
# handles of the actors this process created: a non-detached actor dies with its last handle
_ACTORS: dict[str, Any] = {}


def shard_count(p: DedupParams, source: StoredSignatures, saved: int | None = None) -> int:
    """``shards`` when set, else one shard per ``rows_per_shard`` rows (stored and incoming); one, in
    this process, without Ray. Not capped by the cluster's CPUs: the shards are 0-CPU actors, and
    their count is what keeps each one's memory bounded as the store grows. The count of the shards
    an earlier run ``saved`` is kept while each holds at most twice ``rows_per_shard`` (and there
    are at most twice as many as needed): a saved shard is of use only to a run with the same count."""
    if p.shards:
        return p.shards
    if not ray.is_initialized():
        return 1
    rows = source.count() + source.incoming
    needed = max(1, math.ceil(rows / p.rows_per_shard))
    if saved and math.ceil(rows / (2 * p.rows_per_shard)) <= saved <= 2 * needed:
        return saved
    return needed


def saved_count(folder: str) -> int | None:
    """The shard count of the latest complete set of shards an earlier run saved in ``folder``."""
    sets: dict[int, list[float]] = {}
    for name in os.listdir(folder) if folder and os.path.isdir(folder) else ():
        match = re.fullmatch(r"shard-(\d+)-of-(\d+)", name)
        outline = os.path.join(folder, name, "outline.json")
        if match and os.path.isfile(outline):
            sets.setdefault(int(match[2]), []).append(os.path.getmtime(outline))
    complete = {count: max(times) for count, times in sets.items() if len(times) == count}
    return max(complete, key=complete.get) if complete else None


class SeededActor:
    """What the dedup and semantic dedup index actors share: every call waits for the seed (and
    fails with its error), and the size and shard count of the index, held here (``_index``) or
    in shard actors (``_shards``)."""

    WHAT = "the dedup index"
    _index: Any
    _shards: list[Any]
    _seeded: asyncio.Event
    _error: str

    async def size(self) -> int:
        await self._ready()
        if self._index is not None:
            return self._index.size()
        return sum(await asyncio.gather(*(s.size.remote() for s in self._shards)))

    async def shards(self) -> int:
        await self._ready()
        return len(self._shards) or 1

    async def _ready(self) -> None:
        await self._seeded.wait()
        if self._error:
            raise RuntimeError(f"{self.WHAT} could not be seeded from the store: {self._error}")


class IndexActor(SeededActor):
    """The run's index as a Ray actor that may be started before it is seeded: the runner starts
    it before the scan, so that the worker's start-up overlaps the driver's scan, and seeds it
    once the plan says which stored rows count. Async: a check that arrives before the seed
    waits for it. Checks take turns (in arrival order), each to its end, registration included,
    so shards never see two blocks interleave."""

    def __init__(self, params: dict, name: str = ""):
        self._params = DedupParams.model_validate(params)
        self._name = name
        self._index: DedupIndex | None = None   # every row here, or
        self._shards: list[Any] = []            # shard actors
        self._next = RUN_SEQ
        self._error = ""
        self._snapshots: list[str] = []         # where each shard is saved at the end, and read from at the start
        self._seeded = asyncio.Event()
        self._turn = asyncio.Lock()

    async def seed(self, existing: Existing, snapshots: str = "") -> None:
        """Read the stored rows (from the shards an earlier run saved in the folder ``snapshots``,
        brought up to date, when they are there)."""
        try:
            source = _source(existing)
            count = shard_count(self._params, source, saved_count(snapshots))
            if snapshots:
                self._snapshots = [os.path.join(snapshots, f"shard-{k}-of-{count}") for k in range(count)]
            paths = self._snapshots or [""] * count
            if count == 1:
                self._index = await asyncio.to_thread(DedupIndex, self._params, source, paths[0])
            else:
                options = {"num_cpus": 0, "scheduling_strategy": "SPREAD"}
                shards = [ray.remote(_Shard).options(**options, name=f"{self._name}-shard-{k}" if self._name else None)
                          .remote(self._params.model_dump(), k, count) for k in range(count)]
                await asyncio.gather(*(s.seed.remote(source, path) for s, path in zip(shards, paths)))   # each reads the store
                self._shards = shards
                self._next = max(RUN_SEQ, *await asyncio.gather(*(s.next_seq.remote() for s in shards)))
        except Exception as exc:   # a bad stored signature: every check reports it, none waits forever
            self._error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            self._seeded.set()

    async def check(self, sigs: list[Signature] | _Block) -> list[str | None]:
        q = _packed(sigs, self._params)
        await self._ready()
        async with self._turn:
            if self._index is not None:
                return self._index.check(q)
            if not len(q):
                return []
            ref = ray.put(q)
            found = await asyncio.gather(*(s.match.remote(ref) for s in self._shards))
            verdicts, keep = _resolve(q, list(found), self._params)
            await asyncio.gather(*(s.commit.remote(ref, keep, self._next) for s in self._shards))
            self._next += len(q)
            return verdicts

    async def save(self, run_id: str = "") -> int:
        """Save every shard where ``seed`` was told (the run's last call), this run's rows as ``run_id``
        commits them; returns how many were saved."""
        await self._ready()
        async with self._turn:
            if not self._snapshots:
                return 0
            if self._index is not None:
                await asyncio.to_thread(self._index._shard.save, self._snapshots[0], run_id)
            else:
                await asyncio.gather(*(s.save.remote(path, run_id) for s, path in zip(self._shards, self._snapshots)))
            return len(self._snapshots)



def start_index(name: str, params: dict) -> None:
    """Start the run's index actor, empty until ``seed_index`` (checks wait for the seed).
    Replaces an index of the same name."""
    close_index(name)
    _ACTORS[name] = ray.remote(num_cpus=0)(IndexActor).options(name=name).remote(params, name)


def seed_index(name: str, existing: Existing, snapshots: str = "") -> None:
    """Seed a started index with the rows already stored, which count as seen first: a
    ``StoredSignatures`` the actor reads itself, or (id, dedup_sig) pairs; ``snapshots``: a folder
    where the index saves itself at the end of the run and starts from the next time. Not waited
    for: the actor seeds itself while the stages' actor pools start."""
    _ACTORS[name].seed.remote(_source(existing), snapshots)


def create_index(name: str, params: dict, existing: Existing, local: bool = False, snapshots: str = "") -> Any:
    """Create the run's index (a named Ray actor when Ray is up, unless ``local``: then the stages
    run in this process too); ``existing``: the stored rows, which count as seen first (see
    ``seed_index``). Replaces an index of the same name."""
    if local or not ray.is_initialized():
        close_index(name)
        _LOCAL[name] = DedupIndex(params, _source(existing))
        return _LOCAL[name]
    start_index(name, params)
    seed_index(name, existing, snapshots)
    return _ACTORS[name]


def close_index(name: str) -> None:
    """Drop the named index and its shards (call after the run)."""
    _LOCAL.pop(name, None)
    _ACTORS.pop(name, None)
    if ray.is_initialized():
        for k in itertools.count():
            if not _kill(f"{name}-shard-{k}"):
                break
        _kill(name)


def _kill(name: str) -> bool:
    try:
        ray.kill(ray.get_actor(name))
    except ValueError:   # no such actor
        return False
    return True


def open_index(name: str, params: DedupParams) -> Checker:
    """The check function of the named index: in-process when this process holds it (or Ray is
    not running), else the Ray actor (signatures packed here, in the stage's actor)."""
    if name in _LOCAL or not ray.is_initialized():
        index = _LOCAL.get(name) or _LOCAL.setdefault(name, DedupIndex(params, []))
        return index.check
    try:
        actor = ray.get_actor(name)
    except ValueError:
        raise RuntimeError(f"dedup index {name!r} not found: call stages.dedup.create_index before the run") from None
    return lambda sigs: ray.get(actor.check.remote(_Block.of(sigs, params.num_perm)))


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
    reads = ("id", *MODALITIES, REDO, AUG)   # and the clips' sampled frames (FRAMES) where a video cleanup wrote them
    writes = (SIG,)
    reasons = {"duplicate": "an exact or near duplicate of a row kept earlier, in the store or this run "
                            "(detail: the kept id)",
               "dedup_error": "the cleaned image or clip frames could not be decoded for their perceptual hashes"}

    def __init__(self, params: DedupParams | dict | None = None, context=None):
        super().__init__(params, context)
        if self.params.image_phash:
            import imagehash  # noqa: F401 (loaded with the stage, not on its first row)
        if self.params.text_minhash:
            import datasketch  # noqa: F401
        self._check = open_index(index_name(self.context.run_id), self.params)

    @classmethod
    def fingerprint(cls, params: StageParams | dict | None = None) -> str:
        p = params if isinstance(params, DedupParams) else DedupParams.model_validate(params or {})
        return fingerprint_of(cls.name, cls.version, p.fingerprint_fields())

    @classmethod
    def start_run(cls, scope: RunScope) -> None:
        """The pass will use actors: start the index actor now, its worker's start-up (~1.5 CPU-s)
        overlapping the driver's scan; ``open_run`` seeds it."""
        start_index(index_name(scope.run_id), scope.params.model_dump())

    @classmethod
    def open_run(cls, scope: RunScope) -> None:
        """Hand the index where to read the stored signatures: it reads them itself."""
        name = index_name(scope.run_id)
        stored = StoredSignatures(scope.stored, scope.removed, incoming=scope.incoming, version="run_id")
        # The index actor of a store saves itself at the end of a run and starts from that the next
        # time, parsing only the stored rows it does not hold (an in-process index is small: no).
        snapshots = os.path.join(scope.cache_dir, "dedup") if scope.cache_dir and scope.stored else ""
        if name in _ACTORS and not scope.local:
            seed_index(name, stored, snapshots)
        else:
            create_index(name, scope.params.model_dump(), stored, local=scope.local, snapshots=snapshots)

    @classmethod
    def close_run(cls, scope: RunScope, failed: bool) -> None:
        name = index_name(scope.run_id)
        try:
            if not failed and name in _ACTORS:
                ray.get(_ACTORS[name].save.remote(scope.run_id))
        except Exception as exc:   # a cache: the next run seeds from the store instead
            print(f"mmpipe: warning: the dedup index was not saved for the next run: {exc}", file=sys.stderr)
        finally:
            close_index(name)

    def process(self, batch: Batch) -> Batch:
        n = num_rows(batch)
        if SIG not in batch:
            batch[SIG] = object_column([""] * n)
        rows, sigs = [], []
        for i in originals_to_check(batch):
            # a modality made from another (a clip's audio track) follows its source: not compared
            made = derived_modalities(batch, i)
            media = {m: batch[m][i] if m in batch and m not in made else None for m in MODALITIES}
            frames = batch[FRAMES][i] if FRAMES in batch else None
            try:
                sigs.append(signature_of(str(batch["id"][i]), media, self.params, frames))
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


def originals_to_check(batch: Batch) -> list[int]:
    """Live original rows (aug 0) that this run processes (non-empty redo): what a dedup checks."""
    aug = batch.get(AUG)
    return [int(i) for i in live_rows(batch)
            if str(batch[REDO][i] or "") and (aug is None or int(aug[i]) == 0)]
