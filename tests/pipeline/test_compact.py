"""``mmpipe compact``: small files bin-packed, the same rows before and after, old versions kept
within the retention, a dry run that changes nothing, a busy store refused, the CLI's output."""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.compute as pc
import pytest
from deltalake import DeltaTable

from core.maintenance import compact, format_compaction
from core.store import Store, StoreBusy
from pipeline.runner import run
from tests.pipeline.helpers import config

REPO = Path(__file__).resolve().parents[2]
RUNS = 4
WORDS = "amber basalt cedar delta ember fjord granite harbor island juniper kelp lagoon meadow nectar".split()
# Text only, every run in the driver: a store of several commits in a few seconds, no Ray.
OVERRIDES = {"execution": {"local_max_rows": 10_000},
             "stages": {"cleanup": {"image": {"enabled": False}, "audio": {"enabled": False}},
                        "features": {"image": {"enabled": False}, "audio": {"enabled": False}}}}


def manifest(folder: Path, k: int) -> Path:
    """Run ``k``'s input: the earlier runs' rows unchanged plus 8 new ones and one new bad row, so
    each run's MERGE adds a file to each table instead of rewriting the existing ones."""
    rows = [{"id": f"t{i:03d}", "label": f"c{i % 4}", "text": " ".join(random.Random(i).choices(WORDS, k=8)) + f" row {i}"}
            for i in range(8 * (k + 1))]
    rows += [{"id": f"bad{j}", "text": ""} for j in range(k + 1)]
    path = folder / f"manifest-{k}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def rows(store: Path, which: str, version: int | None = None) -> list[dict]:
    keys = [("id", "ascending"), ("aug", "ascending")] if which == "features" else [("id", "ascending")]
    return DeltaTable(str(store / which), version=version).to_pyarrow_table().sort_by(keys).to_pylist()


def disk(store: Path) -> dict[str, int]:
    return {str(p.relative_to(store)): p.stat().st_size for p in store.rglob("*") if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("compact")
    store = folder / "store"
    for k in range(RUNS):
        run(config(folder, manifest(folder, k), store, OVERRIDES), log=lambda s: None)
    return store


@pytest.fixture
def store(built, tmp_path) -> Path:
    """A private copy of the built store: each test may rewrite it."""
    return Path(shutil.copytree(built, tmp_path / "store"))


def test_compaction_merges_files_and_keeps_every_row_and_version(store):
    history = {w: DeltaTable(str(store / w)).version() for w in ("features", "rejects")}
    before = {w: [rows(store, w, v) for v in range(history[w] + 1)] for w in history}
    result = compact(str(store))
    for which, t in result["tables"].items():
        assert t["files_before"] == RUNS and t["files_after"] == 1, t
        assert t["compacted_files"] == RUNS and t["added_files"] == 1
        assert t["version_after"] == t["version_before"] + 1 == history[which] + 1
        assert t["vacuumed_files"] == 0   # the rewritten files are younger than the 168 h retention
        assert rows(store, which) == before[which][-1]
        # every earlier version is still readable, with the rows it had
        assert [rows(store, which, v) for v in range(history[which] + 1)] == before[which]
        dt = DeltaTable(str(store / which))
        assert dt.history(1)[0]["operation"] == "OPTIMIZE" and (store / which / "_delta_log" / "_last_checkpoint").exists()
    again = compact(str(store))   # idempotent: nothing left to bin-pack
    assert all(t["compacted_files"] == 0 and t["files_after"] == 1 for t in again["tables"].values())


def test_zero_retention_vacuums_superseded_files_and_runs_continue(store, tmp_path):
    before = {w: rows(store, w) for w in ("features", "rejects")}
    result = compact(str(store), vacuum_hours=0)
    for which, t in result["tables"].items():
        assert t["vacuumed_files"] == RUNS, t
        on_disk = sorted(p.name for p in (store / which).glob("*.parquet"))
        assert on_disk == [Path(u).name for u in DeltaTable(str(store / which)).file_uris()]
        assert rows(store, which) == before[which]
    # the pipeline commits on top of the compacted, checkpointed tables
    folder = tmp_path / "next"
    folder.mkdir()
    m = manifest(folder, RUNS)
    record = run(config(folder, m, store, OVERRIDES), log=lambda s: None).record
    ids = {json.loads(line)["id"] for line in m.read_text().splitlines()}
    assert record["counts"]["processed"] == 9 and record["counts"]["unchanged"] == len(ids) - 9
    feats = DeltaTable(str(store / "features")).to_pyarrow_table(columns=["id", "aug"])
    accepted = feats.filter(pc.field("aug") == 0)["id"].to_pylist()
    rejected = DeltaTable(str(store / "rejects")).to_pyarrow_table(columns=["id"])["id"].to_pylist()
    assert sorted(accepted + rejected) == sorted(ids)


def test_dry_run_changes_nothing(store):
    files = disk(store)
    result = compact(str(store), vacuum_hours=0, dry_run=True)
    assert disk(store) == files
    for t in result["tables"].values():
        assert t["small_files_before"] == RUNS and t["compacted_files"] == 0
        assert t["files_after"] == t["files_before"] == RUNS and t["version_after"] == t["version_before"]
        assert t["vacuumed_files"] == 0   # nothing superseded yet: each run only added files
    shown = format_compaction(result).splitlines()
    assert "dry run" in shown[0] and [line.split()[:4] for line in shown[3:5]] == [
        ["features", str(RUNS), "->", str(RUNS)], ["rejects", str(RUNS), "->", str(RUNS)]]


def test_busy_store_is_refused(store):
    with Store(str(store)).lock("20990101T000000-holder"):
        with pytest.raises(StoreBusy, match="being written by run 20990101T000000-holder"):
            compact(str(store))
        proc = mmpipe("compact", str(store))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [f"mmpipe: error: store {store} is being written by run "
                                        f"20990101T000000-holder (pid {os.getpid()}); wait for it to finish"]


def mmpipe(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *argv], env=env, capture_output=True, text=True,
                          timeout=120)


def test_cli_json_output_and_missing_store(store, tmp_path):
    proc = mmpipe("compact", str(store), "--json", "--retain-hours", "0")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out.keys() == {"store", "dry_run", "retain_hours", "tables"}
    assert out["store"] == str(store) and out["retain_hours"] == 0 and out["dry_run"] is False
    assert set(out["tables"]) == {"features", "rejects"}
    for t in out["tables"].values():
        assert {"files_before", "files_after", "bytes_before", "bytes_after", "version_before", "version_after",
                "vacuumed_files", "vacuumed"} <= t.keys()
        assert (t["files_before"], t["files_after"], t["vacuumed_files"]) == (RUNS, 1, RUNS)
    proc = mmpipe("compact", str(tmp_path / "nostore"))
    assert proc.returncode == 2 and proc.stderr == f"mmpipe: error: store not found: {tmp_path / 'nostore'}\n"
