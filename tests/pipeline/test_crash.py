"""Crash safety: SIGKILL a run at several points, rerun, and nothing is duplicated or lost;
a stage actor killed mid-run is restarted by Ray and the run completes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from deltalake import DeltaTable

from pipeline.demo import make_demo
from pipeline.runner import run
from tests.pipeline.helpers import config, write_config
from tests.pipeline.test_run import assert_accounting, assert_shards_hold_features

MMPIPE = str(Path(sys.executable).parent / "mmpipe")


def input_ids(manifest: Path) -> set[str]:
    return {json.loads(line)["id"] for line in manifest.read_text().splitlines()}


def no_duplicate_keys(store: Path) -> None:
    t = DeltaTable(str(store / "features")).to_pyarrow_table(columns=["id", "aug"])
    keys = list(zip(t["id"].to_pylist(), t["aug"].to_pylist()))
    assert len(keys) == len(set(keys))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("crash")
    return folder, make_demo(folder / "data", n=24)


def killed_run(folder: Path, manifest: Path, store: Path, point: str) -> None:
    cfg = write_config(folder, {"execution": {"batch_size": 4}})
    env = dict(os.environ, MMPIPE_KILL_AT=point)
    proc = subprocess.run([MMPIPE, "run", str(cfg), "--input", str(manifest), "--store", str(store)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


POINTS = ["during_stages", "between_commits", "before_commit", "before_record"]


@pytest.mark.parametrize("point", [pytest.param(p, marks=[] if p in ("during_stages", "between_commits") else pytest.mark.slow) for p in POINTS])
def test_sigkill_then_rerun_leaves_no_duplicate_and_no_missing_id(data, tmp_path, point, ray_session):
    folder, manifest = data
    store = tmp_path / "store"
    killed_run(tmp_path, manifest, store, point)
    rec = run(config(tmp_path, manifest, store), log=lambda s: None).record
    assert_accounting(store, input_ids(manifest))
    no_duplicate_keys(store)
    assert rec["counts"]["accepted"] + rec["counts"]["rejected"] == rec["counts"]["input"]
    committed_runs = {p.stem for p in (store / "runs").glob("*.json")}
    shard_runs = {p.name for p in (store / "samples").iterdir()}
    referenced = {s.split("/")[1] for s in DeltaTable(str(store / "features")).to_pyarrow_table(columns=["shard"])["shard"].to_pylist()}
    assert shard_runs <= committed_runs | referenced, "shards of a run that never committed were left behind"
    # and a further run is idempotent
    again = run(config(tmp_path, manifest, store), log=lambda s: None).record
    assert again["counts"]["processed"] == 0


def test_killed_stage_actor_is_restarted_and_nothing_is_lost(data, tmp_path, ray_session):
    import psutil

    folder, manifest = data
    store = tmp_path / "store"
    planned, killed = threading.Event(), []

    def assassin():
        planned.wait(timeout=120)       # the scan pass is over: kill a worker of the processing pass
        deadline = time.time() + 60
        while time.time() < deadline and not killed:
            # Only this test's Ray (started by this process): never another Ray's actor on the machine.
            for proc in psutil.Process().children(recursive=True):
                try:
                    cmdline = " ".join(proc.cmdline())
                except psutil.Error:
                    continue
                if "MapWorker(MapBatches(StageChain))" in cmdline:
                    os.kill(proc.pid, signal.SIGKILL)   # the actor dies as on a node failure
                    killed.append(proc.pid)
                    return
            time.sleep(0.1)

    t = threading.Thread(target=assassin, daemon=True)
    t.start()
    cfg = config(tmp_path, manifest, store, {"execution": {"batch_size": 2}})
    rec = run(cfg, log=lambda s: planned.set() if "to process" in s else None).record
    t.join(timeout=5)
    assert killed, "no stage actor was found to kill"
    assert_accounting(store, input_ids(manifest))
    no_duplicate_keys(store)
    assert rec["shard_writer"] == "actors"
    assert_shards_hold_features(store, rec["run_id"])
    assert rec["counts"]["processed"] == rec["counts"]["input"]
