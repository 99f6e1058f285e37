"""Incremental reprocessing: idempotence, only-what-changed, removals, equality with a fresh run,
time travel, and one writer at a time."""
from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from deltalake import DeltaTable

from pipeline.demo import _audio, _image, make_demo
from pipeline.runner import run
from core.deletion import deleted_rows
from core.store import Store, StoreBusy
from tests.pipeline.helpers import config, write_config

ROOT = Path(__file__).resolve().parents[2]

N = 100


def rows_of(manifest: Path) -> list[dict]:
    return [json.loads(line) for line in manifest.read_text().splitlines()]


def write_rows(manifest: Path, rows: list[dict]) -> None:
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))


def features(store: Path, version: int | None = None) -> dict:
    """The table as deltalake's own engine reads it (deletion vectors applied)."""
    t = pa.RecordBatchReader.from_stream(DeltaTable(str(store / "features"), version=version).scan()).read_all()
    return {(r["id"], r["aug"]): r for r in t.to_pylist()}


@pytest.fixture(scope="module")
def base(tmp_path_factory, ray_session):
    folder = tmp_path_factory.mktemp("inc")
    manifest = make_demo(folder / "data", n=N)
    rows = [r for r in rows_of(manifest) if r["id"].startswith("s")][:N]   # good rows only
    write_rows(manifest, rows)
    return folder, manifest


@pytest.fixture
def own(base, request):
    """Each test edits its own copy of the manifest (media stay shared, next to it)."""
    folder, manifest = base
    mine = manifest.with_name(f"manifest-{request.node.name}.jsonl")
    mine.write_text(manifest.read_text())
    return folder, mine


def go(folder: Path, manifest: Path, store: Path, overrides: dict | None = None) -> dict:
    return run(config(folder, manifest, store, overrides), log=lambda s: None).record


_go = go


def test_second_identical_run_processes_nothing(own, tmp_path):
    folder, manifest = own
    first = go(folder, manifest, tmp_path / "s")
    assert first["counts"]["processed"] == N
    second = go(folder, manifest, tmp_path / "s")
    assert second["counts"]["processed"] == 0 and second["counts"]["unchanged"] == N
    assert second["versions"] == {"features": None, "rejects": None}   # no new commit either


@pytest.mark.parametrize("bucket_rows,vectors", [(100_000, "auto"), (7, "auto"), (100_000, "on")],
                         ids=["one-bucket", "15-buckets", "deletion-vectors"])
def test_changes_deletions_and_equality_with_a_fresh_run(own, tmp_path, bucket_rows, vectors):
    """Also with the plan streamed through 15 id buckets, and with the superseded rows marked by
    deletion vectors instead of rewritten: the same decisions, rows and commits."""
    folder, manifest = own
    store = tmp_path / "s"
    go = functools.partial(_go, overrides={"execution": {"plan_bucket_rows": bucket_rows, "deletion_vectors": vectors}})
    assert go(folder, manifest, store)["plan_buckets"] == (1 if bucket_rows > N else 15)
    v0 = DeltaTable(str(store / "features")).version()
    before = features(store)
    rows = rows_of(manifest)
    # change 5 inputs: 2 texts, 2 images (new files), 1 audio
    rng = np.random.default_rng(7)
    rows[0]["text"] = "a brand new caption about pine trees and moss"
    rows[1]["text"] = "another new caption with waves and coral"
    for k in (2, 3):
        p = manifest.parent / f"media/changed{k}.jpg"
        p.write_bytes(_image(rows[k]["label"], rng))
        rows[k]["image"] = f"media/changed{k}.jpg"
    p = manifest.parent / "media/changed4.wav"
    p.write_bytes(_audio(rows[4]["label"], rng))
    rows[4]["audio"] = "media/changed4.wav"
    for k in (0, 1, 2, 3, 4):
        assert all(m in rows[k] for m in ("image", "text", "audio")) or True
    write_rows(manifest, rows)
    rec = go(folder, manifest, store)
    assert rec["counts"]["processed"] == 5 and rec["counts"]["unchanged"] == N - 5
    assert bool(deleted_rows(DeltaTable(str(store / "features")))) == (vectors == "on")
    after = features(store)
    changed_ids = {rows[k]["id"] for k in range(5)}
    for key, row in after.items():
        if key[0] not in changed_ids:
            assert row["run_id"] == before[key]["run_id"], "an unchanged row was rewritten"
    # delete 3 inputs
    gone = {r["id"] for r in rows[-3:]}
    write_rows(manifest, rows[:-3])
    rec = go(folder, manifest, store)
    assert rec["counts"]["removed"] == 3 and rec["counts"]["processed"] == 0
    ids_now = {k[0] for k in features(store)}
    assert not ids_now & gone and len(ids_now) == N - 3
    # the incremental result equals a from-scratch run on the final input
    fresh = tmp_path / "fresh"
    go(folder, manifest, fresh)
    a, b = features(store), features(fresh)
    assert a.keys() == b.keys()
    for key in a:
        for col in ("label", "split", "has_image", "has_text", "has_audio", "sha_sample", "fp_image", "fp_text", "fp_audio"):
            assert a[key][col] == b[key][col], (key, col)
        for m in ("image", "text", "audio"):
            np.testing.assert_allclose(a[key][f"{m}_emb"], b[key][f"{m}_emb"], rtol=1e-5, atol=1e-6)
    # time travel: the first version still has the deleted ids
    old = features(store, version=v0)
    assert gone <= {k[0] for k in old}
    assert Store(str(store)).read("features", version=v0).num_rows == len(old)


def test_changing_only_the_audio_encoder_recomputes_audio_only(own, tmp_path):
    folder, manifest = own
    store = tmp_path / "s"
    go(folder, manifest, store)
    before = features(store)
    rec = go(folder, manifest, store, {"stages": {"features": {"audio": {"encoder": "logmel", "params": {"n_mfcc": 13}}}}})
    # every row's audio lineage changed (the dimension too: 20 -> 13 MFCCs), nothing else did
    assert rec["counts"]["processed"] == N and rec["counts"]["partial"] == N
    assert rec["dims"]["audio"] < len(next(iter(before.values()))["audio_emb"])
    after = features(store)
    assert after.keys() == before.keys()
    assert {len(r["audio_emb"]) for r in after.values()} == {rec["dims"]["audio"]}
    for key, row in after.items():
        assert row["image_emb"] == before[key]["image_emb"] and row["text_emb"] == before[key]["text_emb"]
        assert row["fp_image"] == before[key]["fp_image"] and row["fp_text"] == before[key]["fp_text"]
        assert row["fp_audio"] != before[key]["fp_audio"]
        assert row["has_audio"] == before[key]["has_audio"]


def test_second_writer_is_refused(own, tmp_path):
    folder, manifest = own
    store = Store(str(tmp_path / "s"))
    with store.lock("holder"):
        with pytest.raises(StoreBusy, match="being written"):
            go(folder, manifest, tmp_path / "s")


def test_a_small_plan_on_a_large_store_runs_in_actors(own, tmp_path):
    """A plan under local_max_rows still goes to the actors when the store holds more than
    local_max_stored_rows originals: dedup's index, seeded from every stored row, stays out of the driver."""
    folder, manifest = own
    store = tmp_path / "s"
    small = {"execution": {"local_max_rows": 1000, "local_max_stored_rows": 10}}
    assert go(folder, manifest, store, small)["execution"] == "driver"   # the store was empty
    rows = rows_of(manifest)
    rows[0]["text"] = "one changed caption about the sea"
    write_rows(manifest, rows)
    rec = go(folder, manifest, store, small)
    assert rec["counts"]["processed"] == 1 and rec["execution"] == "ray-data"
    saved = store / "cache" / "dedup" / "shard-0-of-1"   # the index actor saved itself for the next run
    assert (saved / "outline.json").is_file()
    before = (saved / "outline.json").stat().st_mtime_ns
    rows[1]["text"] = "another changed caption, about hills"
    write_rows(manifest, rows)
    rec = go(folder, manifest, store, small)                 # ... which starts from it
    assert rec["counts"]["processed"] == 1 and rec["counts"]["accepted"] + rec["counts"]["rejected"] == len(rows)
    assert (saved / "outline.json").stat().st_mtime_ns > before


def test_small_plans_run_in_the_driver_with_the_same_result(own, tmp_path):
    folder, manifest = own
    ray_rec = go(folder, manifest, tmp_path / "ray")
    local_rec = go(folder, manifest, tmp_path / "local", {"execution": {"local_max_rows": 1000}})
    assert ray_rec["execution"] == "ray-data" and local_rec["execution"] == "driver"
    a, b = features(tmp_path / "ray"), features(tmp_path / "local")
    assert a.keys() == b.keys()
    for key in a:
        assert a[key]["sha_sample"] == b[key]["sha_sample"] and a[key]["split"] == b[key]["split"]
        for m in ("image", "text", "audio"):
            np.testing.assert_allclose(a[key][f"{m}_emb"], b[key][f"{m}_emb"], rtol=1e-5, atol=1e-6)


def test_a_plan_the_driver_handles_never_starts_ray(own, tmp_path):
    """A fresh process (as `mmpipe run` is) whose plan is small runs without starting Ray at all."""
    folder, manifest = own
    write_config(tmp_path, {"source": {"path": str(manifest)}, "store": str(tmp_path / "s"),
                            "execution": {"local_max_rows": 1000}})
    code = ("import json, ray; from core.config import load_config; from pipeline.runner import run; "
            f"rec = run(load_config({str(tmp_path / 'config.yaml')!r}), log=lambda s: None).record; "
            "print(json.dumps([ray.is_initialized(), rec['execution'], rec['counts']['processed']]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [False, "driver", N]


def test_a_ray_started_early_is_stopped_when_the_plan_holds_nothing(tmp_path):
    """More new inputs than local_max_rows start Ray while the driver scans; when every one of
    them is then rejected at the scan, the pass never uses it and the run shuts it down."""
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"r{k}", "image": f"gone-{k}.png"}) + "\n" for k in range(12)))
    write_config(tmp_path, {"source": {"path": str(manifest)}, "store": str(tmp_path / "s"),
                            "execution": {"local_max_rows": 5}})
    code = ("import json, ray; from core.config import load_config; from pipeline import runner; "
            "from pipeline.execution import RayStart; started = []; init = RayStart.__init__; "
            "RayStart.__init__ = lambda self, *a: started.append(self) or init(self, *a); "
            f"rec = runner.run(load_config({str(tmp_path / 'config.yaml')!r}), log=lambda s: None).record; "
            "[s._ready.wait(120) for s in started]; "   # Ray up (or down again) before it is looked at
            "print(json.dumps([len(started), ray.is_initialized(), rec['counts']['accepted'], rec['rejects_by_reason']]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [1, False, 0, {"missing_file": 12}]


def test_a_file_rewritten_in_place_is_seen_despite_the_hash_cache(own, tmp_path):
    folder, manifest = own
    store = tmp_path / "s"
    go(folder, manifest, store)
    assert (store / "cache" / "hashes.parquet").is_file()
    row = rows_of(manifest)[7]
    target = manifest.parent / "media" / "rewritten.wav"
    target.write_bytes((manifest.parent / row["audio"]).read_bytes())
    rows = rows_of(manifest)
    rows[7]["audio"] = "media/rewritten.wav"
    write_rows(manifest, rows)
    assert go(folder, manifest, store)["counts"]["processed"] == 0   # same bytes, new path: nothing to do
    target.write_bytes(_audio(row["label"], np.random.default_rng(3)))   # same path, new content
    rec = go(folder, manifest, store)
    assert rec["counts"]["processed"] == 1 and rec["counts"]["partial"] == 1


def test_retry_rejects_reprocesses_only_those_rejects(tmp_path, ray_session):
    """``--retry-rejects REASON``: the samples stored as rejected with that reason are processed
    again (here rejected again, by a new run), every other row is left as it was."""
    from deltalake import DeltaTable

    manifest = make_demo(tmp_path / "data", n=12)
    store = tmp_path / "store"
    run(config(tmp_path, manifest, store), log=lambda s: None)
    before_r = {r["id"]: r for r in DeltaTable(str(store / "rejects")).to_pyarrow_table().to_pylist()}
    before_f = {(r["id"], r["aug"]): r["run_id"] for r in DeltaTable(str(store / "features")).to_pyarrow_table(
        columns=["id", "aug", "run_id"]).to_pylist()}
    retried = {k for k, r in before_r.items() if r["reason"] in ("image_blank", "audio_silent")}
    assert len(retried) == 2
    record = run(config(tmp_path, manifest, store, {"execution": {"retry_rejects": ["image_blank", "audio_silent"]}}),
                 log=lambda s: None).record
    assert record["counts"]["processed"] == 2 and record["counts"]["unchanged"] == len(before_f) + len(before_r) - 2
    after_r = {r["id"]: r for r in DeltaTable(str(store / "rejects")).to_pyarrow_table().to_pylist()}
    after_f = {(r["id"], r["aug"]): r["run_id"] for r in DeltaTable(str(store / "features")).to_pyarrow_table(
        columns=["id", "aug", "run_id"]).to_pylist()}
    assert after_f == before_f                                                  # no accepted row touched
    assert {k for k in after_r if after_r[k]["run_id"] == record["run_id"]} == retried
    assert {k: (r["reason"], r["run_id"]) for k, r in after_r.items() if k not in retried} == \
        {k: (r["reason"], r["run_id"]) for k, r in before_r.items() if k not in retried}
