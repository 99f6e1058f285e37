"""Shared by the benchmarks: demo data and configs, the machine line, Markdown tables, Ray set-up."""
from __future__ import annotations

import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import yaml

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "benchmarks" / "_work"      # generated data and stores (git-ignored)
if str(ROOT) not in sys.path:             # `python benchmarks/x.py` from the repo root
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")


# How a plain loop's libraries may use threads. Its fastest counts: on a 2-core machine library
# thread pools (OpenBLAS, OpenCV) sometimes help a single process by ~8 % and sometimes slow it by
# 10-20 % (oversubscription); "1 thread" is how the pipeline's 1-CPU actors run.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
THREADINGS = {"library threads": {}, "1 thread": ONE_THREAD}


def work_dir(name: str, fresh: bool = True) -> Path:
    path = WORK / name
    if fresh:
        shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)
    return path


def demo_data(n: int, seed: int = 0) -> Path:
    """The demo dataset of ``n`` good rows (plus its 8 bad ones), cached by size and seed."""
    from pipeline.demo import make_demo

    folder = WORK / f"demo-{n}-{seed}"
    manifest = folder / "manifest.jsonl"
    if not manifest.exists():
        shutil.rmtree(folder, ignore_errors=True)
        tmp = make_demo(folder.with_suffix(".tmp"), n, seed).parent
        tmp.rename(folder)
    return manifest


def pipeline_config(manifest: Path, store: Path, *, num_cpus: int | None = None, batch_size: int = 32,
                    augment: bool = False, extra: dict[str, Any] | None = None):
    """configs/demo.yaml (weight-free encoders) on this manifest and store; augmentation off unless
    asked, so every stage runs once per input row."""
    from core.config import Config

    data = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    if not augment:
        data["stages"].pop("augment", None)
    data["source"]["path"] = str(manifest)
    data["store"] = str(store)
    data["ray"] = {"dashboard": False, "progress_bars": False, "num_cpus": num_cpus}
    data["execution"]["batch_size"] = batch_size
    for key, value in (extra or {}).items():
        node = data
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return Config.model_validate(data)


def start_ray(num_cpus: int) -> float:
    """Start an in-process Ray with ``num_cpus`` CPUs (restarting it if needed) and run a one-row
    Ray Data job on an actor pool, so Ray Data's own service actors (stats, autoscaling coordinator,
    actor location tracker: seconds of imports each) are up, as on a cluster that has run a job
    before. Returns seconds taken."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    start = time.perf_counter()
    ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False)

    class Identity:   # defined here so that it is pickled by value: any script can call this
        def __call__(self, batch):
            return batch

    ray.data.from_items([{"x": 0}]).map_batches(Identity, compute=ray.data.ActorPoolStrategy(size=1)).materialize()
    return time.perf_counter() - start


def warm_driver(manifest: Path, rows: int = 40) -> None:
    """One untimed ``run()`` over the first ``rows`` rows of ``manifest`` into a scratch store (the
    small-plan path, in this process): this driver is then in the state a long-lived one is in
    after its first run (stage libraries loaded, Delta and Parquet writers imported). Needs Ray up."""
    from pipeline.runner import run

    lines = [line for line in manifest.read_text().splitlines() if line.strip()][:rows]
    small = manifest.parent / "warm-up.jsonl"
    small.write_text("\n".join(lines) + "\n")
    run(pipeline_config(small, work_dir("warm-up-store")), log=lambda _: None)


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def gpu_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return "none"


def load_avg() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


@dataclass
class Report:
    """A benchmark's printed section: command, machine, a table, notes."""

    title: str
    header: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    load_start: str = field(default_factory=load_avg)

    def add(self, *cells: Any) -> None:
        self.rows.append(list(cells))

    def note(self, text: str) -> None:
        self.notes.append(text)

    def render(self) -> str:
        script = os.path.relpath(sys.argv[0], ROOT)
        cmd = " ".join(shlex.quote(a) for a in [".venv/bin/python", script, *sys.argv[1:]])
        lines = [f"### {self.title}", "",
                 f"- command: `{cmd}`",
                 f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
                 f"- machine: {cpu_count()} CPU cores, GPU: {gpu_name()}, "
                 f"load average (1/5/15 min) at start {self.load_start}, at end {load_avg()}",
                 "", "| " + " | ".join(self.header) + " |",
                 "|" + "|".join("---" if k == 0 else "---:" for k in range(len(self.header))) + "|"]
        lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in self.rows]
        if self.notes:
            lines += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def print(self) -> None:
        print(self.render(), flush=True)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def verdict(value: float, target: float, higher_is_better: bool = True) -> str:
    met = value >= target if higher_is_better else value <= target
    return f"{'met' if met else 'MISSED'} (target {'>=' if higher_is_better else '<='} {target:g})"


class Timer:
    """``with Timer() as t: ...`` then ``t.seconds``."""

    seconds: float = 0.0

    def __enter__(self) -> "Timer":
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._start


def batches_of(rows: list[dict], size: int) -> Iterator[list[dict]]:
    for start in range(0, len(rows), size):
        yield rows[start:start + size]
