"""The vector index behind ``mmpipe search``: build time, query throughput and recall@10 against
exact search, at 100k vectors, for hnswlib (what mmpipe uses), usearch and FAISS (HNSW, same graph
degree and search breadth); the baseline is exact search (a numpy matrix product over every
vector, in blocks of queries) measured in the same run. Then the alignment heads' training time on
a synthetic store of the same dimensions (local engine, one process).

Vectors: 128-d, unit length, 200 clusters (as class-structured embeddings are); queries are
perturbed stored vectors. Each library builds with connectivity 16 / ef_construction 128 and
searches with ef 64, one thread per process where the library lets us (the pipeline's actors
have one CPU each).

Run: .venv/bin/python benchmarks/bench_index.py [--n 100000] [--queries 2000]
(`make bench` installs usearch and faiss-cpu; a missing one is reported as such.)
"""
from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np

from common import Report, Timer, ratio

DIM, K, M, EF_ADD, EF_SEARCH = 128, 10, 16, 128, 64


def clustered(n: int, q: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(200, DIM)).astype(np.float32)
    x = centres[rng.integers(0, 200, n)] + 0.5 * rng.normal(size=(n, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    queries = x[rng.choice(n, q, replace=False)] + 0.05 * rng.normal(size=(q, DIM)).astype(np.float32)
    return x, queries / np.linalg.norm(queries, axis=1, keepdims=True)


def exact(x: np.ndarray, queries: np.ndarray) -> np.ndarray:
    out = []
    for start in range(0, len(queries), 256):
        sims = queries[start:start + 256] @ x.T
        top = np.argpartition(-sims, K, axis=1)[:, :K]
        order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1)
        out.append(np.take_along_axis(top, order, axis=1))
    return np.concatenate(out)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / K for a, b in zip(found, truth)]))


def with_usearch(x, queries):
    from usearch.index import Index

    index = Index(ndim=DIM, metric="cos", dtype="f32", connectivity=M, expansion_add=EF_ADD, expansion_search=EF_SEARCH)
    with Timer() as build:
        index.add(np.arange(len(x), dtype=np.uint64), x, threads=1)
    with Timer() as query:
        found = index.search(queries, K, threads=1).keys
    return build.seconds, query.seconds, found


def with_hnswlib(x, queries):
    import hnswlib

    index = hnswlib.Index(space="cosine", dim=DIM)
    index.init_index(max_elements=len(x), ef_construction=EF_ADD, M=M)
    index.set_num_threads(1)
    with Timer() as build:
        index.add_items(x, np.arange(len(x)))
    index.set_ef(EF_SEARCH)
    with Timer() as query:
        found, _ = index.knn_query(queries, K)
    return build.seconds, query.seconds, found


def with_faiss(x, queries):
    import faiss

    faiss.omp_set_num_threads(1)
    hnsw = faiss.IndexHNSWFlat(DIM, M, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = EF_ADD
    index = faiss.IndexIDMap2(hnsw)
    with Timer() as build:
        index.add_with_ids(x, np.arange(len(x), dtype=np.int64))
    hnsw.hnsw.efSearch = EF_SEARCH
    with Timer() as query:
        _, found = index.search(queries, K)
    return build.seconds, query.seconds, found


LIBRARIES = {"hnswlib (mmpipe)": with_hnswlib, "usearch": with_usearch, "faiss HNSWFlat": with_faiss}


def align_time(n: int) -> tuple[float, int, dict]:
    """Seconds to align three modalities on a synthetic store of ``n`` rows (local engine)."""
    from core.config import Config
    from tests.training.conftest import write_store
    from tests.training.test_align import paired_features
    from training.align import align

    with tempfile.TemporaryDirectory() as folder:
        store = write_store(folder, paired_features(n))
        cfg = Config.model_validate({"training": {"engine": "local"}, "align": {"epochs": 10, "patience": 10}})
        with Timer() as t:
            result = align(cfg, store)
    return t.seconds, len(result.metrics["history"]), result.metrics["retrieval"]["image->text"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--align-rows", type=int, default=20_000)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    x, queries = clustered(args.n, args.queries)
    with Timer() as t:
        truth = exact(x, queries)
    exact_qps = args.queries / t.seconds
    report = Report(f"Vector index at {args.n:,} vectors ({DIM}-d, cosine), {args.queries:,} queries, k={K}",
                    ["index", "build s", "build vectors/s", "queries/s", "x exact", "recall@10"])
    report.add("exact (numpy, baseline)", 0.0, "-", exact_qps, 1.0, 1.0)
    for name, fn in LIBRARIES.items():
        try:
            build, query, found = fn(x, queries)
        except ImportError as exc:
            report.note(f"{name}: not installed ({exc.name}); `make bench` installs it")
            continue
        qps = args.queries / query
        report.add(name, build, args.n / build, qps, ratio(qps, exact_qps), recall(np.asarray(found), truth))
    seconds, epochs, pair = align_time(args.align_rows)
    report.note(f"alignment heads, {args.align_rows:,} rows x 3 modalities (24/32/16-d), {epochs} epochs, local "
                f"engine: {seconds:.1f} s; image->text recall@1 {pair['recall@1']:.3f}, recall@10 {pair['recall@10']:.3f} "
                f"over {pair['candidates']:,} test candidates")
    report.print()


if __name__ == "__main__":
    main()
