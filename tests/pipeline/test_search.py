"""``mmpipe search`` over an aligned demo store: raw queries of one modality find stored samples
of another by class; bad query records come back as rejects; the vector index follows incremental
runs (added rows found, removed rows gone, the same as a fresh build)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from deltalake import DeltaTable
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from core.deletion import deleted_rows
from pipeline.demo import SR, _audio, make_demo
from training.index import VectorIndex
from pipeline.runner import run
from tests.pipeline.helpers import config
from training.align import align

MMPIPE = str(Path(sys.executable).parent / "mmpipe")
IN_DRIVER = {"execution": {"local_max_rows": 1000}}   # small runs: no Ray needed


@pytest.fixture(scope="module")
def aligned(tmp_path_factory):
    folder = tmp_path_factory.mktemp("search")
    manifest = make_demo(folder / "data", n=160)
    store = folder / "store"
    cfg = config(folder, manifest, store, IN_DRIVER)
    run(cfg, log=lambda s: None)
    cfg = cfg.model_copy(update={"training": cfg.training.model_copy(update={"engine": "local"}),
                                 "align": cfg.align.model_copy(update={"epochs": 30, "batch_size": 32, "dim": 32})})
    result = align(cfg, str(store), name="space")
    return folder, manifest, store, result.model_dir


def mmpipe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([MMPIPE, *args], capture_output=True, text=True, timeout=300)


def labels_of(line: dict) -> list[str]:
    return [r["label"] for r in line["results"]]


def test_a_text_and_a_sound_find_images_of_their_class(aligned, tmp_path):
    folder, _, store, model = aligned
    (tmp_path / "ocean.wav").write_bytes(_audio("ocean", np.random.default_rng(7)))
    queries = tmp_path / "q.jsonl"
    queries.write_text(json.dumps({"id": "reef", "text": "waves and a coral reef by the shore, surf and tide"}) + "\n" +
                       json.dumps({"id": "sound", "audio": "ocean.wav"}) + "\n")
    res = mmpipe("search", str(folder / "config.yaml"), "--store", str(store), "--model", str(model),
                 "--modality", "image", "--queries", str(queries), "--k", "10", "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    lines = {q["id"]: q for q in map(json.loads, res.stdout.splitlines())}
    assert set(lines) == {"reef", "sound"}
    for line in lines.values():
        assert len(line["results"]) == 10 and labels_of(line).count("ocean") >= 8, line   # chance: 2.5 of 10
        scores = [r["score"] for r in line["results"]]
        assert scores == sorted(scores, reverse=True)


def test_a_manifest_of_queries_reports_bad_records_as_rejects(aligned, tmp_path):
    folder, _, store, model = aligned
    sf.write(tmp_path / "desert.wav", np.zeros(SR, np.float32), SR)     # digital silence: audio_silent
    queries = tmp_path / "queries.jsonl"
    queries.write_text("\n".join(json.dumps(r) for r in [
        {"id": "q-forest", "text": "pine trees, moss and ferns under the canopy of the woodland"},
        {"id": "q-missing", "image": "nowhere.jpg"},
        {"id": "q-silent", "audio": "desert.wav"},
        {"id": "q-city", "text": "neon signs, traffic and a taxi on the avenue"}]) + "\n")
    res = mmpipe("search", str(folder / "config.yaml"), "--store", str(store), "--model", str(model),
                 "--modality", "text", "--queries", str(queries), "--k", "5", "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    lines = {q["id"]: q for q in map(json.loads, res.stdout.splitlines())}
    assert set(lines) == {"q-forest", "q-missing", "q-silent", "q-city"}
    assert lines["q-missing"]["reason"] == "missing_file" and lines["q-silent"]["reason"] == "audio_silent"
    assert labels_of(lines["q-forest"]).count("forest") >= 4 and labels_of(lines["q-city"]).count("city") >= 4
    human = mmpipe("search", str(folder / "config.yaml"), "--store", str(store), "--model", str(model),
                   "--modality", "audio", "--text", "sand dunes and a camel", "--k", "3")
    assert human.returncode == 0 and human.stdout.startswith("query:\n   1. s") and "label desert" in human.stdout


def test_search_user_errors_are_one_line(aligned):
    folder, _, store, model = aligned
    for argv, message in [
        (["--model", str(model), "--modality", "smell", "--text", "x"], "--modality must be one of"),
        (["--model", str(model), "--modality", "image"], "give a query"),
        (["--model", str(model), "--modality", "image", "--text", "x", "--queries", "q.jsonl"], "--queries takes the"),
        (["--model", str(model), "--modality", "image", "--image", "nope.jpg"], "--image: no such file"),
        (["--model", str(folder / "none"), "--modality", "image", "--text", "x"], "no alignment model at"),
    ]:
        res = mmpipe("search", str(folder / "config.yaml"), "--store", str(store), *argv)
        assert res.returncode == 2 and res.stderr.count("\n") == 1 and message in res.stderr, (argv, res.stderr)


def _ids(index: VectorIndex) -> set[str]:
    return set(pq.read_table(index.paths.ids)["id"].to_pylist())


@pytest.mark.parametrize("vectors", ["off", "on"], ids=["copy-on-write", "deletion-vectors"])
def test_the_index_follows_incremental_runs_and_equals_a_fresh_build(aligned, tmp_path, vectors):
    """Also when the dropped rows stay in their files, marked by deletion vectors."""
    folder, manifest, store, model = aligned
    work = tmp_path / "store"
    shutil.copytree(store, work)
    index = VectorIndex(work, "image", model)
    first = index.sync()
    assert first["mode"] in ("build", "current") and index.sync()["mode"] == "current"
    before = _ids(index)
    rows = [json.loads(s) for s in manifest.read_text().splitlines()]
    dropped = [r["id"] for r in rows if "image" in r][:5]
    extra = make_demo(tmp_path / "more", n=8, seed=3)
    new_rows = []
    for r in (json.loads(s) for s in extra.read_text().splitlines()):
        if "image" in r and r["id"].startswith("s"):
            shutil.copy(extra.parent / r["image"], manifest.parent / "media" / f"n{r['id']}.jpg")
            r.update(id=f"n{r['id']}", image=f"media/n{r['id']}.jpg")
            r.pop("audio", None)
            new_rows.append(r)
    changed = manifest.parent / "m2.jsonl"   # beside the media it names
    changed.write_text("".join(json.dumps(r) + "\n" for r in rows if r["id"] not in dropped) +
                       "".join(json.dumps(r) + "\n" for r in new_rows))
    overrides = {**IN_DRIVER, "execution": {**IN_DRIVER.get("execution", {}), "deletion_vectors": vectors}}
    run(config(tmp_path, changed, work, overrides), log=lambda s: None)
    assert bool(deleted_rows(DeltaTable(str(work / "features")))) == (vectors == "on")
    update = index.sync()
    assert update["mode"] == "update" and update["removed"] >= 5
    after = _ids(index)
    added = {r["id"] for r in new_rows}
    assert not (after & set(dropped)) and added <= after and before - set(dropped) <= after
    fresh = VectorIndex(work, "image", model)
    shutil.rmtree(fresh.paths.folder)
    assert fresh.sync()["mode"] == "build" and _ids(fresh) == after
    probe = np.random.default_rng(0).normal(size=(5, 32)).astype(np.float32)
    probe /= np.linalg.norm(probe, axis=1, keepdims=True)
    incremental = VectorIndex(work, "image", model)
    shutil.copytree(fresh.paths.folder, tmp_path / "fresh")   # the fresh build, for the comparison below
    assert [[r["id"] for r in q] for q in incremental.search(probe, 10)] == \
           [[r["id"] for r in q] for q in fresh.search(probe, 10)]
