"""Human-readable summaries: a finished run, and a store's tables, versions and run history."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pyarrow.compute as pc

from core.store import Store


def _table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[k]) for r in cells)) if cells else len(h) for k, h in enumerate(headers)]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def _when(ms: int | None) -> str:
    return "" if ms is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ms / 1000))


def format_run(record: dict) -> str:
    c = record["counts"]
    out = [f"run {record['run_id']}  ({record['wall_s']} s)  store: {record['store']}",
           "counts: " + ", ".join(f"{k}={c[k]}" for k in ("input", "accepted", "rejected", "processed", "unchanged", "removed"))]
    if record.get("rejects_by_reason"):
        out.append("rejects by reason: " + ", ".join(f"{k}={v}" for k, v in sorted(record["rejects_by_reason"].items())))
    stages = record.get("stages", {})
    if stages:
        out.append(_table(["stage", "rows", "seconds", "rows/s"],
                          [[n, s["rows"], s["seconds"], s["rows_per_s"]] for n, s in stages.items()]))
    return "\n".join(out)


def process_start_time() -> float | None:
    """When this process began (epoch s, to 10 ms) from /proc on Linux; None elsewhere."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])   # field 22: starttime
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def format_profile(record: dict, process_start: float | None = None) -> str:
    """Where a run's wall time went, in order, then each stage's CPU seconds (``mmpipe run --profile``).
    ``process_start``: when the process began (epoch s), for the start-up before the run."""
    prof, phases = record.get("profile", {}), record.get("phases_s", {})
    rows: list[list] = []
    if process_start and prof.get("started"):
        rows.append(["start-up (process start -> run: imports, config, stages)", prof["started"] - process_start])
    rows += [["scan", phases.get("scan", 0.0)], ["plan", phases.get("plan", 0.0)]]
    start, end, first, last = (prof.get(k) for k in ("pass_start", "pass_end", "first_row", "last_row"))
    if start and end and first and last:
        wait = prof.get("ray_wait_s", 0.0)
        rows += [["waiting for Ray to start", wait],
                 ["pass start-up (actors -> first row in a stage)", first - start - wait],
                 ["rows (first row in -> last row out)", last - first],
                 ["pass drain (last row -> pass end)", end - last]]
    elif "process" in phases:
        rows.append(["processing pass", phases["process"]])
    rows.append(["commit", phases.get("commit", 0.0)])
    if prof.get("started") and end:
        rows.append(["other (locks, store reads, run record)",
                     record.get("wall_s", 0.0) - sum(phases.get(p, 0.0) for p in ("scan", "plan", "commit")) - (end - start)])
    if "ray_shutdown_wait_s" in prof:
        rows.append(["Ray shutdown (after the commit)", prof["ray_shutdown_wait_s"]])
    out = ["profile (wall seconds):", _table(["phase", "seconds"], [[n, round(v, 3)] for n, v in rows])]
    cpu = [[n, s["seconds"]] for n, s in record.get("stages", {}).items()]
    if prof.get("shard_writing_s"):
        cpu.append(["(shard writing)", prof["shard_writing_s"]])
    if cpu:
        total = sum(v for _, v in cpu) or 1.0
        out += ["stage CPU seconds:", _table(["stage", "seconds", "share"],
                                             [[n, v, f"{100 * v / total:.0f} %"] for n, v in cpu])]
    return "\n".join(out)


def format_store(store: Store, version: int | None = None) -> str:
    out = [f"store {store.uri}"]
    for which in ("features", "rejects"):
        hist = store.versions(which)
        if not hist:
            out.append(f"{which}: (no table yet)")
            continue
        if version is not None and version not in {h.get("version") for h in hist}:
            out.append(f"{which}: no version {version} (versions {min(h['version'] for h in hist)}-"
                       f"{max(h['version'] for h in hist)})")
            continue
        t = store.read(which, version=version, columns=["id"] + (["aug"] if which == "features" else []))
        n0 = t.filter(pc.field("aug") == 0).num_rows if which == "features" else t.num_rows
        out.append(f"{which}: {t.num_rows} rows ({n0} ids)" + (f" at version {version}" if version is not None else ""))
        out.append(_table(["version", "timestamp", "operation", "run"],
                          [[h.get("version"), _when(h.get("timestamp")), h.get("operation"),
                            (h.get("mmpipe.run_id") or h.get("customMetadata", {}) or "")] for h in hist[:10]]))
    runs = store.runs()
    if runs:
        out.append("runs:")
        out.append(_table(["run", "started", "input", "accepted", "rejected", "processed", "unchanged", "removed", "wall s"],
                          [[r["run_id"], r["started"], *(r["counts"][k] for k in ("input", "accepted", "rejected", "processed", "unchanged", "removed")), r["wall_s"]] for r in runs]))
        last = runs[-1]
        if last.get("rejects_by_reason"):
            out.append("rejects by reason (latest): " + json.dumps(last["rejects_by_reason"], sort_keys=True))
    return "\n".join(out)
