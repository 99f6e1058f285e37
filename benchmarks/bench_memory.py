"""Peak memory of a pipeline run at N and 10N rows: is the processing pass streaming?

A sampler thread sums, every ``--interval`` seconds, the RSS and USS of this process and all its
descendants (in-process Ray: GCS, raylet, the workers and actors) and records the peak. USS counts
pages private to each process, so shared libraries and the shared-memory object store are not
counted once per process. Ray's idle footprint (measured before each run) is reported too.
Target: peak at 10N <= 1.3x peak at N.

Run: .venv/bin/python benchmarks/bench_memory.py [--n 200] [--factor 10]
"""
from __future__ import annotations

import argparse
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from common import Report, cpu_count, demo_data, pipeline_config, ratio, start_ray, verdict, work_dir

TARGET = 1.3
GiB = 1024 ** 3


@dataclass
class Sample:
    rss: int = 0
    uss: int = 0
    procs: int = 0


def process_tree(root: int) -> list[int]:
    """``root`` and its descendants, from /proc (Linux; psutil is not among the dependencies)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def process_memory(pid: int) -> tuple[int, int]:
    """(RSS, USS) in bytes from /proc/PID/smaps_rollup; USS = private clean + private dirty."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        fields[key] = int(value.split()[0]) * 1024
    return fields.get("Rss", 0), fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)


def tree_memory() -> Sample:
    s = Sample()
    for pid in process_tree(os.getpid()):
        try:
            rss, uss = process_memory(pid)
        except (OSError, ValueError):   # exited meanwhile
            continue
        s.rss += rss
        s.uss += uss
        s.procs += 1
    return s


class PeakSampler(threading.Thread):
    def __init__(self, interval: float):
        super().__init__(daemon=True)
        self.interval, self.peak = interval, Sample()
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            s = tree_memory()
            self.peak = Sample(max(self.peak.rss, s.rss), max(self.peak.uss, s.uss), max(self.peak.procs, s.procs))
            self._done.wait(self.interval)

    def stop(self) -> Sample:
        self._done.set()
        self.join()
        return self.peak


def measure(n: int, interval: float) -> tuple[Sample, Sample, float]:
    """(idle Ray, peak during the run, wall s) for a fresh Ray and store on ``n`` demo rows."""
    from pipeline.runner import run

    manifest = demo_data(n)
    start_ray(cpu_count())
    time.sleep(2)   # let Ray's prestarted workers settle before the idle reading
    idle = tree_memory()
    cfg = pipeline_config(manifest, work_dir(f"memory-store-{n}"), num_cpus=cpu_count())
    sampler = PeakSampler(interval)
    sampler.start()
    start = time.perf_counter()
    run(cfg, log=lambda _: None)
    wall = time.perf_counter() - start
    return idle, sampler.stop(), wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--factor", type=int, default=10)
    ap.add_argument("--interval", type=float, default=0.5, help="sampling period, seconds")
    args = ap.parse_args()

    report = Report(f"Peak memory, driver + Ray processes ({args.n} vs {args.n * args.factor} demo rows)",
                    ["rows", "wall s", "processes", "idle Ray USS GiB", "peak RSS GiB", "peak USS GiB",
                     "peak USS above idle GiB"])
    results = {}
    for n in (args.n, args.n * args.factor):
        idle, peak, wall = measure(n, args.interval)
        results[n] = (idle, peak)
        report.add(n, wall, peak.procs, idle.uss / GiB, peak.rss / GiB, peak.uss / GiB, (peak.uss - idle.uss) / GiB)
    (i1, p1), (i2, p2) = results[args.n], results[args.n * args.factor]
    r = ratio(p2.uss, p1.uss)
    report.note(f"peak USS {args.factor}N / N: **{r:.2f}x** — {verdict(r, TARGET, higher_is_better=False)}; "
                f"peak RSS {ratio(p2.rss, p1.rss):.2f}x; above idle Ray {ratio(p2.uss - i2.uss, p1.uss - i1.uss):.2f}x")
    report.note("RSS counts shared pages (libraries, object store) in every process that maps them; USS does not")
    report.print()


if __name__ == "__main__":
    main()
