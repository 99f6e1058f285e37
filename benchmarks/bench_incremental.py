"""Incremental reprocessing: a full run vs a second run after ``--changed`` of the inputs changed
(their captions edited), on the same store. Target: incremental wall < 10 % of the full run's.

Both timers cover ``pipeline.runner.run`` with Ray already started (scan of every input, planning,
the processing pass over what changed, sinks, Delta commits).

Run: .venv/bin/python benchmarks/bench_incremental.py [--n 3000] [--changed 0.01]
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from common import Report, Timer, cpu_count, demo_data, pipeline_config, ratio, start_ray, verdict, work_dir

TARGET = 0.10


def change_inputs(manifest: Path, folder: Path, fraction: float) -> tuple[Path, int]:
    """Rewrite the manifest with ``fraction`` of the good rows' captions changed."""
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    texts = [i for i, r in enumerate(rows) if r.get("text") and not r["id"].startswith(("bad-", "dup-"))]
    step = max(1, round(1 / fraction)) if fraction > 0 else len(texts) + 1
    changed = texts[::step]
    for i in changed:
        rows[i]["text"] += " (edited)"
    out = folder / "manifest.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out, len(changed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--changed", type=float, default=0.01, help="fraction of inputs changed")
    args = ap.parse_args()
    from pipeline.runner import run

    source = demo_data(args.n)
    folder = work_dir("incremental-data")
    shutil.copytree(source.parent / "media", folder / "media")
    first = folder / "manifest.jsonl"
    shutil.copy(source, first)
    store = work_dir("incremental-store")
    cpus = cpu_count()
    start_ray(cpus)

    with Timer() as full:
        rec_full = run(pipeline_config(first, store, num_cpus=cpus), log=lambda _: None).record
    changed_manifest, n_changed = change_inputs(first, folder, args.changed)
    with Timer() as inc:
        rec_inc = run(pipeline_config(changed_manifest, store, num_cpus=cpus), log=lambda _: None).record
    with Timer() as noop:
        rec_noop = run(pipeline_config(changed_manifest, store, num_cpus=cpus), log=lambda _: None).record

    n_input = rec_full["counts"]["input"]
    report = Report(f"Incremental run ({n_input} inputs, {n_changed} captions changed = "
                    f"{100 * n_changed / n_input:.1f} %)",
                    ["run", "wall s", "processed", "unchanged", "scan s", "processing pass s", "vs full run"])
    for label, t, rec in (("full run (empty store)", full, rec_full), ("incremental (changed inputs)", inc, rec_inc),
                          ("again, nothing changed", noop, rec_noop)):
        c = rec["counts"]
        report.add(label, t.seconds, c["processed"], c["unchanged"], rec["stages"]["ingest.scan"]["seconds"],
                   rec["process_s"], f"{ratio(t.seconds, full.seconds):.3f}")
    r = ratio(inc.seconds, full.seconds)
    report.note(f"incremental / full: **{100 * r:.1f} %** — {verdict(r, TARGET, higher_is_better=False)}")
    report.note("timer: `run(cfg)` with Ray already started; every run scans (reads and hashes) all inputs")
    report.print()


if __name__ == "__main__":
    main()
