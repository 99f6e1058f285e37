"""mmpipe end to end against the script a user would write instead (benchmarks/plain_script.py:
OpenCV, soundfile, librosa, lxml and scikit-learn called directly, one process, one Parquet file).

Both run as fresh processes on the same demo data (image + text + audio rows; augmentation off),
timed from the process's start to its exit: ``mmpipe run`` pays for its imports, starting Ray, the
scan and plan, the actors' start-up, the shards, the Delta commits and shutting Ray down; the script
pays for its imports (librosa's first calls compile with numba). Each size runs in ``--rounds``
rounds that alternate which goes first; a ratio is taken within a round (the machine's speed drifts).

With ``--kept-ray`` each round also runs ``mmpipe run --address`` against a Ray started on this
machine just before it (``ray start --head``, as README's "keep Ray up" says) and stopped after it:
the fixed cost without Ray's own start and stop.

The second table splits mmpipe's wall time (its run record's profile): fixed cost is everything
outside the stages' rows (start-up, waiting for Ray, the actors' start-up, drain, commit, record,
shutdown, exit), scan and plan, and the rows. The third compares per-row costs: each of mmpipe's
stages (CPU seconds in the actors) against the script's operation for the same modality.

Run: .venv/bin/python benchmarks/bench_plain_script.py [--sizes 7200,30000] [--rounds 2] [--kept-ray]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Iterator

import yaml

from common import ROOT, Report, demo_data, ratio, verdict, work_dir

TARGETS = {7200: 1.5, 30000: 1.8}
FIXED_TARGET = 4.0
MMPIPE = str(Path(sys.executable).parent / "mmpipe")
RAY = str(Path(sys.executable).parent / "ray")
PLAIN = ROOT / "benchmarks" / "plain_script.py"
# mmpipe stages and the script's operation for the same modality (per-row cost table).
SAME_WORK = {"image": ["cleanup.image", "features.image"], "audio": ["cleanup.audio", "features.audio"],
             "text": ["cleanup.text", "features.text"]}


def config_for(manifest: Path, store: Path, path: Path) -> Path:
    data = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    data["stages"].pop("augment", None)
    data["source"]["path"] = str(manifest)
    data["store"] = str(store)
    data["ray"] = {"dashboard": False, "progress_bars": False}
    path.write_text(yaml.safe_dump(data))
    return path


def plain_once(manifest: Path, work: Path) -> dict:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, str(PLAIN), str(manifest), str(work / "plain.parquet")],
                         check=True, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    return {"wall": wall, **json.loads(out.stdout.strip().splitlines()[-1])}


def mmpipe_once(manifest: Path, work: Path, address: str = "") -> dict:
    store = work / "store"
    shutil.rmtree(store, ignore_errors=True)
    cfg = config_for(manifest, store, work / "config.yaml")
    start, epoch = time.perf_counter(), time.time()
    subprocess.run([MMPIPE, "run", str(cfg), *(["--address", address] if address else [])],
                   check=True, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    record = json.loads(sorted((store / "runs").glob("*.json"))[-1].read_text())
    prof, phases = record["profile"], record["phases_s"]
    rows = prof["last_row"] - prof["first_row"]
    return {"wall": wall, "rows": rows, "scan_plan": phases["scan"] + phases["plan"],
            "fixed": wall - rows - phases["scan"] - phases["plan"], "start_to_first_row": prof["first_row"] - epoch,
            "record": record}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def kept_ray() -> Iterator[str]:
    """A Ray head on this machine for the rounds (its own temp dir and process group, so that it is
    stopped without ``ray stop``, which would stop every Ray here); yields its address."""
    import ray

    port, temp = _free_port(), tempfile.mkdtemp(prefix="rk", dir="/tmp")   # short: Ray's socket paths
    ip = ray.util.get_node_ip_address()
    head = subprocess.Popen([RAY, "start", "--head", "--block", f"--port={port}", f"--num-cpus={os.cpu_count()}",
                             "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not list(Path(temp).glob("session_*/sockets/raylet*")):   # the raylet is up
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("ray start --head did not come up")
            time.sleep(0.2)
        time.sleep(2)
        yield f"{ip}:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(20)
        for pid in [int(p) for p in os.listdir("/proc") if p.isdigit()]:   # workers that left the group
            with contextlib.suppress(OSError):
                if temp.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="7200,30000")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--kept-ray", action="store_true", help="also run mmpipe against a Ray started before the run")
    args = ap.parse_args()
    compare([int(s) for s in args.sizes.split(",")], args.rounds, args.kept_ray)


def kept_once(manifest: Path, work: Path) -> dict:
    """``mmpipe run --address`` against a Ray started for it (before the clock starts) and stopped
    after it: no Ray of this benchmark's is up beside the plain script or the in-process runs
    (one idle beside them made an in-process run ~3 s slower to its first row)."""
    with kept_ray() as address:
        return mmpipe_once(manifest, work, address)


def compare(sizes: list[int], rounds: int, with_kept: bool) -> None:
    """The three tables; ``with_kept``: runs against a Ray kept up beside the in-process ones."""

    kept = ["mmpipe, Ray kept up (s)", "plain / kept"] if with_kept else []
    timing = Report("mmpipe run vs a plain script, end to end (process start to exit)",
                    ["rows", "round", "plain script (s)", "mmpipe run (s)", "plain / mmpipe", *kept])
    split = Report("Where mmpipe's wall time went (run record profile)",
                   ["rows", "round", "Ray", "fixed cost (s)", "process start -> first row in a stage (s)", "scan + plan (s)",
                    "rows: first in -> last out (s)"])
    per_row = Report("Per-row cost: mmpipe's stages (CPU in the actors) vs the script's same operation, ms per row",
                     ["rows", "modality", "plain script", "mmpipe stages", "mmpipe stages (each)"])
    for n in sizes:
        manifest = demo_data(n)
        work = work_dir(f"plain-script-{n}")
        ratios = []
        for k in range(1, rounds + 1):
            order = [("plain", partial(plain_once, manifest, work)), ("mmpipe", partial(mmpipe_once, manifest, work))]
            if with_kept:
                order.append(("kept", partial(kept_once, manifest, work)))
            if k % 2 == 0:
                order.reverse()
            got = {name: fn() for name, fn in order}
            plain, mm = got["plain"], got["mmpipe"]
            ratios.append(ratio(plain["wall"], mm["wall"]))
            extra = [got["kept"]["wall"], f"{ratio(plain['wall'], got['kept']['wall']):.2f}x"] if with_kept else []
            timing.add(n, k, plain["wall"], mm["wall"], f"{ratios[-1]:.2f}x", *extra)
            for name, run in got.items():
                if name != "plain":
                    split.add(n, k, "kept up" if name == "kept" else "in-process", run["fixed"], run["start_to_first_row"],
                              run["scan_plan"], run["rows"])
            print(f"{n} rows, round {k}: " + ", ".join(f"{name} {run['wall']:.1f} s" for name, run in got.items()),
                  file=sys.stderr, flush=True)
        stages = mm["record"]["stages"]
        rows = plain["rows"]
        for modality, names in SAME_WORK.items():
            ours = {s: 1000 * stages[s]["seconds"] / rows for s in names if s in stages}
            per_row.add(n, modality, f"{1000 * plain['ops_s'].get(modality, 0.0) / rows:.3f}", f"{sum(ours.values()):.3f}",
                        ", ".join(f"{s} {v:.3f}" for s, v in ours.items()))
        others = {s: 1000 * v["seconds"] / rows for s, v in stages.items() if not any(s in g for g in SAME_WORK.values())}
        others["(shard writing)"] = 1000 * mm["record"]["profile"]["shard_writing_s"] / rows
        per_row.add(n, "mmpipe only", f"write {1000 * plain['ops_s'].get('write', 0.0) / rows:.3f}",
                    f"{sum(others.values()):.3f}", ", ".join(f"{s} {v:.3f}" for s, v in others.items()))
        best = sorted(ratios)[len(ratios) // 2]
        if n in TARGETS:
            timing.note(f"{n} rows: median plain / mmpipe {best:.2f}x, {verdict(best, TARGETS[n])}")
    for how in ("in-process", "kept up"):
        fixed = [row[3] for row in split.rows if row[2] == how]
        if fixed:
            split.note(f"fixed cost, Ray {how}, smallest {min(fixed):.2f} s: "
                       f"{verdict(min(fixed), FIXED_TARGET, higher_is_better=False)}")
    for report in (timing, split, per_row):
        report.print()


if __name__ == "__main__":
    main()
