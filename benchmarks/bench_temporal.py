"""Epoch time of the fusion models with temporal branches over stored sequences vs pooled vectors.

Data: a features table made in memory with the shapes the demo's encoders store: audio `logmel`
(180-d pooled, a 16 x 84 sequence with `sequence: 16`), video `framestats` (243-d pooled, 8 x 108
with `sequence: 8`) and text `hashed` (1024-d pooled); random values, four classes. Each variant
trains ``--epochs`` epochs with the local engine (the same epoch loop Ray Train workers run) on one
CPU thread; the table gives seconds per epoch (the median epoch) and the ratio to pooled.

Run: .venv/bin/python benchmarks/bench_temporal.py [--rows 20000] [--epochs 3]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import pyarrow as pa

from common import Report

SHAPES = {"audio": (180, (16, 84)), "video": (243, (8, 108)), "text": (1024, None)}


def table(rows: int) -> pa.Table:
    rng = np.random.default_rng(0)
    cols = {"id": [f"r{i}" for i in range(rows)], "label": [f"c{i % 4}" for i in range(rows)],
            "split": rng.choice(["train", "val", "test"], rows, p=[0.8, 0.1, 0.1]).tolist(), "aug": [0] * rows}
    for m, (dim, seq) in SHAPES.items():
        cols[f"has_{m}"] = [True] * rows
        cols[f"{m}_emb"] = pa.array(list(rng.normal(size=(rows, dim)).astype(np.float32)), pa.list_(pa.float32()))
        if seq:
            frames, width = seq
            values = rng.normal(size=(rows, frames, width)).astype(np.float32)
            cols[f"{m}_seq"] = pa.array([v.tolist() for v in values], pa.list_(pa.list_(pa.float32())))
            cols[f"{m}_seq_len"] = pa.array(rng.integers(1, frames + 1, rows).astype(np.int32))
    return pa.table(cols)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    import torch

    from core.config import TrainingConfig
    from training.data import prepare
    from training.loop import fit_local

    torch.set_num_threads(1)
    data_table = table(args.rows)
    report = Report(f"Temporal branches: seconds per epoch, {args.rows} rows (audio 16x84, video 8x108 sequences), "
                    "1 CPU thread", ["fusion", "branches", "s / epoch", "vs pooled", "params"])
    # untimed: the first fit in a process pays torch's one-time costs (kernels, allocator)
    fit_local(prepare(data_table, ["text", "audio", "video"]), TrainingConfig(epochs=1, engine="local"), "concat")
    for fusion in ("concat", "attention"):
        base = None
        for kind in ("pooled", "gru", "lstm", "cnn", "transformer"):
            branches = {} if kind == "pooled" else {"audio": kind, "video": kind}
            data = prepare(data_table, ["text", "audio", "video"], branches=branches)
            tc = TrainingConfig(epochs=args.epochs, patience=args.epochs, branches=branches, engine="local")
            times = []
            start = time.perf_counter()

            def on_epoch(state, stats, times=times):
                nonlocal start
                times.append(time.perf_counter() - start)
                start = time.perf_counter()

            state = fit_local(data, tc, fusion, on_epoch=on_epoch)
            per_epoch = statistics.median(times)
            base = base or per_epoch
            params = sum(p.numel() for p in state.net.parameters())
            report.add(fusion, kind if branches else "pooled (all)", per_epoch, per_epoch / base, f"{params:,}")
    report.print()


if __name__ == "__main__":
    main()
