"""What a curator asks of a store: one sample's story (``mmpipe why``) and where a run's rows went,
stage by stage (``mmpipe funnel``). Both read only what runs already record: the features and
rejects tables (filtered by the reader, never loaded whole) and the run records."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.compute as pc

from core.store import Store
from stages.modalities import MODALITIES

WHY_FEATURE_COLUMNS = ["id", "aug", "label", "split", *(f"has_{m}" for m in MODALITIES),
                       *(f"sha_{m}" for m in (*MODALITIES, "sample")), "fp_sample", "aug_params", "dedup_sig", "dropped",
                       "meta", "shard", "run_id"]


class UnknownId(LookupError):
    """The id is in neither table of the store."""


def _commits(store: Store, which: str) -> dict[str, int]:
    """run id -> the table version its commit made."""
    out = {}
    for h in store.versions(which):
        run = h.get("mmpipe.run_id") or (h.get("customMetadata") or {}).get("mmpipe.run_id")
        if run and h.get("version") is not None:
            out.setdefault(run, h["version"])
    return out


def why(store: Store, rid: str) -> dict[str, Any]:
    """One sample's story: accepted (with its copies, hashes, shard, ``duplicates``: the ids
    rejected as its duplicates) or rejected (stage, reason, detail, ``kept_id`` of a duplicate),
    and ``runs``: the run that wrote its current row and the table version that run made."""
    feats = store.read("features", columns=WHY_FEATURE_COLUMNS, filter=pc.field("id") == rid).to_pylist()
    rejected = store.read("rejects", filter=pc.field("id") == rid).to_pylist()
    if not feats and not rejected:
        raise UnknownId(rid)
    absorbed = store.read("rejects", columns=["id", "run_id"],
                          filter=(pc.field("reason") == "duplicate") & (pc.field("detail") == rid)).to_pylist()
    versions = {"features": _commits(store, "features"), "rejects": _commits(store, "rejects")}
    out: dict[str, Any] = {"id": rid}
    if feats:
        original = next((r for r in feats if r["aug"] == 0), feats[0])
        out.update(status="accepted", label=original["label"], split=original["split"],
                   modalities=[m for m in MODALITIES if original[f"has_{m}"]],
                   sha={m: original[f"sha_{m}"] for m in (*MODALITIES, "sample") if original[f"sha_{m}"]},
                   fingerprint=original["fp_sample"], shard=original["shard"],
                   meta=json.loads(original["meta"] or "{}"), dropped=json.loads(original["dropped"] or "{}"),
                   copies=[{"aug": r["aug"], "shard": r["shard"], "params": json.loads(r["aug_params"] or "{}")}
                           for r in sorted(feats, key=lambda r: r["aug"]) if r["aug"] > 0],
                   duplicates=sorted(r["id"] for r in absorbed),
                   runs=[{"run": original["run_id"], "table": "features",
                          "version": versions["features"].get(original["run_id"])}])
    else:
        rej = rejected[0]
        out.update(status="rejected", stage=rej["stage"], reason=rej["reason"], detail=rej["detail"],
                   source=json.loads(rej["ref"] or "{}"), sha={"sample": rej["sha_sample"]} if rej["sha_sample"] else {},
                   runs=[{"run": rej["run_id"], "table": "rejects", "version": versions["rejects"].get(rej["run_id"])}])
        if rej["reason"] == "duplicate":
            out["kept_id"] = rej["detail"]
    return out


def format_why(story: dict[str, Any]) -> str:
    lines = [f"{story['id']}: {story['status']}"]
    keys = ("stage", "reason", "detail", "kept_id", "label", "split", "modalities", "source", "sha", "fingerprint",
            "shard", "dropped", "meta", "duplicates", "runs")
    for key in keys:
        if story.get(key) not in (None, "", [], {}):
            value = story[key]
            lines.append(f"  {key}: {value if isinstance(value, str) else json.dumps(value, sort_keys=True)}")
    for copy in story.get("copies", []):
        lines.append(f"  copy aug={copy['aug']}: {json.dumps(copy['params'], sort_keys=True)} ({copy['shard']})")
    return "\n".join(lines)


# -- funnel ---------------------------------------------------------------------------------
def run_record(store: Store, run_id: str | None) -> dict[str, Any]:
    runs = store.runs()
    if not runs:
        raise UnknownId("no run recorded")
    if run_id is None:
        return runs[-1]
    for record in runs:
        if record["run_id"] == run_id:
            return record
    raise UnknownId(run_id)


def funnel(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows entering and leaving each step of a run, in order, with rejects by reason: the scan,
    the plan (unchanged rows leave, whole-sample duplicates are rejected), then every stage."""
    stages = record.get("stages", {})
    steps: list[dict[str, Any]] = []

    def step(name: str, entering: int, rejected: dict[str, int], added: int = 0, unchanged: int = 0) -> int:
        leaving = entering + added - unchanged - sum(rejected.values())
        steps.append({"step": name, "in": entering, "out": leaving, "rejected": dict(sorted(rejected.items())),
                      **({"added": added} if added else {}), **({"unchanged": unchanged} if unchanged else {})})
        return leaving

    counts = record["counts"]
    scan = stages.get("ingest.scan", {})
    rows = step("ingest.scan", counts["input"], scan.get("rejected", {}))
    in_stages: dict[str, int] = {}
    for s in stages.values():
        for reason, n in s.get("rejected", {}).items():
            in_stages[reason] = in_stages.get(reason, 0) + n
    planned = {r: n - in_stages.get(r, 0) for r, n in record.get("run_rejects_by_reason", {}).items()
               if n - in_stages.get(r, 0) > 0}
    rows = step("plan", rows, planned, unchanged=counts.get("unchanged", 0))
    for name in record.get("fingerprints", {}):
        s = stages.get(name)
        if s is None:
            continue
        rows = step(name, rows, s.get("rejected", {}), added=max(0, s["rows_out"] - s["rows"]))
    return steps


def format_funnel(record: dict[str, Any], steps: list[dict[str, Any]]) -> str:
    from pipeline.report import _table

    body = [[s["step"], s["in"], s.get("unchanged", "") or "", s.get("added", "") or "", sum(s["rejected"].values()),
             s["out"], ", ".join(f"{r}={n}" for r, n in s["rejected"].items())] for s in steps]
    return (f"run {record['run_id']}: {record['counts']['input']} input, {record['counts']['accepted']} accepted in the store\n"
            + _table(["step", "in", "unchanged", "added", "rejected", "out", "rejects by reason"], body))


def plot_funnel(record: dict[str, Any], steps: list[dict[str, Any]], path: Path) -> Path:
    """A horizontal funnel: each step's rows leaving (blue) and rejected there (red), top to bottom."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 0.5 * len(steps) + 1.5))
    names = [s["step"] for s in steps][::-1]
    outs = [s["out"] for s in steps][::-1]
    lost = [sum(s["rejected"].values()) + s.get("unchanged", 0) for s in steps][::-1]
    ax.barh(names, outs, color="#4c78a8", label="rows out")
    ax.barh(names, lost, left=outs, color="#e45756", label="rejected (or unchanged, at plan)")
    for k, s in enumerate(steps[::-1]):
        top = sorted(s["rejected"].items(), key=lambda kv: -kv[1])[:3]
        if top:
            ax.text(outs[k] + lost[k], k, "  " + ", ".join(f"{r} {n}" for r, n in top), va="center", fontsize=8)
    ax.set_xlim(0, 1.7 * max([s["in"] + s.get("added", 0) for s in steps] + [1]))   # room for the reasons
    ax.set_xlabel("rows")
    ax.set_title(f"run {record['run_id']}: {record['counts']['input']} in, {steps[-1]['out']} out")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- diff -----------------------------------------------------------------------------------
DIFF_COLUMNS = ["id"] + [f"sha_{m}" for m in MODALITIES] + [f"fp_{m}" for m in MODALITIES] + ["run_id"]
DIFF_BUCKET_ROWS = 200_000   # rows of both versions joined at a time


def diff(store: Store, old: int, new: int, examples: int = 5) -> dict[str, Any]:
    """Which original rows were added, removed or changed between two features-table versions,
    and why: per modality, its content (a content hash) or its stages (a fingerprint); per stage,
    how many rows a changed stage fingerprint touched (from the run records of the runs that wrote
    the two rows). Streams: both versions are routed into id buckets on local spills and joined
    one bucket at a time."""
    import tempfile

    import pyarrow as pa

    from pipeline.spill import Partitioned

    originals = pc.field("aug") == 0
    sizes = [store.dataset("features", v).count_rows(filter=originals) for v in (old, new)]
    buckets = max(1, -(-max(sizes) // DIFF_BUCKET_ROWS))
    schema = pa.schema([(c, pa.string()) for c in DIFF_COLUMNS])
    runs = {r["run_id"]: r.get("fingerprints", {}) for r in store.runs()}
    out: dict[str, Any] = {"from": old, "to": new, "added": 0, "removed": 0, "changed": 0, "unchanged": 0,
                           "modalities": {}, "stages": {}, "examples": {"added": [], "removed": [], "changed": []}}
    with tempfile.TemporaryDirectory(prefix="mmpipe-diff-") as tmp:
        sides = []
        for name, version in (("old", old), ("new", new)):
            part = Partitioned(Path(tmp) / name, schema, buckets, "id")
            for batch in store.batches("features", DIFF_COLUMNS, filter=originals, version=version):
                part.add(pa.Table.from_batches([batch]).cast(schema))
            sides.append(part.close())
        for a, b in zip(sides[0].parts, sides[1].parts):
            _diff_bucket(a.table(), b.table(), out, runs, examples)
    return out


def _diff_bucket(old, new, out: dict[str, Any], runs: dict[str, dict], examples: int) -> None:
    joined = old.join(new, "id", join_type="full outer", left_suffix="_old", right_suffix="_new",
                      coalesce_keys=True).to_pylist()
    for row in joined:
        if row["run_id_old"] is None:
            kind = "added"
        elif row["run_id_new"] is None:
            kind = "removed"
        else:
            why = {}
            for m in MODALITIES:
                if row[f"sha_{m}_old"] != row[f"sha_{m}_new"]:
                    why[m] = "content"
                elif row[f"fp_{m}_old"] != row[f"fp_{m}_new"]:
                    why[m] = "stages"
            if not why:
                out["unchanged"] += 1
                continue
            kind = "changed"
            for m, reason in why.items():
                counts = out["modalities"].setdefault(m, {})
                counts[reason] = counts.get(reason, 0) + 1
            if "stages" in why.values():
                before, after = runs.get(row["run_id_old"], {}), runs.get(row["run_id_new"], {})
                for stage in sorted(set(before) | set(after)):
                    if before.get(stage) != after.get(stage):
                        out["stages"][stage] = out["stages"].get(stage, 0) + 1
        out[kind] += 1
        if len(out["examples"][kind]) < examples:
            out["examples"][kind].append(row["id"])


def format_diff(d: dict[str, Any]) -> str:
    lines = [f"features version {d['from']} -> {d['to']}: {d['added']} added, {d['removed']} removed, "
             f"{d['changed']} changed, {d['unchanged']} unchanged (original rows)"]
    for m, counts in sorted(d["modalities"].items()):
        lines.append(f"  {m}: " + ", ".join(f"{n} by {'a content change' if r == 'content' else 'changed stages'}"
                                              for r, n in sorted(counts.items())))
    for stage, n in sorted(d["stages"].items()):
        lines.append(f"  stage {stage}: fingerprint changed for {n} row(s)")
    for kind, ids in d["examples"].items():
        if ids:
            lines.append(f"  e.g. {kind}: {', '.join(ids)}")
    return "\n".join(lines)
