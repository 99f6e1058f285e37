"""``mmpipe why`` and ``mmpipe funnel`` on a real run's store."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.compute as pc
import pytest

from core.store import Store
from pipeline.demo import make_demo
from pipeline.explain import UnknownId, funnel, run_record, why
from pipeline.runner import run
from tests.pipeline.helpers import config

MMPIPE = str(Path(sys.executable).parent / "mmpipe")


@pytest.fixture(scope="module")
def store(tmp_path_factory, ray_session):
    folder = tmp_path_factory.mktemp("explain")
    manifest = make_demo(folder / "data", n=16)
    path = folder / "store"
    cfg = config(folder, manifest, path, {"stages": {"augment": {"copies": {"params": {"copies": 1}}, "image": {}, "text": {}, "audio": {}}}})
    result = run(cfg, log=lambda s: None)
    return path, result.record


def test_why_tells_an_accepted_samples_story(store):
    path, record = store
    story = why(Store(str(path)), "s00000")
    assert story["status"] == "accepted" and story["label"] and story["shard"].startswith(f"samples/{record['run_id']}/")
    assert story["duplicates"] == ["dup-of-s00000"]          # the demo's exact copy of it
    assert story["runs"] == [{"run": record["run_id"], "table": "features", "version": record["versions"]["features"]}]
    assert set(story["sha"]) >= {"sample"} and story["modalities"]
    if story["split"] == "train":   # augmented copies are made of training samples
        assert story["copies"] and all(c["params"] for c in story["copies"])


def test_why_tells_a_rejected_samples_story(store):
    path, record = store
    dup = why(Store(str(path)), "dup-of-s00000")
    assert (dup["status"], dup["stage"], dup["reason"], dup["kept_id"]) == ("rejected", "ingest", "duplicate", "s00000")
    blank = why(Store(str(path)), "bad-blank-image")
    assert (blank["reason"], blank["stage"]) == ("image_blank", "cleanup.image") and "blank_std" in blank["detail"]
    assert blank["runs"] == [{"run": record["run_id"], "table": "rejects", "version": record["versions"]["rejects"]}]
    with pytest.raises(UnknownId):
        why(Store(str(path)), "no-such-id")


def test_the_funnel_accounts_for_every_row(store):
    path, record = store
    steps = funnel(run_record(Store(str(path)), None))
    assert [s["step"] for s in steps][:3] == ["ingest.scan", "plan", "ingest"]
    assert steps[0]["in"] == record["counts"]["input"]
    for before, after in zip(steps, steps[1:]):
        assert after["in"] == before["out"]
    for s in steps:
        assert s["out"] == s["in"] + s.get("added", 0) - s.get("unchanged", 0) - sum(s["rejected"].values())
    rejected = {}
    for s in steps:
        for reason, n in s["rejected"].items():
            rejected[reason] = rejected.get(reason, 0) + n
    assert rejected == record["run_rejects_by_reason"]
    copies = sum(s.get("added", 0) for s in steps)
    assert steps[-1]["out"] == record["counts"]["accepted"] + copies - record["counts"]["aug_rejected"]


def test_cli_why_and_funnel(store, tmp_path):
    path, record = store
    out = subprocess.run([MMPIPE, "why", str(path), "dup-of-s00000", "--json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and json.loads(out.stdout)["kept_id"] == "s00000"
    missing = subprocess.run([MMPIPE, "why", str(path), "nope"], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and missing.stderr.strip() == f"mmpipe: error: no sample 'nope' in {path} (neither accepted nor rejected)"
    png = tmp_path / "f.png"
    shown = subprocess.run([MMPIPE, "funnel", str(path), "--png", str(png)], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and "rejects by reason" in shown.stdout and "image_blank=1" in shown.stdout
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    bad_run = subprocess.run([MMPIPE, "funnel", str(path), "--run", "nope"], capture_output=True, text=True, timeout=60)
    assert bad_run.returncode == 2 and bad_run.stderr.startswith("mmpipe: error: no run 'nope'")


def test_diff_between_two_versions_says_what_changed_and_why(tmp_path, ray_session):
    from pipeline.explain import diff

    manifest = make_demo(tmp_path / "data", n=10)
    path = tmp_path / "store"
    run(config(tmp_path, manifest, path), log=lambda s: None)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    edited = next(r for r in rows if r["id"] == "s00001")
    edited["text"] = "an entirely different caption about the open ocean"
    gone = rows.pop(next(k for k, r in enumerate(rows) if r["id"] == "s00002"))
    rows.append({"id": "newcomer", "text": "a fresh sample of text here", "label": "city"})
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    record = run(config(tmp_path, manifest, path, {"stages": {"features": {"audio": {"params": {"n_mfcc": 13}}}}}),
                 log=lambda s: None).record
    d = diff(Store(str(path)), 0, record["versions"]["features"])
    assert (d["added"], d["removed"]) == (1, 1) and d["examples"]["added"] == ["newcomer"]
    assert d["examples"]["removed"] == [gone["id"]]
    assert d["modalities"]["text"] == {"content": 1}
    with_audio = Store(str(path)).count("features", (pc.field("aug") == 0) & pc.field("has_audio"))
    assert d["modalities"]["audio"]["stages"] >= with_audio - 1     # every stored row with audio, recomputed
    assert set(d["stages"]) == {"features.audio"}
    assert d["changed"] + d["unchanged"] + d["added"] == Store(str(path)).count("features", pc.field("aug") == 0)
    shown = subprocess.run([MMPIPE, "diff", str(path), "--from", "0"], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and "1 added, 1 removed" in shown.stdout and "stage features.audio" in shown.stdout
    bad = subprocess.run([MMPIPE, "diff", str(path), "--from", "7"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("mmpipe: error: the features table of")
