"""End to end on tiny data: accounting, rejects with reasons, sinks readable by their libraries."""
from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
import webdataset as wds
from deltalake import DeltaTable

from pipeline.demo import make_demo
from pipeline.runner import run
from pipeline.sinks import sample_key
from tests.pipeline.helpers import config, shard_members, write_config

MMPIPE = str(Path(sys.executable).parent / "mmpipe")


def ids_in(store: Path) -> tuple[list[str], list[str]]:
    feats = DeltaTable(str(store / "features")).to_pyarrow_table(columns=["id", "aug"])
    rej = DeltaTable(str(store / "rejects")).to_pyarrow_table(columns=["id"])
    return feats.filter(pc.field("aug") == 0)["id"].to_pylist(), rej["id"].to_pylist()


def assert_accounting(store: Path, input_ids: set[str]) -> None:
    accepted, rejected = ids_in(store)
    assert len(accepted) == len(set(accepted)), "duplicate ids in features"
    assert len(rejected) == len(set(rejected)), "duplicate ids in rejects"
    assert not set(accepted) & set(rejected), "an id is both accepted and rejected"
    assert set(accepted) | set(rejected) == input_ids


def assert_shards_hold_features(store: Path, run_id: str) -> None:
    """Every feature row this run wrote is in the shard its ``shard`` column names, and the run's
    shards hold each sample once (a retried block rewrites its own shard, never a second copy)."""
    feats = DeltaTable(str(store / "features")).to_pyarrow_table(columns=["id", "aug", "shard", "run_id"])
    rows = feats.filter(pc.field("run_id") == run_id).to_pylist()
    keys_in = {f"samples/{run_id}/{name}": sorted({member.split(".", 1)[0] for member, _ in members})
               for name, members in shard_members(store / "samples" / run_id).items()}
    every = [k for keys in keys_in.values() for k in keys]
    assert len(every) == len(set(every)), "a sample is in two shards"
    assert rows and len(every) == len(rows)
    for r in rows:
        assert sample_key(r["id"], r["aug"]) in keys_in[r["shard"]], r


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, ray_session):
    folder = tmp_path_factory.mktemp("demo")
    manifest = make_demo(folder / "data", n=48)
    store = folder / "store"
    cfg = config(folder, manifest, store, {"stages": {"augment": {"copies": {"params": {"copies": 1}}, "image": {}, "text": {}, "audio": {}}}})
    result = run(cfg, log=lambda s: None)
    input_ids = {json.loads(line)["id"] for line in manifest.read_text().splitlines()}
    return store, result, input_ids


def test_accounting_invariant_on_demo_data(demo_run):
    store, result, input_ids = demo_run
    assert_accounting(store, input_ids)
    counts = result.record["counts"]
    assert counts["input"] == len(input_ids)
    assert counts["accepted"] + counts["rejected"] == counts["input"]


def test_demo_bad_rows_rejected_with_reasons(demo_run):
    store, _, _ = demo_run
    rej = {r["id"]: r for r in DeltaTable(str(store / "rejects")).to_pyarrow_table().to_pylist()}
    assert rej["bad-truncated-jpeg"]["reason"] == "image_corrupt"
    assert rej["bad-missing-file"]["reason"] == "missing_file"
    assert rej["bad-garbage-audio"]["reason"] == "audio_corrupt"
    assert rej["bad-empty-row"]["reason"] == "empty_record"
    assert rej["bad-outside-root"]["reason"] == "path_outside_root"
    assert rej["bad-blank-image"]["reason"] == "image_blank"
    assert rej["bad-silent-audio"]["reason"] == "audio_silent"
    assert rej["dup-of-s00000"]["reason"] == "duplicate" and rej["dup-of-s00000"]["detail"] == "s00000"


def test_features_table_reads_back_with_fixed_length_embeddings(demo_run):
    store, result, _ = demo_run
    table = DeltaTable(str(store / "features")).to_pyarrow_table()
    dims = result.record["dims"]
    for m in ("image", "text", "audio"):
        lengths = set(pc.list_value_length(table[f"{m}_emb"]).to_pylist())
        assert lengths == {dims[m]} and dims[m] > 0
        emb = np.stack(table[f"{m}_emb"].to_numpy(zero_copy_only=False))
        has = np.array(table[f"has_{m}"].to_pylist())
        assert np.all(emb[~has] == 0) and np.all(np.abs(emb[has]).sum(axis=1) > 0)
    assert set(table["split"].to_pylist()) <= {"train", "val", "test"}
    augmented = table.filter(pc.field("aug") > 0)
    assert augmented.num_rows > 0 and set(augmented["split"].to_pylist()) == {"train"}


def test_webdataset_shards_read_back(demo_run):
    store, result, _ = demo_run
    shards = sorted(str(p) for p in (store / "samples" / result.run_id).glob("*.tar"))
    assert shards
    samples = list(wds.WebDataset(shards, shardshuffle=False).decode("rgb8"))
    assert len(samples) == result.record["counts"]["samples_written"]
    by_key = {s["__key__"]: s for s in samples}
    s0 = by_key["s00000"]
    assert s0["json"]["label"] == "forest" and s0["json"]["aug"] == 0
    assert s0["jpg"].ndim == 3 and isinstance(s0["txt"], str)
    assert "flac" in s0 or "audio" not in s0["json"]["sha"]
    # The stage actors wrote them, one shard per Ray Data block, named from the block's rows.
    assert result.record["shard_writer"] == "actors" and len(shards) > 1
    assert_shards_hold_features(store, result.run_id)
    # Plain ustar members with one whole-second mtime: no per-member PAX header (a float mtime
    # made tarfile write one for every member).
    with tarfile.open(shards[0]) as tar:
        members = tar.getmembers()
    assert members and not any(m.pax_headers for m in members)
    assert len({m.mtime for m in members}) == 1 and isinstance(members[0].mtime, int)


def test_bad_manifest_rows_each_get_a_distinct_reason(tmp_path, ray_session):
    media = tmp_path / "data"
    manifest = make_demo(media, n=8)   # good rows + files to point at
    good = [json.loads(l) for l in manifest.read_text().splitlines()][:8]
    jpg = (media / "media" / "s00000.jpg").read_bytes()
    (media / "media" / "cut.jpg").write_bytes(jpg[: len(jpg) // 3])
    (media / "media" / "noise.wav").write_bytes(np.random.default_rng(0).bytes(4096))
    bad = [
        {"id": "truncated", "image": "media/cut.jpg"},
        {"id": "missing", "image": "media/nope.jpg"},
        {"id": "garbage-audio", "audio": "media/noise.wav"},
        {"id": "empty"},
        {"id": "outside", "image": "../outside.jpg"},
    ]
    (tmp_path / "outside.jpg").write_bytes(jpg)
    lines = [json.dumps(r) for r in good + bad] + ['{"id": "broken", "image": ', json.dumps({"id": "typed", "text": {"a": 1}})]
    manifest.write_text("\n".join(lines) + "\n")
    store = tmp_path / "store"
    run(config(tmp_path, manifest, store), log=lambda s: None)
    rej = {r["id"]: (r["reason"], r["detail"]) for r in DeltaTable(str(store / "rejects")).to_pyarrow_table().to_pylist()}
    line = len(good) + len(bad) + 1
    assert {k: rej[k][0] for k in ("truncated", "missing", "garbage-audio", "empty", "outside", f"manifest-line-{line}", "typed")} == {
        "truncated": "image_corrupt", "missing": "missing_file", "garbage-audio": "audio_corrupt",
        "empty": "empty_record", "outside": "path_outside_root", f"manifest-line-{line}": "bad_record", "typed": "bad_record"}
    assert f"line {line} is not valid JSON" in rej[f"manifest-line-{line}"][1] and "text is a dict" in rej["typed"][1]
    accepted, _ = ids_in(store)
    assert set(accepted) == {r["id"] for r in good}
    assert_accounting(store, {r["id"] for r in good + bad} | {f"manifest-line-{line}", "typed"})


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([MMPIPE, *args], capture_output=True, text=True, timeout=120)


def test_cli_unknown_config_key_is_one_line(tmp_path):
    cfg = write_config(tmp_path, {"stages": {"cleanup": {"image": {"params": {"blur_treshold": 3}}}}})
    res = _cli("run", str(cfg), "--input", str(tmp_path / "m.jsonl"), "--store", str(tmp_path / "s"))
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "blur_treshold" in lines[0] and "Traceback" not in res.stderr


def test_cli_top_level_unknown_key(tmp_path):
    cfg = write_config(tmp_path, {"nonsense": 1})
    res = _cli("run", str(cfg), "--input", "x.jsonl")
    assert res.returncode == 2 and res.stderr.strip() == "mmpipe: error: unknown config key 'nonsense'"


def test_cli_missing_manifest_is_one_line(tmp_path):
    cfg = write_config(tmp_path)
    res = _cli("run", str(cfg), "--input", str(tmp_path / "missing.jsonl"), "--store", str(tmp_path / "s"))
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [f"mmpipe: error: manifest not found: {tmp_path / 'missing.jsonl'}"]


def test_cli_set_override_and_bad_value(tmp_path):
    cfg = write_config(tmp_path)
    res = _cli("run", str(cfg), "--input", "x.jsonl", "--set", "execution.batch_size=-3")
    assert res.returncode == 2 and "execution.batch_size" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_cli_help_lists_commands():
    res = _cli("--help")
    for cmd in ("run", "train", "report", "demo", "predict"):
        assert cmd in res.stdout


def _ray_processes() -> dict[str, str]:
    """Live Ray processes (pid -> command line): its binaries and the Python processes that
    retitle themselves ``ray::...`` (workers, agents)."""
    out = {}
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cmd.startswith("ray::") or "/site-packages/ray/" in cmd:
            out[proc.name] = cmd.strip()
    return out


def test_cli_run_profile_starts_ray_in_the_background_and_leaves_nothing_running(tmp_path):
    """``mmpipe run --profile`` on a pass that needs actors: Ray starts while the driver scans and
    plans, is shut down while the driver commits, and no Ray process outlives the command. The
    profile splits the wall time in order and lists each stage's CPU seconds."""
    import time

    manifest = make_demo(tmp_path / "data", n=24)
    cfg = write_config(tmp_path, {"execution": {"local_max_rows": 0}})
    before = _ray_processes()   # this test process's own Ray, if an earlier test started one
    res = subprocess.run([MMPIPE, "run", str(cfg), "--input", str(manifest), "--store", str(tmp_path / "s"), "--profile"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    deadline = time.monotonic() + 10
    while (left := {p: c for p, c in _ray_processes().items() if p not in before}) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, left   # an agent orphaned by a raylet that was killed, not shut down, lives on
    assert "processing:" not in res.stderr   # the live progress line stays off a log (stderr is a pipe)
    out = res.stdout
    for line in ("profile (wall seconds):", "waiting for Ray to start", "pass start-up", "rows (first row in",
                 "commit", "Ray shutdown (after the commit)", "stage CPU seconds:", "(shard writing)", "cleanup.image"):
        assert line in out, line
    record = json.loads(next((tmp_path / "s" / "runs").glob("*.json")).read_text())
    prof = record["profile"]
    assert prof["started"] <= prof["pass_start"] <= prof["first_row"] <= prof["last_row"] <= prof["pass_end"]
    assert prof["shard_writing_s"] > 0 and record["execution"] == "ray-data"
    assert set(record["stages"]) == set(record["fingerprints"]) | {"ingest.scan"}   # shard writing is not a stage


def test_a_manifests_other_columns_travel_with_the_sample(tmp_path, ray_session):
    """A crawl's own columns (url, caption source, size, ...) are not an error: they land in the
    row's ``meta.source``, in the features table and in the sample's ``.json`` in its shard."""
    manifest = make_demo(tmp_path / "data", n=6)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()][:6]
    for k, r in enumerate(rows):
        r.update(url=f"https://example.com/{k}.jpg", caption_source="alt", width=96 + k, tags=["a", "b"])
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    store = tmp_path / "store"
    run(config(tmp_path, manifest, store), log=lambda s: None)
    feats = DeltaTable(str(store / "features")).to_pyarrow_table(columns=["id", "meta", "shard"]).to_pylist()
    assert len(feats) == 6
    for row in feats:
        k = int(row["id"][1:])
        source = json.loads(row["meta"])["source"]
        assert source == {"url": f"https://example.com/{k}.jpg", "caption_source": "alt", "width": 96 + k, "tags": ["a", "b"]}
        members = dict(shard_members(store / Path(row["shard"]).parent)[Path(row["shard"]).name])
        assert json.loads(json.loads(members[f"{row['id']}.json"])["meta"])["source"] == source   # meta: JSON text
