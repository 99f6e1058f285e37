"""Throughput of augment.{image,text,audio} on generated data, in one process.

Baseline: a plain decode -> encode round trip of the same values (the floor every augmenter
pays); the ratio says how much the ops themselves cost. Run: .venv/bin/python benchmarks/bench_augment.py
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from stages.augment.audio import AudioAugmenter
from stages.augment.base import ModalityAugmenter
from stages.augment.copies import AugmentCopies
from stages.augment.image import ImageAugmenter, resolve_device
from stages.augment.text import TextAugmenter
from stages.base import StageContext, object_column
from stages.media import encode_flac, encode_image

WORDS = ("the quick brown fox jumps over lazy dog happy child walks along quiet river bank under "
         "bright summer sky while old man reads small book near wooden bridge and green garden").split()


@dataclass
class Row:
    modality: str
    rows: int
    baseline: float
    default: float
    every_op: float


def make_values(modality: str, n: int, rng: np.random.Generator) -> list:
    if modality == "image":
        return [encode_image(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8), "jpg") for _ in range(n)]
    if modality == "text":
        return [" ".join(rng.choice(WORDS, size=int(rng.integers(20, 40)))) + "." for _ in range(n)]
    sr = 16000
    t = np.arange(2 * sr) / sr
    return [encode_flac((0.3 * np.sin(2 * np.pi * rng.uniform(100, 800) * t)).astype(np.float32), sr)
            for _ in range(n)]


def make_batch(modality: str, values: list) -> dict[str, np.ndarray]:
    """Train originals expanded to one copy each, so every measured row is augmented."""
    n = len(values)
    col = lambda v: object_column([v] * n)  # noqa: E731
    batch = {"id": object_column([f"b{i}" for i in range(n)]), "split": col("train"),
             "aug": np.zeros(n, np.int32), "aug_params": col("{}"), "redo": col(modality),
             "reject_stage": col(""), "reject_reason": col(""), "reject_detail": col(""),
             modality: object_column(values)}
    out = AugmentCopies({"copies": 1})(batch)
    keep = out["aug"] == 1
    return {k: v[keep] for k, v in out.items()}


def rows_per_s(fn: Callable[[], object], n: int) -> float:
    start = time.perf_counter()
    fn()
    return n / (time.perf_counter() - start)


def bench(cls: type[ModalityAugmenter], values: list) -> Row:
    m, n = cls.modality, len(values)
    every = {op: {"p": 1.0} for op in cls.OPS}
    stages = {"default": cls({}, StageContext(seed=0)), "every_op": cls(every, StageContext(seed=0))}
    for stage in stages.values():                     # warm-up: lazy imports, JIT, caches
        stage(make_batch(m, values[:2]))
    p = stages["default"].params
    baseline = rows_per_s(lambda: [cls.encode(cls.decode(v, p), v, p) for v in values], n)
    speeds = {name: rows_per_s(lambda s=s: s(make_batch(m, values)), n) for name, s in stages.items()}
    return Row(m, n, baseline, speeds["default"], speeds["every_op"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--texts", type=int, default=200)
    ap.add_argument("--clips", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 1 is what a Ray actor with num_cpus=1 gets (OMP_NUM_THREADS=1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    table = [bench(ImageAugmenter, make_values("image", args.images, rng)),
             bench(TextAugmenter, make_values("text", args.texts, rng)),
             bench(AudioAugmenter, make_values("audio", args.clips, rng))]
    print(f"image device: {resolve_device('auto')}, torch threads: {torch.get_num_threads()}\n")
    print("| modality | rows | baseline decode+encode rows/s | default policy rows/s | every op (p=1) rows/s "
          "| default / baseline |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in table:
        print(f"| {r.modality} | {r.rows} | {r.baseline:.0f} | {r.default:.0f} | {r.every_op:.0f} "
              f"| {r.default / r.baseline:.2f} |")


if __name__ == "__main__":
    main()
