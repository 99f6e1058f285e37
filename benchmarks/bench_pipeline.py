"""End-to-end pipeline throughput vs a plain single-process loop over the same stage classes, and
scaling from 1 CPU to all CPUs.

The pipeline timer covers all of ``pipeline.runner.run``: the scan pass, actor start-up (model and
library loads), the processing pass, sinks and Delta commits. Ray start-up (``ray.init``) is not
timed: a cluster user has Ray running. The baseline timer covers the scan (read + hash) and every
stage over the same batches in one process; it writes nothing, so the comparison favours it.

Run: .venv/bin/python benchmarks/bench_pipeline.py [--n 3000] [--batch-size 32] [--no-scaling]
"""
from __future__ import annotations

import argparse
import time

from common import Report, Timer, cpu_count, demo_data, pipeline_config, ratio, start_ray, verdict, work_dir

TARGET = 1.6


def pipeline_once(manifest, num_cpus: int, batch_size: int, label: str) -> tuple[float, dict]:
    from pipeline.runner import run

    start_ray(num_cpus)
    cfg = pipeline_config(manifest, work_dir(f"pipeline-store-{label}"), num_cpus=num_cpus, batch_size=batch_size)
    with Timer() as t:
        result = run(cfg, log=lambda _: None)
    return t.seconds, result.record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=3000, help="good rows in the generated demo dataset (+8 bad ones)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--no-scaling", action="store_true", help="skip the 1-CPU pipeline run")
    args = ap.parse_args()

    manifest = demo_data(args.n)
    cpus = cpu_count()
    report = Report(f"Pipeline end to end ({args.n} demo rows + 8 bad, weight-free encoders, no augmentation)",
                    ["run", "CPUs", "wall s", "rows/s", "vs baseline"])

    from baseline import plain_pipeline, warm_imports

    cfg = pipeline_config(manifest, work_dir("pipeline-baseline"), batch_size=args.batch_size)
    warm_imports(cfg)
    with Timer() as t:
        loop, scan_s = plain_pipeline(cfg)
    rows = loop.rows + 0   # rows that reach the stages (ingest-time rejects never do)
    n_input = args.n + 8
    base_rps = n_input / t.seconds
    report.add("plain single-process loop (scan + stages)", 1, t.seconds, base_rps, "1.00")

    wall_all, rec_all = pipeline_once(manifest, cpus, args.batch_size, "all")
    rps_all = n_input / wall_all
    report.add(f"pipeline, {cpus} CPUs (run(): scan + actors + stages + sinks + commits)", cpus, wall_all, rps_all,
               f"{ratio(rps_all, base_rps):.2f}")
    rec_one = None
    if not args.no_scaling and cpus > 1:
        wall_one, rec_one = pipeline_once(manifest, 1, args.batch_size, "one")
        rps_one = n_input / wall_one
        report.add("pipeline, 1 CPU", 1, wall_one, rps_one, f"{ratio(rps_one, base_rps):.2f}")

    report.note(f"pipeline / baseline ({cpus} CPUs): **{ratio(rps_all, base_rps):.2f}x** — "
                f"{verdict(ratio(rps_all, base_rps), TARGET)}")
    if rec_one is not None:
        report.note(f"scaling, pipeline {cpus} CPUs / 1 CPU: **{ratio(rps_all, rps_one):.2f}x** (ideal {cpus}x)")
    report.note(f"rows/s = input rows ({n_input}) / wall s; {rows} rows reached the stages, "
                f"{rec_all['counts']['accepted']} accepted, {rec_all['counts']['rejected']} rejected")
    report.note("timer: pipeline = `run(cfg)` with Ray already started (scan pass, actor start-up, processing, "
                "sinks, Delta commits); baseline = scan + stage construction + stages with modules already "
                "imported, writes nothing")
    report.print()

    stage_report = Report("Per stage (seconds summed over actors; rows/s per actor-second)",
                          ["stage", "baseline s", "baseline rows/s", f"pipeline {cpus} CPUs s",
                           "pipeline rows/s/actor", "pipeline 1 CPU s"])
    stages = rec_all["stages"]
    base_stage = {"ingest.scan": scan_s} | loop.stage_seconds
    for name, st in stages.items():
        b = base_stage.get(name)
        brows = n_input if name == "ingest.scan" else rows
        one = rec_one["stages"].get(name, {}).get("seconds") if rec_one else None
        stage_report.add(name, b if b is not None else "-", brows / b if b else "-", st["seconds"],
                         st["rows_per_s"] or "-", one if one is not None else "-")
    stage_report.note(f"pipeline run record: wall_s {rec_all['wall_s']}, process_s {rec_all['process_s']} "
                      f"(processing pass incl. actor start-up); time outside the stages is start-up, "
                      f"scheduling, transfer, sinks and commits")
    stage_report.print()


if __name__ == "__main__":
    t0 = time.time()
    main()
