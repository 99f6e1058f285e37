"""Run every benchmark once (default sizes, or ``--quick``) and rewrite benchmarks/RESULTS.md: one
section per benchmark with its exact command, date, and the table it printed. Text below the
``NOTES_MARKER`` line of the existing RESULTS.md (profiling notes, before/after) is kept.

Run: .venv/bin/python benchmarks/run_all.py [--only pipeline,memory] [--quick]  (``make bench``)
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from common import cpu_count, gpu_name, load_avg

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
NOTES_MARKER = "<!-- notes: kept by run_all.py -->"

# name -> (script, default args, --quick args)
BENCHMARKS: dict[str, tuple[str, list[str], list[str]]] = {
    "pipeline": ("bench_pipeline.py", [], ["--n", "300", "--repeat", "1", "--no-ceiling"]),
    "features": ("bench_features.py", [], ["--rows", "600", "--unique", "100", "--repeat", "1"]),
    "memory": ("bench_memory.py", [], ["--n", "50"]),
    "incremental": ("bench_incremental.py", [], ["--n", "300", "--no-cli"]),
    "train": ("bench_train.py", [], ["--rows", "2000", "--epochs", "2"]),
    "augment": ("bench_augment.py", [], ["--images", "50", "--texts", "50", "--clips", "20"]),
}


def run_one(name: str, quick: bool) -> str:
    script, args, quick_args = BENCHMARKS[name]
    cmd = [sys.executable, str(HERE / script), *(quick_args if quick else args)]
    shown = " ".join(shlex.quote(c) for c in [".venv/bin/python", f"benchmarks/{script}", *cmd[2:]])
    print(f"== {name}: {shown}", flush=True)
    start = time.time()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, cwd=HERE.parent, env=env, capture_output=True, text=True)
    took = time.time() - start
    out = proc.stdout.strip()
    head = [f"## {name}", "", f"Command: `{shown}`  ", f"Date: {time.strftime('%Y-%m-%d %H:%M %Z')}, "
            f"took {took:.0f} s; machine {cpu_count()} CPU cores, GPU {gpu_name()}; load average at end "
            f"{load_avg()}", ""]
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        out += f"\n\n**FAILED (exit {proc.returncode})**:\n\n```\n{tail}\n```"
    print(out, flush=True)
    return "\n".join(head) + "\n" + out + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated subset of " + ",".join(BENCHMARKS))
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run, not for the record)")
    args = ap.parse_args()
    names = [n for n in args.only.split(",") if n] or list(BENCHMARKS)
    unknown = set(names) - set(BENCHMARKS)
    if unknown:
        raise SystemExit(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    old = RESULTS.read_text() if RESULTS.exists() else ""
    kept = {}   # sections of benchmarks not re-run this time
    for block in old.split(NOTES_MARKER)[0].split("\n## ")[1:]:
        kept[block.split("\n", 1)[0].strip()] = "## " + block.rstrip() + "\n"
    notes = old.split(NOTES_MARKER, 1)[1] if NOTES_MARKER in old else "\n"
    sections = {n: run_one(n, args.quick) if n in names else kept.get(n, f"## {n}\n\n(not run yet)\n")
                for n in BENCHMARKS}
    text = ["# Benchmark results", "",
            "Written by `benchmarks/run_all.py` (`make bench`); every figure below was measured by the "
            "command shown in its section. The machine is shared, so load average is recorded with each.", ""]
    text += [sections[n] for n in BENCHMARKS]
    RESULTS.write_text("\n".join(text) + "\n" + NOTES_MARKER + notes)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
