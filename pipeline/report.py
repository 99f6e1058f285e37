"""Human-readable summaries: a finished run, and a store's tables, versions and run history."""
from __future__ import annotations

import json
import time

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


def format_store(store: Store, version: int | None = None) -> str:
    out = [f"store {store.uri}"]
    for which in ("features", "rejects"):
        hist = store.versions(which)
        if not hist:
            out.append(f"{which}: (no table yet)")
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
