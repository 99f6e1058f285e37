"""End-to-end pipeline throughput vs a plain single-process loop over the same stage classes, at
one or more dataset sizes, and scaling from 1 CPU to all CPUs.

Timers:
- pipeline: all of ``pipeline.runner.run`` (scan, planning, actor start-up with the actors' imports
  and model loads, processing, sinks, Delta commits) in a warm driver: Ray is running with Ray
  Data's service actors up, and the driver has made one small run before (as a cluster that has
  run a job, or a long-lived driver). Ray start-up is not timed.
- baseline: ``benchmarks/baseline.py`` in a fresh process, from before its first import of mmpipe
  to the end: imports (as the actors pay theirs), scan (read + hash), stage construction, every
  stage over the same batches, and the same outputs (shards through the pipeline's sink, the
  features table in one Delta write; no rejects table, no run record).
Each side runs ``--repeat`` times and the fastest run counts: identical runs on a shared machine
vary by up to 30 %.

Run: .venv/bin/python benchmarks/bench_pipeline.py [--n 3000,10000] [--batch-size 32] [--no-scaling]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import (ROOT, Report, Timer, cpu_count, demo_data, pipeline_config, ratio, start_ray, verdict,
                    warm_driver, work_dir)

TARGET = 1.6


def _baseline_cmd(manifest: Path, batch_size: int, work: str) -> list[str]:
    return [sys.executable, str(ROOT / "benchmarks" / "baseline.py"), str(manifest), "--batch-size", str(batch_size),
            "--work", work]


def baseline(manifest: Path, batch_size: int) -> dict:
    out = subprocess.run(_baseline_cmd(manifest, batch_size, "pipeline-baseline"), check=True, capture_output=True,
                         text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def ceiling(manifest: Path, batch_size: int, copies: int) -> tuple[float, float]:
    """What this machine gives ``copies`` single-threaded processes doing this work at once: the
    plain loop alone, then ``copies`` of it side by side (threads of numpy, OpenCV etc. set to 1, as
    in the pipeline's 1-CPU actors). Returns (seconds alone, slowest seconds side by side)."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def launch(k: int) -> subprocess.Popen:
        return subprocess.Popen(_baseline_cmd(manifest, batch_size, f"ceiling-{k}"), stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True, cwd=ROOT, env=env)

    def wall(proc: subprocess.Popen) -> float:
        return json.loads(proc.communicate()[0].strip().splitlines()[-1])["wall_s"]

    alone = wall(launch(0))
    procs = [launch(k) for k in range(copies)]
    return alone, max(wall(p) for p in procs)


def pipeline_once(manifest: Path, num_cpus: int, batch_size: int, label: str) -> tuple[float, dict]:
    from pipeline.runner import run

    cfg = pipeline_config(manifest, work_dir(f"pipeline-store-{label}"), num_cpus=num_cpus, batch_size=batch_size)
    with Timer() as t:
        result = run(cfg, log=lambda _: None)
    return t.seconds, result.record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", default="3000,10000", help="good rows in the generated demo dataset(s) (+8 bad ones)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--no-scaling", action="store_true", help="skip the 1-CPU pipeline run")
    ap.add_argument("--no-ceiling", action="store_true", help="skip the machine's parallel ceiling")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each; the fastest counts (shared, noisy machine)")
    args = ap.parse_args()
    sizes = [int(x) for x in str(args.n).split(",")]
    cpus = cpu_count()
    report = Report("Pipeline end to end (demo rows + 8 bad, weight-free encoders, no augmentation)",
                    ["rows", "run", "CPUs", "wall s", "rows/s", "vs baseline"])
    ratios, per_stage, one_cpu = {}, None, None
    for n in sizes:
        manifest = demo_data(n)
        n_input = n + 8
        base = min((baseline(manifest, args.batch_size) for _ in range(args.repeat)), key=lambda b: b["wall_s"])
        base_rps = n_input / base["wall_s"]
        report.add(n_input, "plain single-process loop (fresh process, imports timed)", 1,
                   base["wall_s"], base_rps, "1.00")
        start_ray(cpus)
        warm_driver(manifest)
        wall, rec = min((pipeline_once(manifest, cpus, args.batch_size, "all") for _ in range(args.repeat)),
                        key=lambda r: r[0])
        ratios[n_input] = ratio(base["wall_s"], wall)
        report.add(n_input, f"pipeline, {cpus} CPUs (`run()`: scan + actors + stages + sinks + commits)", cpus,
                   wall, n_input / wall, f"{ratios[n_input]:.2f}")
        if per_stage is None:
            per_stage = (n_input, base, rec)
        if not args.no_scaling and cpus > 1 and one_cpu is None:
            start_ray(1)
            warm_driver(manifest)
            wall_one, rec_one = min((pipeline_once(manifest, 1, args.batch_size, "one") for _ in range(args.repeat)),
                                    key=lambda r: r[0])
            one_cpu = (n_input, wall, wall_one, rec_one)
            report.add(n_input, "pipeline, 1 CPU", 1, wall_one, n_input / wall_one,
                       f"{ratio(base['wall_s'], wall_one):.2f}")
    if not args.no_ceiling and cpus > 1:
        n = sizes[0]
        alone, side = ceiling(demo_data(n), args.batch_size, cpus)
        report.add(n + 8, "ceiling: the plain loop alone, 1 thread", 1, alone, (n + 8) / alone, "-")
        report.add(n + 8, f"ceiling: {cpus} copies of it side by side, 1 thread each (slowest)", cpus, side,
                   cpus * (n + 8) / side, "-")
        report.note(f"this machine's parallel ceiling for this work: {cpus} single-threaded copies side by side "
                    f"give **{cpus * alone / side:.2f}x** the throughput of one (ideal {cpus}x): cores share caches "
                    f"and memory bandwidth; no scheduler can beat that ratio here")
    for n_input, r in ratios.items():
        report.note(f"pipeline / baseline at {n_input} rows ({cpus} CPUs): **{r:.2f}x** — {verdict(r, TARGET)}")
    if one_cpu is not None:
        n_input, wall, wall_one, _ = one_cpu
        report.note(f"scaling at {n_input} rows, pipeline {cpus} CPUs / 1 CPU: **{ratio(wall_one, wall):.2f}x** "
                    f"(ideal {cpus}x)")
    report.note(f"each figure is the fastest of {args.repeat} runs (this machine is shared: identical runs vary "
                "by up to 30 %)")
    report.note("timers: pipeline = `run(cfg)` in a warm driver (Ray and Ray Data's service actors up, one small "
                "run made before; the actors' start-up, imports and model loads are timed); baseline = "
                "`benchmarks/baseline.py` in a fresh process (its imports, scan, stage construction, stages, and the same "
                "shards and features table written with the pipeline's sink code)")
    report.print()

    n_input, base, rec = per_stage
    rec_one = one_cpu[3] if one_cpu else None
    stage_report = Report(f"Per stage at {n_input} rows (seconds summed over actors; rows/s per actor-second)",
                          ["stage", "baseline s", "baseline rows/s", f"pipeline {cpus} CPUs s",
                           "pipeline rows/s/actor", "pipeline 1 CPU s"])
    base_stage = {"ingest.scan": base["scan_s"]} | base["stage_seconds"]
    for name, st in rec["stages"].items():
        b = base_stage.get(name)
        brows = n_input if name == "ingest.scan" else base["rows"]
        one = rec_one["stages"].get(name, {}).get("seconds") if rec_one else None
        stage_report.add(name, b if b is not None else "-", brows / b if b else "-", st["seconds"],
                         st["rows_per_s"] or "-", one if one is not None else "-")
    stage_report.note(f"pipeline run record: wall_s {rec['wall_s']}, phases_s {rec.get('phases_s')}; time outside "
                      f"the stages is start-up, scheduling, transfer, sinks and commits")
    stage_report.print()


if __name__ == "__main__":
    t0 = time.time()
    main()
