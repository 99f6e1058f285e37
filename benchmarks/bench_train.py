"""Training epoch time: the Ray Train DDP job (``--workers`` workers) vs a plain single-process
PyTorch loop, both running ``training.loop.run_epoch`` over the same features.

Features: synthetic, with the demo encoders' widths (image 108, text 1024, audio 180), a class
signal, and ~10 % of each modality missing. Per-epoch time covers training plus the rank-0
validation pass; the first epoch (warm-up) is reported apart. The Ray job's total also includes
worker-group start-up and the dataset's shuffle.

Run: .venv/bin/python benchmarks/bench_train.py [--rows 20000] [--epochs 4] [--workers 2]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np

from common import Report, Timer, cpu_count, ratio, start_ray, work_dir

DIMS = {"image": 108, "text": 1024, "audio": 180}
CLASSES = ["city", "desert", "forest", "ocean"]


def synthetic(rows: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, len(CLASSES), rows)
    out = {"label_idx": y.astype(np.int64)}
    for m, d in DIMS.items():
        centres = rng.normal(0, 1, (len(CLASSES), d)).astype(np.float32)
        mask = (rng.random(rows) > 0.1).astype(np.float32)
        out[f"{m}_emb"] = (centres[y] * 0.3 + rng.normal(0, 1, (rows, d)).astype(np.float32)) * mask[:, None]
        out[f"{m}_mask"] = mask
    return out


def training_data(rows: int):
    from training.data import TrainingData

    val = synthetic(max(rows // 10, 100), 1)
    return TrainingData(CLASSES, list(DIMS), dict(DIMS), synthetic(rows, 0), val, val)


def local_epochs(data, tc) -> list[float]:
    """The plain loop: what ``training.loop.fit_local`` does, with each epoch timed."""
    from training.data import iterate, n_rows
    from training.loop import TrainState, class_weights, model_spec, run_epoch, seed_everything

    seed_everything(tc.seed)
    state = TrainState(model_spec(data, tc, tc.fusion), tc, math.ceil(n_rows(data.train) / tc.batch_size),
                       class_weights(data, tc.class_weights), __import__("torch").device("cpu"))
    times = []
    for epoch in range(tc.epochs):
        start = time.perf_counter()
        run_epoch(state, iterate(data.train, tc.batch_size, shuffle_seed=tc.seed + epoch), data.val)
        times.append(time.perf_counter() - start)
    return times


def timed_train_loop(config: dict) -> None:
    """``training.train.ray_train_loop`` without checkpoints or early stopping, each epoch timed."""
    import ray.train
    import ray.train.torch
    import torch

    from core.config import TrainingConfig
    from training.loop import ModelSpec, TorchCollective, TrainState, run_epoch, seed_everything

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    tc = TrainingConfig(**config["training"])
    seed_everything(tc.seed + rank)
    device = ray.train.torch.get_device()
    state = TrainState(ModelSpec(**config["spec"]), tc, config["steps_per_epoch"], config["weights"], device,
                       wrap=ray.train.torch.prepare_model)
    comm = TorchCollective(device)
    shard = ray.train.get_dataset_shard("train")
    times = []
    for _ in range(tc.epochs):
        start = time.perf_counter()
        run_epoch(state, shard.iter_torch_batches(batch_size=tc.batch_size), config["val"], comm)
        times.append(time.perf_counter() - start)
        ray.train.report({"epoch_s": times[-1]})
    if rank == 0:
        Path(config["out"]).write_text(json.dumps({"epochs": times, "threads": torch.get_num_threads()}))


def ray_epochs(data, tc, out: Path) -> tuple[list[float], float, int]:
    import ray.train
    from ray.train.torch import TorchTrainer

    from training.data import n_rows, train_dataset
    from training.loop import class_weights, model_spec

    per_worker = math.ceil(n_rows(data.train) // tc.num_workers / tc.batch_size)
    trainer = TorchTrainer(
        timed_train_loop,
        train_loop_config={"training": tc.model_dump(), "spec": model_spec(data, tc, tc.fusion).to_dict(),
                           "val": data.val, "weights": class_weights(data, tc.class_weights),
                           "steps_per_epoch": max(per_worker, 1), "out": str(out)},
        scaling_config=ray.train.ScalingConfig(num_workers=tc.num_workers,
                                               resources_per_worker={"CPU": tc.cpus_per_worker}),
        datasets={"train": train_dataset(data.train, tc.seed)},
        run_config=ray.train.RunConfig(name="bench", storage_path=str(out.parent / "ray")),
    )
    with Timer() as t:
        trainer.fit()
    result = json.loads(out.read_text())
    return result["epochs"], t.seconds, result["threads"]


def summary(times: list[float]) -> tuple[float, float]:
    """(first epoch, median of the rest)."""
    return times[0], statistics.median(times[1:]) if len(times) > 1 else times[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=20000, help="training rows (validation: a tenth)")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--fusion", default="attention")
    ap.add_argument("--cpus-per-worker", type=float, default=0.5,
                    help="below 1 leaves CPU to Ray Data's shuffle on a small machine")
    args = ap.parse_args()
    import torch

    from core.config import TrainingConfig

    data = training_data(args.rows)
    tc = TrainingConfig(fusion=args.fusion, epochs=args.epochs, num_workers=args.workers,
                        cpus_per_worker=args.cpus_per_worker, patience=args.epochs + 1)
    with Timer() as local_total:
        local = local_epochs(data, tc)
    local_threads = torch.get_num_threads()
    start_ray(cpu_count())
    remote, ray_total, ray_threads = ray_epochs(data, tc, work_dir("train") / "epochs.json")

    lf, lm = summary(local)
    rf, rm = summary(remote)
    report = Report(f"Training epoch time ({args.rows} rows, fusion {args.fusion}, batch {tc.batch_size}, "
                    f"{args.epochs} epochs)",
                    ["engine", "first epoch s", "median later epoch s", "rows/s (later epochs)", "total s",
                     "vs plain loop (epoch time)"])
    report.add(f"plain single-process loop (torch threads {local_threads})", lf, lm, args.rows / lm,
               local_total.seconds, "1.00")
    report.add(f"Ray Train DDP, {args.workers} workers x {args.cpus_per_worker} CPU (torch threads "
               f"{ray_threads} each; total incl. start-up)", rf, rm, args.rows / rm, ray_total, f"{ratio(rm, lm):.2f}")
    report.note(f"epoch time Ray Train / plain loop: **{ratio(rm, lm):.2f}x** (below 1 = Ray faster); "
                f"speed-up {ratio(lm, rm):.2f}x")
    report.print()


if __name__ == "__main__":
    main()
