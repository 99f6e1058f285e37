"""Feature extraction throughput: the feature stages on a Ray Data actor pool (the pipeline's own
``build_dataset``) vs a plain single-process loop over the same rows and encoders.

Input: demo rows already through ingest + cleanup (done once, untimed), repeated to each size in
``--rows``: the small size shows fixed costs (actor start-up), the large one steady-state throughput.
Timers: pipeline = ``build_dataset`` + iterating every output batch (object-store put, actor
start-up and model loads included; ``ray.init`` excluded; the output rows carry the features, not
the media bytes, as ``run()``'s do when its actors write the shards); baseline = a fresh process from its
start (the rows arrive as a pickle): imports, stage construction (model loads) and the stages over
the same batches; it pays its imports as the actors pay theirs.

CPU (default): the demo's weight-free encoders (hist / hashed / logmel), issue 4 target >= 1.6x.
``--gpu``: a resnet50 with random weights (torchvision, saved to a .pth) on a GPU actor fed by CPU
preprocessing actors; reports rows/s and the ratio to the model's bare forward pass on that GPU.

Run: .venv/bin/python benchmarks/bench_features.py [--rows 6000,30000] [--unique 400] [--gpu]
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, THREADINGS, Report, Timer, cpu_count, demo_data, gpu_name, pipeline_config, ratio, start_ray, verdict, work_dir

TARGET = 1.6


def cleaned_rows(n_unique: int, batch_size: int) -> list[dict]:
    """Demo rows through ingest + cleanup in this process: the live ones."""
    from baseline import plain_pipeline, to_rows

    cfg = pipeline_config(demo_data(n_unique), work_dir("features-clean"), batch_size=batch_size)
    loop, _ = plain_pipeline(cfg, upto="dedup", keep=True)
    return [r for b in loop.batches for r in to_rows(b) if not r["reject_reason"]]


def repeated(live: list[dict], total: int) -> list[dict]:
    """``live`` repeated up to ``total`` rows, each with its own id."""
    return [dict(live[k % len(live)], id=f"{live[k % len(live)]['id']}-{k}") for k in range(total)]


def feature_config(args, weights: str | None):
    extra = {}
    if weights:   # GPU: a pretrained-size image backbone; CPU prep actors feed one GPU actor
        extra = {"stages.features": {"image": {
            "encoder": "torchvision",
            "params": {"arch": "resnet50", "weights": weights, "batch_size": args.gpu_batch},
            "resources": {"num_gpus": 1, "num_cpus": 1, "concurrency": 1, "batch_size": args.gpu_batch * 4}}}}
    return pipeline_config(demo_data(args.unique), work_dir("features-store"), batch_size=args.batch_size,
                           extra=extra)


def feature_specs(cfg, num_cpus: int):
    from pipeline.plan import resolve_stages

    return [s for s in resolve_stages(cfg, num_cpus) if s.name.startswith("features.")]


def plain_loop(specs, live: list[dict], total: int, batch_size: int) -> dict[str, float]:
    """The feature stages over ``total`` rows (``live`` repeated) in a fresh process, timed from
    that process's start: it pays its imports and model loads as the actors pay theirs. Once per
    threading of its libraries (rows/s for each)."""
    job = work_dir("features-plain") / "job.pkl"
    job.write_bytes(pickle.dumps(([(s.name, s.params) for s in specs], live, total, batch_size)))

    def once(env: dict) -> float:
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_features.py"), "--plain-loop", str(job)],
                              check=True, capture_output=True, text=True, cwd=ROOT, env=os.environ | env)
        return json.loads(proc.stdout.strip().splitlines()[-1])["rows_per_s"]

    return {name: once(env) for name, env in THREADINGS.items()}


def plain_loop_main(job: str) -> None:
    from baseline import process_start, run_stages
    from stages.base import StageContext, match_library_threads
    from stages.registry import get_stage

    start = process_start()
    match_library_threads()
    specs, live, total, batch_size = pickle.loads(Path(job).read_bytes())
    rows = repeated(live, total)
    stages = [get_stage(name)(params, StageContext()) for name, params in specs]
    result = run_stages(stages, rows, batch_size)
    print(json.dumps({"rows_per_s": result.rows / (time.time() - start)}))


def pipeline_pass(cfg, specs, rows: list[dict], num_cpus: int) -> float:
    from pipeline.execution import build_dataset, iter_output
    from stages.base import StageContext, num_rows

    with Timer() as t:
        # The features come back, the media stay in the actors: as in ``run()``, whose last actor
        # pool writes the shards and sends the driver embeddings, not media bytes.
        ds = build_dataset(rows, specs, StageContext(), cfg, num_cpus, drop_media=True)
        n = sum(num_rows(b) for b in iter_output(ds))
    assert n == len(rows), (n, len(rows))
    return n / t.seconds


def bare_forward(weights: str, batch: int, seconds: float = 10.0) -> float:
    """resnet50 forward passes on the GPU alone (input already on the device, bf16 autocast)."""
    import torch

    from stages.features.image import TorchvisionImageEncoder

    enc = TorchvisionImageEncoder({"arch": "resnet50", "weights": weights, "batch_size": batch})
    x = torch.randn(batch, 3, 224, 224, device=enc.device)
    done, start = 0, None
    with torch.inference_mode(), enc.autocast():
        for k in range(10_000):
            if k == 3:   # after warm-up (cuDNN autotune, allocator)
                torch.cuda.synchronize()
                start = time.perf_counter()
            enc.model(x)
            if start is not None:
                done += batch
                if time.perf_counter() - start > seconds:
                    break
        torch.cuda.synchronize()
    return done / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="6000,30000", help="rows through the feature stages (comma-separated sizes)")
    ap.add_argument("--unique", type=int, default=400, help="distinct demo rows cleaned, then repeated")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=2, help="rounds (every variant once each); the median ratio counts")
    ap.add_argument("--gpu", action="store_true", help="resnet50 (random weights) on GPU actors")
    ap.add_argument("--gpu-batch", type=int, default=128)
    ap.add_argument("--plain-loop", metavar="JOB", help=argparse.SUPPRESS)   # the baseline's own process
    args = ap.parse_args()
    if args.plain_loop:
        return plain_loop_main(args.plain_loop)

    cpus = cpu_count()
    weights = None
    if args.gpu:
        import torch
        import torchvision

        if not torch.cuda.is_available():
            raise SystemExit("--gpu needs a CUDA GPU; none is visible")
        weights = str(work_dir("features-weights") / "resnet50-random.pth")
        torch.save(torchvision.models.resnet50(weights=None).state_dict(), weights)

    sizes = [int(n) for n in args.rows.split(",")]
    live = cleaned_rows(args.unique, args.batch_size)
    cfg = feature_config(args, weights)
    specs = feature_specs(cfg, cpus)
    title = "resnet50 (random weights) on GPU" if args.gpu else "weight-free encoders hist / hashed / logmel"
    report = Report(f"Feature extraction (pre-cleaned rows, {title}; stages {', '.join(s.name for s in specs)})",
                    ["rows", "round", "run", "rows/s", "vs plain loop"])
    import ray   # here, not at the top: the plain loop's process runs this file and times its imports

    for n in sizes:
        ratios = []
        for k in range(1, args.repeat + 1):   # a round: every variant once, close together in time
            ray.shutdown()                     # no Ray on the machine while the plain loops run
            bases = plain_loop(specs, live, n, args.batch_size)
            start_ray(cpus)
            piped = pipeline_pass(cfg, specs, repeated(live, n), cpus)
            base = max(bases.values())   # the faster threading counts
            for name, rps in bases.items():
                report.add(n, k, f"plain single-process loop, {name} (fresh process, imports timed)", rps,
                           f"{ratio(rps, base):.2f}")
            ratios.append(ratio(piped, base))
            report.add(n, k, f"Ray Data actor pool ({cpus} CPUs{', ' + gpu_name() if args.gpu else ''})", piped,
                       f"{ratios[-1]:.2f}")
        med = statistics.median(ratios)
        report.note(f"pipeline / faster plain loop at {n} rows, median over rounds: **{med:.2f}x** (rounds: "
                    f"{', '.join(f'{x:.2f}x' for x in ratios)}) — "
                    + (verdict(med, TARGET) if not args.gpu else "GPU run"))
    if args.gpu:
        bare = bare_forward(weights, args.gpu_batch)
        report.add("-", f"bare resnet50 forward on the GPU (batch {args.gpu_batch}, bf16)", bare, "-")
        report.note(f"pipeline / bare forward at {sizes[-1]} rows: **{ratio(piped, bare):.2f}** of the model's "
                    "throughput")
    report.note("timer: pipeline = build_dataset + iterating the output (actor start-up and model loads "
                "included; Ray and its service actors started before); plain loop = a fresh process from its "
                "start: unpickling the rows, imports, stage construction (model loads), stages, run with its "
                "libraries' default threads and with 1 thread (as the actors), the faster counting; ratios are "
                "taken within a round (the host's speed drifts over minutes); on 2 cores two "
                "single-threaded copies of a loop reach only 1.5-2.0x one (see the pipeline section)")
    report.print()


if __name__ == "__main__":
    main()
