"""A vector index over the store, kept in step with its features table.

One index per (alignment model, modality) under ``<store>/index/<model>/``: ``<modality>.hnsw``
(hnswlib's HNSW graph, cosine; chosen by ``benchmarks/bench_index.py`` at 100k vectors: at the
same recall it queried 1.4-1.8x faster than usearch and about as fast as FAISS's HNSW, and unlike
FAISS's HNSW it removes vectors (marked deleted, their slots reused by later adds)),
``<modality>.ids.parquet``
(key, id, label, sorted by key, so a result's id is read through the file's statistics) and
``<modality>.json`` (the features version and model it reflects). Keys are 64-bit hashes of the
sample ids. Without a model the stored features themselves are indexed (search within one modality).

``sync`` brings an index to the latest features version incrementally: the rows of the data files
that the commits since its version removed are deleted, the rows of the files they added are
embedded and added (a rewritten, unchanged row goes out and comes back), so the result equals a
fresh build. When the model changed or the old files are gone (vacuumed), it builds afresh.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from core.config import ConfigError
from core.scan import StoredFile
from core.store import Store
from training.data import embedding_matrix

READ_ROWS = 4096
M, EF_CONSTRUCTION, EF_SEARCH = 16, 128, 64   # graph degree and search breadths (bench_index.py's)
IDS_SCHEMA = pa.schema([("key", pa.uint64()), ("id", pa.string()), ("label", pa.string())])


def keys_of(ids: list[str] | np.ndarray) -> np.ndarray:
    """64-bit keys of sample ids (blake2b: stable across processes, unlike ``hash``)."""
    return np.fromiter((int.from_bytes(hashlib.blake2b(str(i).encode(), digest_size=8).digest(), "little") for i in ids),
                       np.uint64, count=len(ids))


def model_fingerprint(model_dir: str | Path | None) -> str:
    if model_dir is None:
        return "raw"
    return hashlib.sha256((Path(model_dir) / "align.pt").read_bytes()).hexdigest()[:16]


class Embedder:
    """Stored features of one modality -> the vectors indexed (the aligned space, or the features
    themselves, L2-normalised either way)."""

    def __init__(self, modality: str, model_dir: str | Path | None):
        self.modality, self.model = modality, None
        if model_dir is not None:
            from training.align import load_aligner

            self.model, saved = load_aligner(model_dir)
            if modality not in self.model.spec.modalities:
                raise ConfigError(f"the alignment model at {model_dir} maps {', '.join(self.model.spec.modalities)}, "
                                  f"not {modality}")

    def __call__(self, features: np.ndarray) -> np.ndarray:
        if self.model is None:
            x = features.astype(np.float32)
            return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        import torch

        with torch.no_grad():
            return self.model.embed(self.modality, torch.as_tensor(features, dtype=torch.float32)).numpy()


@dataclass
class IndexPaths:
    folder: Path
    modality: str

    @property
    def graph(self) -> Path:
        return self.folder / f"{self.modality}.hnsw"

    @property
    def ids(self) -> Path:
        return self.folder / f"{self.modality}.ids.parquet"

    @property
    def meta(self) -> Path:
        return self.folder / f"{self.modality}.json"


def index_folder(store: Store, model_dir: str | Path | None) -> Path:
    if "://" in store.uri:
        raise ConfigError("the vector index is kept on a local store path; copy the store or its models locally")
    return Path(store.uri) / "index" / (Path(model_dir).name if model_dir is not None else "_raw")


def _rows(store: Store, version: int, files: list[StoredFile] | None, modality: str) -> Iterator[pa.RecordBatch]:
    """Original rows with ``modality``, of the whole snapshot or of the given files (read with their
    own masks) only."""
    from training.stream import Snapshot

    scan = Snapshot(store.features_uri, version, store.storage_options).dataset()
    wanted = (pc.field("aug") == 0) & pc.field(f"has_{modality}")
    columns = ["id", "label", f"{modality}_emb", "aug", f"has_{modality}"]
    for f in scan.files if files is None else files:
        for batch in scan.file_batches(f, columns, wanted, READ_ROWS):
            if batch.num_rows:
                yield batch


def _gone(scan, then: StoredFile, now: StoredFile) -> StoredFile | None:
    """A file live at both versions whose deletion vector grew: it, read as only the rows deleted since."""
    import pyarrow.parquet as pq

    since = np.setdiff1d(now.deleted if now.deleted is not None else [], then.deleted if then.deleted is not None else [])
    if not len(since):
        return None
    with scan.fs.open_input_file(then.path) as handle:
        rows = pq.ParquetFile(handle).metadata.num_rows
    return StoredFile(then.path, np.setdiff1d(np.arange(rows), since))


def _vectors(batch: pa.RecordBatch, modality: str) -> np.ndarray:
    """The batch's embeddings as a matrix (training's reader: zeros for a short or null row)."""
    column = pa.chunked_array([batch.column(f"{modality}_emb")])
    return embedding_matrix(column, pc.max(pc.list_value_length(column)).as_py() or 0)


class VectorIndex:
    """The index of one modality in one space; ``sync`` first, then ``search``."""

    def __init__(self, store: str | Store, modality: str, model_dir: str | Path | None = None):
        self.store = store if isinstance(store, Store) else Store(str(store))
        self.modality, self.model_dir = modality, model_dir
        self.paths = IndexPaths(index_folder(self.store, model_dir), modality)
        self._embed: Embedder | None = None
        self._graph = None

    @property
    def embed(self) -> Embedder:
        if self._embed is None:
            self._embed = Embedder(self.modality, self.model_dir)
        return self._embed

    def meta(self) -> dict | None:
        return json.loads(self.paths.meta.read_text()) if self.paths.meta.is_file() else None

    # -- keeping it in step ---------------------------------------------------------------------
    def sync(self) -> dict:
        """Bring the index to the latest features version; returns what changed."""
        dt = self.store.table(self.store.features_uri)
        if dt is None:
            raise ConfigError(f"no features table at {self.store.features_uri}; run `mmpipe run` first")
        latest, fp = dt.version(), model_fingerprint(self.model_dir)
        meta = self.meta()
        if meta and meta["features_version"] == latest and meta["model"] == fp:
            return {"mode": "current", "added": 0, "removed": 0, "count": meta["count"], "features_version": latest}
        files = self._changed_files(meta, latest) if meta and meta["model"] == fp else None
        if files is None:
            return self._build(latest, fp)
        return self._update(latest, fp, meta, *files)

    def _changed_files(self, meta: dict, latest: int) -> tuple[list[StoredFile], list[StoredFile]] | None:
        """(rows gone, rows added) between the index's version and ``latest`` as files to read: the
        files removed, and those whose deletion vector grew masked to the rows it added; the files
        added. None when a removed file can no longer be read (vacuumed): then only a fresh build is right."""
        from training.stream import Snapshot

        uri, opts = self.store.features_uri, self.store.storage_options
        then = {f.path: f for f in Snapshot(uri, meta["features_version"], opts).dataset().files}
        scan = Snapshot(uri, latest, opts).dataset()
        now = {f.path: f for f in scan.files}
        removed = [f for path, f in then.items() if path not in now]
        if any(scan.fs.get_file_info(f.path).type.name == "NotFound" for f in removed):
            return None
        shrunk = [g for path, f in then.items() if path in now for g in [_gone(scan, f, now[path])] if g is not None]
        return removed + shrunk, [f for path, f in now.items() if path not in then]

    def _build(self, version: int, fp: str) -> dict:
        graph, ids = None, []
        for batch in _rows(self.store, version, None, self.modality):
            graph = self._add(graph, batch)
            ids.append(_id_rows(batch))
        table = pa.concat_tables(ids) if ids else IDS_SCHEMA.empty_table()
        self._save(graph, table, version, fp)
        return {"mode": "build", "added": table.num_rows, "removed": 0, "count": table.num_rows,
                "features_version": version}

    def _update(self, version: int, fp: str, meta: dict, removed: list[StoredFile], added: list[StoredFile]) -> dict:
        graph = _load(self.paths.graph, meta["dim"]) if self.paths.graph.is_file() else None
        ids = pq.read_table(self.paths.ids)
        gone = [keys_of(b.column("id").to_pylist()) for b in _rows(self.store, meta["features_version"], removed, self.modality)]
        gone_keys = np.concatenate(gone) if gone else np.zeros(0, np.uint64)
        present = pc.is_in(pa.array(gone_keys, pa.uint64()), value_set=ids["key"]).to_numpy(zero_copy_only=False)
        if graph is not None:
            for key in gone_keys[present]:
                graph.mark_deleted(int(key))
        ids = ids.filter(pc.invert(pc.is_in(ids["key"], value_set=pa.array(gone_keys, pa.uint64()))))
        new = []
        for batch in _rows(self.store, version, added, self.modality):
            graph = self._add(graph, batch)
            new.append(_id_rows(batch))
        table = pa.concat_tables([ids, *new])
        self._save(graph, table, version, fp)
        return {"mode": "update", "added": sum(t.num_rows for t in new), "removed": int(present.sum()),
                "count": table.num_rows, "features_version": version}

    def _add(self, graph, batch: pa.RecordBatch):
        """The batch's rows embedded and added (the graph made on the first batch, once the
        vectors' length is known, and grown by doubling); returns the graph."""
        import hnswlib

        vectors = self.embed(_vectors(batch, self.modality))
        if graph is None:
            graph = hnswlib.Index(space="cosine", dim=vectors.shape[1])
            graph.init_index(max_elements=max(1024, len(vectors)), ef_construction=EF_CONSTRUCTION, M=M,
                             allow_replace_deleted=True)
        needed = graph.get_current_count() + len(vectors)
        if needed > graph.get_max_elements():
            graph.resize_index(max(needed, 2 * graph.get_max_elements()))
        graph.add_items(vectors, keys_of(batch.column("id").to_pylist()), replace_deleted=True)
        return graph

    def _save(self, graph, ids: pa.Table, version: int, fp: str) -> None:
        """Graph, ids, then the meta that names their version: a crash between leaves the old meta,
        and the next sync rebuilds or redoes the update (both idempotent)."""
        self.paths.folder.mkdir(parents=True, exist_ok=True)
        if graph is not None:
            graph.save_index(str(self.paths.graph) + ".tmp")
            os.replace(str(self.paths.graph) + ".tmp", self.paths.graph)
        elif self.paths.graph.exists():
            self.paths.graph.unlink()
        ids = ids.sort_by("key")
        pq.write_table(ids, str(self.paths.ids) + ".tmp", row_group_size=16_384)
        os.replace(str(self.paths.ids) + ".tmp", self.paths.ids)
        meta = {"features_version": version, "model": fp, "modality": self.modality, "count": ids.num_rows,
                "dim": graph.dim if graph is not None else None,
                "model_dir": str(self.model_dir) if self.model_dir else None, "library": "hnswlib", "metric": "cosine"}
        tmp = self.paths.meta.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(meta, indent=2))
        tmp.replace(self.paths.meta)
        self._graph = None

    # -- searching ------------------------------------------------------------------------------
    def search(self, vectors: np.ndarray, k: int) -> list[list[dict]]:
        """The ``k`` nearest indexed rows of each query vector (already in the index's space):
        ``[{"id", "score" (cosine similarity), "label"}]`` per query, best first."""
        meta = self.meta()
        if meta is None:
            raise ConfigError(f"no {self.modality} index at {self.paths.folder}; sync it first")
        k = min(k, meta["count"])
        if k == 0:
            return [[] for _ in range(len(vectors))]
        if self._graph is None:
            self._graph = _load(self.paths.graph, meta["dim"])
        self._graph.set_ef(max(EF_SEARCH, 2 * k))
        keys, dists = self._graph.knn_query(np.asarray(vectors, np.float32), k)
        rows = pq.read_table(self.paths.ids, filters=[("key", "in", pa.array(np.unique(keys), pa.uint64()))])
        by_key = {r["key"]: r for r in rows.to_pylist()}
        return [[{"id": by_key[int(key)]["id"], "score": round(1.0 - float(d), 6), "label": by_key[int(key)]["label"]}
                 for key, d in zip(keys[i], dists[i]) if int(key) in by_key]
                for i in range(len(keys))]


def _load(path: Path, dim: int):
    import hnswlib

    graph = hnswlib.Index(space="cosine", dim=dim)
    graph.load_index(str(path), allow_replace_deleted=True)
    return graph


def _id_rows(batch: pa.RecordBatch) -> pa.Table:
    ids = batch.column("id").to_pylist()
    return pa.table({"key": pa.array(keys_of(ids), pa.uint64()), "id": pa.array(ids, pa.string()),
                     "label": batch.column("label").cast(pa.string())}, schema=IDS_SCHEMA)
