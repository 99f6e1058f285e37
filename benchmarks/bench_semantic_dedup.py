"""The semantic dedup index on stored 512-d embeddings (100k, and 1M): bytes per stored row, peak RSS
per process, seed time, check throughput, and verdicts against exact float32 search, for the index
before the change (one hnswlib float32 graph in one process) and after it (usearch int8 HNSW: one
shard in one process, and shard actors behind the index actor).

Vectors: 512-d, unit length, around 1,000 class centres (two rows of a class: cosine ~0.5) plus a
direction they share, made per 10,000-row chunk as the index reads them, so that no process holds
the table. Checked: 4,096 new rows in blocks of 512, a quarter of them near copies of stored rows at
a cosine drawn uniformly from [0.9, 1.0] (half past the 0.95 threshold, a few within 1e-4 of it),
1/16 near copies of earlier new rows, the rest new. Exact: every stored row's float32 cosine
(streamed), and the stage's rule: the nearest row kept before the block within the threshold, else
the first earlier row of the block that was kept and is within it.

Each index is built in its own Python process (and its own Ray for the shard actors), so each peak RSS
is that index's. Bytes per row: what the processes holding the index grew by while seeding and
checking (RSS; their allocators warmed by one pass over the store first), and what usearch reports it
allocated (capacity, grown in powers of two, included) plus the id and key arrays; per row the index
holds at the end (the stored rows and the checked rows it kept).

With ``--libraries N``: the vector stores considered for the index instead, each over the same N
stored rows (HNSW with M 16, ef_construction 128, ef 64, one thread): bytes per row, build and query
speed, and how often the nearest stored row within the threshold differs from exact search (FAISS
is a bench extra: `make bench` installs it).

Run: .venv/bin/python benchmarks/bench_semantic_dedup.py [--sizes 100000,1000000] [--shards 2,4]
[--indexes float32,int8,actors] [--libraries 100000]
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from common import ROOT, Report, Timer

from stages import semantic
from stages.semantic import SemanticIndex, SemanticParams, StoredEmbeddings

DIM, CENTRES, CHUNK, BLOCK = 512, 1000, 10_000, 512
QUERIES = 4096
MB = 1 << 20
PARAMS = {"modalities": ["image"], "threshold": 0.95}


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def centres() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(12345)
    return unit(rng.normal(size=(CENTRES, DIM))), unit(rng.normal(size=(1, DIM)))


def chunk(start: int, n: int) -> np.ndarray:
    """Stored rows ``start .. start + n`` (``start`` a multiple of CHUNK): the same rows every time."""
    c, shared = centres()
    rng = np.random.default_rng([7, start])
    noise = rng.standard_normal((n, DIM), dtype=np.float32) / np.sqrt(DIM)
    return unit(c[rng.integers(0, CENTRES, n)] + noise + 0.5 * shared)


def stored_batches(n: int, columns: list[str]):
    """``RunScope.stored`` of a store of ``n`` rows of one 512-d image embedding each."""
    for start in range(0, n, CHUNK):
        size = min(CHUNK, n - start)
        if not columns:   # counted, not read
            yield pa.record_batch({"id": pa.nulls(size)}).select([])
            continue
        emb = pa.FixedSizeListArray.from_arrays(pa.array(chunk(start, size).ravel()), DIM).cast(pa.list_(pa.float32()))
        cols = {"id": pa.array([f"s{start + k}" for k in range(size)]), "has_image": pa.array(np.ones(size, bool)),
                "image_emb": emb}
        yield pa.record_batch({c: cols[c] for c in columns})


def near(v: np.ndarray, cos: np.ndarray, rng) -> np.ndarray:
    u = rng.standard_normal(v.shape, dtype=np.float32)
    u = unit(u - (u * v).sum(1, keepdims=True) * v)
    return unit(cos[:, None] * v + np.sqrt(1 - cos ** 2)[:, None] * u)


def queries(n: int) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(99)
    c, shared = centres()
    x = unit(c[rng.integers(0, CENTRES, QUERIES)] + rng.standard_normal((QUERIES, DIM), dtype=np.float32) / np.sqrt(DIM)
             + 0.5 * shared)
    copies = rng.choice(QUERIES, QUERIES // 4, replace=False)
    sources = np.sort(rng.choice(n, len(copies), replace=False))
    picked = np.concatenate([chunk(s, min(CHUNK, n - s))[sources[(sources >= s) & (sources < s + CHUNK)] - s]
                             for s in range(0, n, CHUNK)])
    x[copies] = near(picked, rng.uniform(0.9, 1.0, len(copies)).astype(np.float32), rng)
    rest = np.setdiff1d(np.arange(QUERIES), copies)
    again = rng.choice(rest[rest >= BLOCK], QUERIES // 16, replace=False)   # copies of earlier new rows
    for i in again:
        j = int(rng.integers(0, i))
        x[i] = near(x[j:j + 1], np.array([rng.uniform(0.95, 1.0)], np.float32), rng)[0]
    return [f"q{k}" for k in range(QUERIES)], x


def nearest_stored(n: int, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``x``, the cosine of its nearest stored row and that row's position (brute force, float32)."""
    best, where = np.full(len(x), -np.inf, np.float32), np.zeros(len(x), np.int64)
    for start in range(0, n, CHUNK):
        sims = x @ chunk(start, min(CHUNK, n - start)).T
        top = sims.argmax(axis=1)
        better = sims[np.arange(len(x)), top] > best
        best[better], where[better] = sims[np.arange(len(x)), top][better], start + top[better]
    return best, where


def exact(n: int, ids: list[str], x: np.ndarray) -> list[str | None]:
    """The stage's rule by brute force in float32 over every stored row."""
    t = PARAMS["threshold"]
    best, where = nearest_stored(n, x)
    verdicts: list[str | None] = []
    kept = np.zeros(0, np.int64)
    for b in range(0, len(x), BLOCK):
        block = x[b:b + BLOCK]
        earlier = block @ x[kept].T if len(kept) else np.zeros((len(block), 0), np.float32)
        inside = block @ block.T
        mine: list[int] = []
        for r in range(len(block)):
            run = int(np.argmax(earlier[r])) if len(kept) else -1
            if run >= 0 and earlier[r, run] >= t and earlier[r, run] > best[b + r]:
                verdicts.append(ids[kept[run]])
            elif best[b + r] >= t:
                verdicts.append(f"s{where[b + r]}")
            else:
                j = next((j for j in mine if inside[r, j] >= t), None)
                verdicts.append(None if j is None else ids[b + j])
                if j is None:
                    mine.append(r)
        kept = np.concatenate([kept, b + np.array(mine, np.int64)])
    return verdicts


class Float32Graph:
    """The index before this change, for one modality: one hnswlib float32 graph of every row (M 16,
    ef_construction 128, resized x2 when full), candidates rechecked with their stored vectors."""

    def __init__(self, p: SemanticParams, source: StoredEmbeddings):
        import hnswlib

        self.p, self.ids, self.graph = p, [], hnswlib.Index(space="cosine", dim=DIM)
        self.graph.init_index(max_elements=1024, ef_construction=128, M=16)
        for _, q in source.blocks(p.modalities):
            self._add(q.ids, q.vectors["image"])

    def _add(self, ids: list[str], vectors: np.ndarray) -> None:
        needed = len(self.ids) + len(ids)
        if needed > self.graph.get_max_elements():
            self.graph.resize_index(max(needed, 2 * self.graph.get_max_elements()))
        self.graph.add_items(vectors, np.arange(len(self.ids), needed))
        self.ids += ids

    def check(self, ids: list[str], vectors: dict, present: dict) -> list[str | None]:
        q = semantic._Query.of(ids, vectors, present)
        t, k = self.p.limit("image"), self.p.candidates
        self.graph.set_ef(max(64, 2 * k))
        keys, dists = self.graph.knn_query(q.vectors["image"], k)
        found = {}
        for r, (ks, ds) in enumerate(zip(keys, dists)):
            for key, d in zip(ks, ds):
                if 1.0 - d >= t and self.ids[key] != ids[r]:
                    v = semantic._unit(np.asarray(self.graph.get_items([key]), np.float32))[0]
                    if float(v @ q.vectors["image"][r]) >= t:
                        found[r] = self.ids[key]
                        break
        verdicts, kept = semantic._settle(q, found, self.p)
        self._add([ids[i] for i in np.flatnonzero(kept)], q.vectors["image"][kept])
        return verdicts


# -- the vector stores considered ----------------------------------------------------------------
def _hnswlib(x: np.ndarray):
    import hnswlib

    index = hnswlib.Index(space="cosine", dim=DIM)
    index.init_index(max_elements=len(x), ef_construction=128, M=16)
    index.set_num_threads(1)
    index.add_items(x, np.arange(len(x)))
    index.set_ef(64)

    def search(q):
        keys, dists = index.knn_query(q, 10)
        return keys[:, 0].astype(np.int64), 1.0 - dists[:, 0]
    return search


def _usearch(dtype: str, scaled: bool, rescored: bool = False):
    def build(x: np.ndarray):
        from usearch.index import Index

        index = Index(ndim=DIM, metric="cos", dtype=dtype, connectivity=16, expansion_add=128, expansion_search=64)
        cast = semantic._int8 if scaled else (lambda v: v)
        for start in range(0, len(x), CHUNK):
            index.add(np.arange(start, min(start + CHUNK, len(x)), dtype=np.uint64), cast(x[start:start + CHUNK]), threads=1)

        def search(q):
            found = index.search(cast(q), 10, threads=1)
            if not rescored:
                return found.keys[:, 0].astype(np.int64), 1.0 - found.distances[:, 0]
            stored = np.stack(index.get(found.keys.ravel())).astype(np.float32).reshape(len(q), 10, DIM)
            sims = np.einsum("qd,qkd->qk", q, stored) / np.linalg.norm(stored, axis=2)
            top = sims.argmax(axis=1)
            return found.keys[np.arange(len(q)), top].astype(np.int64), sims[np.arange(len(q)), top]
        return search
    return build


def _faiss(kind: str):
    def build(x: np.ndarray):
        import faiss

        faiss.omp_set_num_threads(1)
        index = faiss.IndexHNSWSQ(DIM, getattr(faiss.ScalarQuantizer, kind), 16, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 128
        index.train(x[:20_000])
        index.add(x)
        index.hnsw.efSearch = 64

        def search(q):
            sims, keys = index.search(q, 10)
            return keys[:, 0].astype(np.int64), sims[:, 0]
        return search
    return build


LIBRARIES = {
    "hnswlib float32 (before)": _hnswlib,
    "usearch float16": _usearch("f16", scaled=False),
    "usearch int8, usearch's own cast": _usearch("i8", scaled=False),
    "usearch int8, scaled per vector": _usearch("i8", scaled=True),
    "usearch int8, scaled per vector, candidates rescored in float32 (the stage)": _usearch("i8", scaled=True, rescored=True),
    "faiss HNSW, 8-bit scalar quantizer (range per dimension)": _faiss("QT_8bit"),
    "faiss HNSW, float16 scalar quantizer": _faiss("QT_fp16"),
}


def run_library(name: str, n: int, qfile: str) -> dict:
    """One vector store over the ``n`` stored rows, queried with the checked rows: its nearest stored row and cosine."""
    q = np.load(qfile)
    x = np.concatenate([chunk(s, min(CHUNK, n - s)) for s in range(0, n, CHUNK)])
    before = rss()
    with Timer() as building:
        search = LIBRARIES[name](x)
    grown = rss() - before
    with Timer() as querying:
        keys, sims = search(q)
    return {"rss_bytes": grown, "build_s": building.seconds, "query_rows_s": len(q) / querying.seconds,
            "nearest": np.where(sims >= PARAMS["threshold"], keys, -1).tolist()}


def compare_libraries(n: int) -> None:
    ids, x = queries(n)
    best, where = nearest_stored(n, x)
    truth = np.where(best >= PARAMS["threshold"], where, -1)
    near = np.abs(best - PARAMS["threshold"])
    report = Report(f"Vector stores for the semantic dedup index: {n:,} stored 512-d rows, the {len(x):,} checked rows' "
                    "nearest stored row within cosine 0.95", ["index (HNSW M 16, ef_construction 128, ef 64, one thread)",
                    "bytes/row (RSS growth)", "build s", "query rows/s", "verdicts = exact float32", "cosines of the rows it differs on"])
    with tempfile.TemporaryDirectory() as folder:
        qfile = str(Path(folder) / "queries.npy")
        np.save(qfile, x)
        for name in LIBRARIES:
            try:
                r = in_own_process(f"lib:{name}", n, 0, qfile)
            except RuntimeError as exc:
                report.add(name, "-", "-", "-", "-", str(exc).splitlines()[-1][:80])
                continue
            got = np.array(r["nearest"])
            wrong = np.flatnonzero(got != truth)
            report.add(name, round(r["rss_bytes"] / n), r["build_s"], r["query_rows_s"], f"{len(x) - len(wrong):,} / {len(x):,}",
                       ", ".join(f"{best[i]:.5f}" for i in wrong[:6]) + (" ..." if len(wrong) > 6 else "") or "-")
    report.note(f"{int((near < 1e-3).sum())} checked rows have their nearest stored row within 1e-3 of the threshold.")
    report.print()


# -- one index, in its own process ----------------------------------------------------------
def rss(pid: int | str = "self", field_name: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) * 1024
    return 0


def read(source: StoredEmbeddings):
    """One pass over the store, each batch dropped: what the seeding's reads leave in the allocator."""
    for _ in source.blocks(PARAMS["modalities"]):
        yield None


def run_one(kind: str, n: int, shards: int, qfile: str) -> dict:
    data = np.load(qfile)
    ids, x = [f"q{k}" for k in range(len(data))], data
    p = SemanticParams.model_validate({**PARAMS, "shards": shards})
    source = StoredEmbeddings(functools.partial(stored_batches, n))
    out: dict = {"peaks": {}}
    if kind == "actors":
        import ray

        from stages.base import RunScope
        from stages.semantic import SemanticDedup, index_name

        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        idle = ray.remote(num_cpus=0)(semantic._Shard).remote(PARAMS)
        ray.get(idle.__ray_call__.remote(lambda self, source: (__import__("usearch.index"), list(read(source))), source))
        idle_rss = ray.get(idle.__ray_call__.remote(lambda self: rss()))
        scope = RunScope("bench", p, local=False, stored=source.stored)
        name = index_name("bench")
        with Timer() as seeding:
            SemanticDedup.open_run(scope)
            actor = ray.get_actor(name)
            count = ray.get(actor.shards.remote())
        check = semantic._open(name, p)
        with Timer() as checking:
            verdicts = sum((check(ids[b:b + BLOCK], {"image": x[b:b + BLOCK]}, {"image": np.ones(len(x[b:b + BLOCK]), bool)})
                            for b in range(0, len(x), BLOCK)), [])
        shard_actors = [ray.get_actor(f"{name}-shard-{k}") for k in range(count)]
        router = ray.get(actor.__ray_call__.remote(lambda self: self._router))
        looks = router.lookups(semantic._Query.of(ids, {"image": x}, {"image": np.ones(len(x), bool)}))
        out["looked_up"] = float(np.mean(np.sum([look["image"] for look in looks], axis=0)))
        out["index_bytes"] = sum(ray.get([s.nbytes.remote() for s in shard_actors]))
        out["rows"] = ray.get(actor.size.remote())
        pids = {"index actor": ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))}
        pids.update({f"shard {k}": ray.get(s.__ray_call__.remote(lambda self: os.getpid())) for k, s in enumerate(shard_actors)})
        out["rss_bytes"] = sum(rss(pids[f"shard {k}"]) - idle_rss for k in range(count))
        out["peaks"] = {label: rss(pid, "VmHWM") for label, pid in pids.items()}
        SemanticDedup.close_run(scope, failed=False)
        ray.shutdown()
    else:
        list(read(source))
        before = rss()
        with Timer() as seeding:
            index = Float32Graph(p, source) if kind == "hnswlib" else SemanticIndex(p, source, shards=max(1, shards))
        with Timer() as checking:
            verdicts = sum((index.check(ids[b:b + BLOCK], {"image": x[b:b + BLOCK]}, {"image": np.ones(len(x[b:b + BLOCK]), bool)})
                            for b in range(0, len(x), BLOCK)), [])
        out["rss_bytes"] = rss() - before
        out["index_bytes"] = index.nbytes() if kind != "hnswlib" else 0
        out["rows"] = len(index.ids) if kind == "hnswlib" else index.size()
    out["peaks"]["driver"] = rss("self", "VmHWM")
    out.update(seed_s=seeding.seconds, check_rows_s=len(x) / checking.seconds, verdicts=verdicts)
    return out


def in_own_process(kind: str, n: int, shards: int, qfile: str) -> dict:
    argv = [sys.executable, __file__, "--one", kind, "--sizes", str(n), "--shards", str(shards), "--queries", qfile]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode:
        raise RuntimeError(f"{kind} at {n} rows failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--shards", default="2,4", help="shard actor counts to measure (besides one shard in-process)")
    ap.add_argument("--indexes", default="float32,int8,actors", help="which indexes to measure")
    ap.add_argument("--libraries", type=int, default=0, help="instead: compare the vector stores at this many rows")
    ap.add_argument("--one", default="", help=argparse.SUPPRESS)
    ap.add_argument("--queries", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        one = (run_library(args.one[4:], int(args.sizes), args.queries) if args.one.startswith("lib:")
               else run_one(args.one, int(args.sizes), int(args.shards), args.queries))
        print(json.dumps(one))
        return
    if args.libraries:
        compare_libraries(args.libraries)
        return
    report = Report("Semantic dedup index: 512-d embeddings, one modality, threshold 0.95 (generated, near copies planted)",
                    ["stored rows", "index", "bytes/row (RSS growth)", "bytes/row (allocated)",
                     "peak RSS MB per process", "seed s", "check rows/s", "verdicts = exact float32",
                     "duplicates found / exact", "shards looked up per row"])
    for n in [int(s) for s in args.sizes.split(",")]:
        ids, x = queries(n)
        with Timer() as t:
            truth = exact(n, ids, x)
        report.note(f"{n:,} rows: exact float32 verdicts by brute force in {t.seconds:.0f} s; "
                    f"{sum(v is not None for v in truth):,} of {len(truth):,} checked rows are duplicates")
        with tempfile.TemporaryDirectory() as folder:
            qfile = str(Path(folder) / "queries.npy")
            np.save(qfile, x)
            runs = [("hnswlib float32, one graph in the driver (before)", "hnswlib", 1),
                    ("usearch int8, one shard in the driver", "usearch", 1)]
            runs += [(f"usearch int8, {s} shard actors + index actor", "actors", s) for s in map(int, args.shards.split(","))]
            for label, kind, shards in runs:
                if {"hnswlib": "float32", "usearch": "int8"}.get(kind, kind) not in args.indexes.split(","):
                    continue
                r = in_own_process(kind, n, shards, qfile)
                same = sum(a == b for a, b in zip(r["verdicts"], truth))
                found = sum(v is not None for v in r["verdicts"])
                peaks = ", ".join(f"{k} {v / MB:,.0f}" for k, v in r["peaks"].items())
                report.add(f"{n:,}", label, round(r["rss_bytes"] / r["rows"]),
                           round(r["index_bytes"] / r["rows"]) if r["index_bytes"] else "-",
                           peaks, r["seed_s"], r["check_rows_s"], f"{same:,} / {len(truth):,}",
                           f"{found:,} / {sum(v is not None for v in truth):,}",
                           f"{r['looked_up']:.2f} of {shards}" if "looked_up" in r else "-")
                print(f"{time.strftime('%H:%M:%S')} {n:,} {label}: seed {r['seed_s']:.0f} s, "
                      f"{same}/{len(truth)} verdicts as exact", file=sys.stderr, flush=True)
    report.note("Seed seconds include making the synthetic chunks each time the store is read: once for the one-"
                "process indexes; for the shard actors once to count, once to sample the k-means vectors, and once per "
                "shard (in parallel); the shard actors' seconds also include starting them.")
    report.note("Shard actors' RSS growth: their RSS after the checks less that of an idle shard actor that loaded the "
                "same libraries and read the store once.")
    report.print()


if __name__ == "__main__":
    main()
