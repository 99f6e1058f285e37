"""``mmpipe plan``: what ``mmpipe run`` would do, without doing it. The same scan and the same
streamed planner as a run (so the counts are the run's), on spills in a temporary folder; no
stage runs, no table is written, no lock is taken. Why rows would be recomputed comes from
comparing the stages' fingerprints and parameters with the store's latest run record; the time
estimate from that record's per-stage rates."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from core.config import Config
from core.store import Store
from pipeline.incremental import Planner
from pipeline.orchestration import Pipeline
from pipeline.runner import new_run_id
from pipeline.sources import iter_source_tables, source_size
from pipeline.spill import in_sorted, key_hashes
from stages.base import MODALITIES


def dry_run(cfg: Config) -> dict[str, Any]:
    store = Store(cfg.store)
    run_id = "plan-" + new_run_id()
    pipe = Pipeline.build(cfg, run_id, store, connect=False)   # every stage validated, as in a run
    folder = Path(tempfile.mkdtemp(prefix="mmpipe-plan-"))
    try:
        with pipe:
            planner = Planner(store, pipe.fps, cfg, run_id, folder / "plan", source_size(cfg.source),
                              derived=pipe.derived)
            for scanned in pipe.scan_chunks(iter_source_tables(cfg.source, cfg.execution.scan_chunk_rows)):
                planner.add(scanned)
            plan = planner.finish()
            stored = np.unique(np.concatenate([key_hashes(b.column(0)) for b in plan.feature_tombs.batches(["id"])]
                                              + [key_hashes(b.column(0)) for b in plan.reject_tombs.batches(["id"])]
                                              + [np.zeros(0, np.uint64)]))
            changed, redo = 0, dict.fromkeys(MODALITIES, 0)
            for batch in plan.rows.batches(["id", "redo"]):
                changed += int(in_sorted(key_hashes(batch.column(0)), stored).sum())
                for value in batch.column(1).to_pylist():
                    for m in (value or "").split(","):
                        if m in redo:
                            redo[m] += 1
            rejects: dict[str, int] = {}
            for batch in plan.rejects.batches(["reason"]):
                for reason in batch.column(0).to_pylist():
                    rejects[reason] = rejects.get(reason, 0) + 1
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    runs = store.runs()
    last = runs[-1] if runs else None
    specs = pipe.specs
    changes = stage_changes(cfg, {s.name: s.fingerprint for s in specs}, last)
    out = {
        "store": store.uri,
        "counts": {"input": plan.input, "to_process": plan.to_process, "new": plan.to_process - changed,
                   "changed": changed, "unchanged": plan.unchanged, "removed": plan.removed, "partial": plan.partial,
                   "rejected_at_ingest": plan.planned_rejects},
        "rejects_by_reason": rejects, "recompute": redo, "stage_changes": changes,
        "compared_with_run": last["run_id"] if last else None,
    }
    out["stages"] = stage_rows(out, specs, {c["stage"] for c in changes})
    out["estimate_s"] = estimate(out, last, pipe.info.get("num_cpus", 1))
    return out


def stage_rows(plan: dict, specs, changed: set[str]) -> dict[str, dict[str, Any]]:
    """Rows each stage would see, and why: a feature stage its modality's recomputed rows, every
    other stage the processed rows; "stage changed" when its own fingerprint changed."""
    counts = plan["counts"]
    out = {}
    for spec in specs:
        m = spec.cls.modality
        rows = plan["recompute"][m] if spec.name.startswith("features.") and m in plan["recompute"] else counts["to_process"]
        why = (["stage changed"] if spec.name in changed else []) + (["new inputs"] if counts["new"] else []) \
            + (["changed inputs or stages"] if counts["changed"] else [])
        out[spec.name] = {"rows": rows, "why": why if rows else []}
    return out


def stage_changes(cfg: Config, fingerprints: dict[str, str], last: dict | None) -> list[dict[str, Any]]:
    """The stages whose fingerprint differs from the last run's, with the parameters that changed."""
    if last is None:
        return []
    before_fps = last.get("fingerprints", {})
    before_cfg = last.get("config", {}).get("stages", {})
    now_cfg = cfg.model_dump(mode="json").get("stages", {})
    out = []
    for name, fp in fingerprints.items():
        if before_fps.get(name) == fp:
            continue
        old, new = _entry(before_cfg, name), _entry(now_cfg, name)
        params = sorted(set(_flat(old)) | set(_flat(new)))
        diffs = {k: [_flat(old).get(k), _flat(new).get(k)] for k in params if _flat(old).get(k) != _flat(new).get(k)}
        out.append({"stage": name, "was": before_fps.get(name), "now": fp, "parameters": diffs})
    return out


def _entry(stages: dict, name: str) -> dict:
    node: Any = stages
    for part in name.split("."):
        node = node.get(part, {}) if isinstance(node, dict) else {}
    return node if isinstance(node, dict) else {}


def _flat(entry: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in entry.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def estimate(plan: dict, last: dict | None, cpus: int) -> float | None:
    """Seconds of stage work the plan means, from the last run's rows per second for each stage,
    spread over the CPUs; None without a previous run to take the rates from."""
    if last is None:
        return None
    rates = {name: s.get("rows_per_s") for name, s in last.get("stages", {}).items()}
    seconds = sum(s["rows"] / rates[name] for name, s in plan["stages"].items() if rates.get(name))
    return round(seconds / max(1, cpus), 1)


def format_dry_run(plan: dict[str, Any]) -> str:
    c = plan["counts"]
    lines = [f"plan for {plan['store']} (nothing run, nothing written)",
             f"inputs: {c['input']}: new {c['new']}, changed {c['changed']}, unchanged {c['unchanged']}, "
             f"removed {c['removed']}, rejected at ingest {c['rejected_at_ingest']}",
             f"to process: {c['to_process']} rows; features recomputed: "
             + ", ".join(f"{m} {n}" for m, n in plan["recompute"].items())]
    if plan["rejects_by_reason"]:
        lines.append("rejects at ingest: " + ", ".join(f"{r}={n}" for r, n in sorted(plan["rejects_by_reason"].items())))
    for change in plan["stage_changes"]:
        params = "; ".join(f"{k}: {_shown(v[0])} -> {_shown(v[1])}" for k, v in change["parameters"].items())
        lines.append(f"stage changed since run {plan['compared_with_run']}: {change['stage']}"
                     + (f" ({params})" if params else " (its code's version)"))
    if plan["estimate_s"] is not None:
        lines.append(f"estimated stage time: {plan['estimate_s']} s (the rates of run {plan['compared_with_run']})")
    return "\n".join(lines)


def _shown(value: Any) -> str:
    return "(default)" if value is None else json.dumps(value)
