"""The dedup index's memory and speed on synthetic stored signatures, at 100k and 1M rows.

Per size: bytes per indexed row (the index's arrays, capacity included, and how much this
process's RSS grew while seeding), seconds to seed the index from stored ``dedup_sig`` strings
(streamed in record batches, as the index actors read the store), and checks per second (blocks
of 512 new rows, a tenth of them near copies of stored rows). Baseline, measured in the same run
up to ``--baseline-max`` rows: the stored signatures parsed into one ``Signature`` object per row,
the least an index of Python objects holds.

Rows: 32-hex ids (ingest's default), an image (pHash) and a text (128-value MinHash) each, a
quarter with audio too. Target: bytes per row well under 1 KB.

Run: .venv/bin/python benchmarks/bench_dedup_index.py [--sizes 100000,1000000] [--baseline-max 100000]
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import os
from typing import Iterator

import numpy as np
import pyarrow as pa

from common import Report, Timer, ratio, verdict

from stages.dedup import DedupIndex, DedupParams, Signature, StoredSignatures

CHUNK = 10_000
TARGET = 1024


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def signatures(start: int, n: int, seed: int) -> Iterator[Signature]:
    """Rows ``start .. start + n`` of the synthetic store (the same rows for the same seed)."""
    rng = np.random.default_rng([seed, start])
    phash = rng.integers(0, 2**63, n, dtype=np.uint64)
    minhash = rng.integers(0, 2**32, (n, 128), dtype=np.uint32)
    for k in range(n):
        row = start + k
        hashes = {"image": sha(f"i{seed}.{row}"), "text": sha(f"t{seed}.{row}")}
        if row % 4 == 0:
            hashes["audio"] = sha(f"a{seed}.{row}")
        hashes["sample"] = sha(str(sorted(hashes.items())))
        yield Signature(sha(f"id{seed}.{row}")[:32], hashes, f"{int(phash[k]):016x}", minhash[k].tolist())


def stored(n: int, seed: int = 0) -> StoredSignatures:
    """The synthetic store as ``RunScope.stored`` gives it: record batches made as they are read."""

    def batches(columns: list[str]) -> Iterator[pa.RecordBatch]:
        for start in range(0, n, CHUNK):
            size = min(CHUNK, n - start)
            if not columns:   # counted, not read
                yield pa.record_batch({"id": pa.nulls(size)}).select([])
                continue
            sigs = list(signatures(start, size, seed))
            cols = {"id": pa.array([s.id for s in sigs]), "dedup_sig": pa.array([s.to_json() for s in sigs])}
            yield pa.record_batch({c: cols[c] for c in columns})

    return StoredSignatures(batches)


def new_blocks(n: int, blocks: int, stored_rows: int) -> list[list[Signature]]:
    """Blocks of ``n`` new rows; a tenth are stored rows (of the first chunk) with 3 MinHash values
    and 2 pHash bits changed: near duplicates."""
    rng = np.random.default_rng(1)
    originals = list(signatures(0, min(CHUNK, stored_rows), seed=0))
    out = []
    for b in range(blocks):
        block = list(signatures(10**9 + b * n, n, seed=1))
        for k in range(0, n, 10):
            copy = originals[int(rng.integers(0, len(originals)))]
            values = list(copy.text_minhash)
            for pos in rng.choice(128, 3, replace=False):
                values[pos] = int(rng.integers(0, 2**32))
            sha = {**copy.sha, "sample": block[k].sha["sample"], "text": block[k].sha["text"]}
            block[k] = Signature(block[k].id, sha, f"{int(copy.image_phash, 16) ^ 0b101:016x}", values)
        out.append(block)
    return out


def baseline_bytes(n: int) -> float:
    """RSS growth per row of a dict id -> parsed ``Signature``."""
    gc.collect()
    before = rss()
    held = {row_id: Signature.from_json(row_id, sig) for _, row_id, sig in stored(n).rows()}
    gc.collect()
    grown = rss() - before
    assert len(held) == n
    del held
    return grown / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--baseline-max", type=int, default=100_000)
    ap.add_argument("--blocks", type=int, default=20, help="blocks of 512 new rows checked per size")
    args = ap.parse_args()
    report = Report("Dedup index: bytes per stored row, seeding and checks (synthetic signatures)",
                    ["stored rows", "index", "bytes/row (arrays)", "bytes/row (RSS growth)", "seed s",
                     "seed rows/s", "check rows/s", "duplicates found", "vs baseline (bytes)"])
    p = DedupParams()
    for n in [int(s) for s in args.sizes.split(",")]:
        base = baseline_bytes(n) if n <= args.baseline_max else float("nan")
        if n <= args.baseline_max:
            report.add(f"{n:,}", "baseline: a Signature object per row", "-", round(base), "-", "-", "-", "-", 1.0)
        blocks = new_blocks(512, args.blocks, n)
        gc.collect()
        before = rss()
        with Timer() as seeding:
            index = DedupIndex(p, stored(n))
        gc.collect()
        grown, arrays = (rss() - before) / index.size(), index.nbytes() / index.size()
        with Timer() as checking:
            found = sum(v is not None for block in blocks for v in index.check(block))
        checked, copies = sum(len(b) for b in blocks), len(range(0, 512, 10)) * len(blocks)   # near copies put in
        report.add(f"{n:,}", "compact arrays (one shard)", round(arrays), round(grown),
                   seeding.seconds, n / seeding.seconds, checked / checking.seconds, f"{found}/{copies}",
                   ratio(base, arrays) if base == base else "-")
        report.note(f"{n:,} rows: {verdict(arrays, TARGET, higher_is_better=False)} for the arrays' bytes per row; "
                    f"{index.nbytes() / index.size():.0f} after the checks added {checked - found:,} rows")
        del index
    report.note("RSS growth includes what seeding leaves in the allocator (parsed batches freed but not "
                "returned to the OS) or reuses from the baseline's; the arrays' figure is the index itself, spare "
                "capacity included, and the one compared with the baseline.")
    report.note("Seed seconds include making the synthetic batches (a sha256 per hash and a to_json per row); "
                "check rows/s include packing the signatures, which the stage's actors do in a run.")
    report.print()


if __name__ == "__main__":
    main()
