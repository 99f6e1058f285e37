"""Incremental reprocessing: a full run vs a second run after ``--changed`` of the inputs changed
(their captions edited), on the same store. Target: incremental wall < 10 % of the full run's.

Both timers cover ``pipeline.runner.run`` (scan of every input, planning, the processing pass over
what changed, sinks, Delta commits) in a warm driver: Ray and Ray Data's service actors are up and
the driver has made one small run before, as a long-lived driver (a service, a notebook, a
scheduler's worker) has. A second table times the same two runs as fresh ``mmpipe run`` processes,
each paying Python and library imports (and, for the full run, an in-process Ray start): what a
shell user waits for (``--no-cli`` skips it).

Run: .venv/bin/python benchmarks/bench_incremental.py [--n 3000] [--changed 0.01] [--no-cli]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from common import (ROOT, Report, Timer, cpu_count, demo_data, pipeline_config, ratio, start_ray, verdict,
                    warm_driver, work_dir)

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
    ap.add_argument("--no-cli", action="store_true", help="skip the fresh-process (shell) runs")
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
    warm_driver(first)

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
    report.note("timer: `run(cfg)` in a warm driver (Ray and Ray Data's service actors up, one small run made "
                "before); every run scans all inputs (stat, and read + hash where the stat changed)")
    report.print()
    if not args.no_cli:
        cli_runs(first, changed_manifest, folder)


def cli_runs(first: Path, changed: Path, folder: Path) -> None:
    """The same full and incremental runs as fresh `mmpipe run` processes (Python start, imports,
    an in-process Ray start and shutdown included)."""
    import ray

    ray.shutdown()
    store = work_dir("incremental-store-cli")
    report = Report("Incremental run from a shell (fresh `mmpipe run` processes)",
                    ["run", "wall s", "vs full run"])
    times = []
    for label, manifest in (("full run (empty store)", first), ("incremental (changed inputs)", changed)):
        cfg = pipeline_config(manifest, store).model_dump(mode="json")
        cfg["ray"]["dashboard"] = False
        path = folder / f"cli-{len(times)}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        with Timer() as t:
            subprocess.run([str(Path(sys.executable).parent / "mmpipe"), "run", str(path)], check=True, cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(t.seconds)
        report.add(label, t.seconds, f"{ratio(t.seconds, times[0]):.3f}")
    report.note("each process starts Python and imports mmpipe and its libraries; the full run also starts Ray "
                "in-process (the incremental plan is small enough for the driver, so it never starts Ray)")
    report.print()


if __name__ == "__main__":
    main()
