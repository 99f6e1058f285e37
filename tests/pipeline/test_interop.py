"""The store and its exports open in the tools users already have: Hugging Face ``datasets``
(streaming and not), ``webdataset``, ``ray.data``, ``deltalake`` and polars. One small store is
made per module; every check compares what a tool reads with the features table."""
from __future__ import annotations

import glob
import io
import json
import sys
import tarfile
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from core.store import Store
from pipeline.demo import make_demo
from pipeline.export import FORMATS, export, hf_split, plan_export
from pipeline.runner import run
from pipeline.sinks import sample_key
from tests.pipeline.helpers import config

COLUMNS = ["id", "label", "split", "aug", "has_image", "has_text", "has_audio", "image_emb", "meta", "shard"]


@pytest.fixture(scope="module")
def interop(tmp_path_factory, ray_session):
    folder = tmp_path_factory.mktemp("interop")
    manifest = make_demo(folder / "data", n=20, seed=2)   # two samples without each modality
    store = folder / "store"
    cfg = config(folder, manifest, store, {"stages": {"augment": {"copies": {"params": {"copies": 1}},
                                                                  "image": {}, "text": {}, "audio": {}}}})
    run(cfg, log=lambda s: None)
    feats = {(r["id"], r["aug"]): r for r in Store(str(store)).read("features", columns=COLUMNS).to_pylist()}
    out = {}
    for fmt in FORMATS:
        out[fmt] = folder / f"export-{fmt}"
        export(plan_export(Store(str(store)), None, [], augmented=False), fmt, str(out[fmt]))
    return SimpleNamespace(store=store, shards=sorted(glob.glob(str(store / "samples" / "*" / "*.tar"))),
                           feats=feats, originals={k[0]: r for k, r in feats.items() if k[1] == 0}, out=out)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """Hugging Face ``datasets`` offline, with every cache under a temporary folder."""
    home = tmp_path_factory.mktemp("hf")
    with pytest.MonkeyPatch.context() as mp:
        for name, value in (("HF_HOME", home), ("HF_DATASETS_CACHE", home / "datasets"),
                            ("HF_DATASETS_OFFLINE", "1"), ("HF_HUB_OFFLINE", "1")):
            mp.setenv(name, str(value))
        import datasets

        datasets.disable_progress_bars()
        yield SimpleNamespace(load=lambda *a, **kw: datasets.load_dataset(*a, cache_dir=str(home / "builds"), **kw),
                              datasets=datasets)


def member(store: Path, shard: str, name: str) -> bytes:
    with tarfile.open(store / shard) as tar:
        return tar.extractfile(name).read()


def check_decoded(row: dict, feat: dict, store: Path, image_col: str, audio_col: str, text_col: str) -> None:
    """One sample with every modality, as a tool decoded it, against its features row: the image's
    size and the audio's rate and length as cleanup measured them, the text's length, and each
    equal to the media in the store shard the row names (decoded with PIL and soundfile)."""
    import soundfile as sf

    meta = json.loads(feat["meta"])
    key = sample_key(feat["id"], feat["aug"])
    image, audio = row[image_col], row[audio_col]
    assert isinstance(image, Image.Image) and image.size == (meta["image_width"], meta["image_height"])
    stored = Image.open(io.BytesIO(member(store, feat["shard"], f"{key}.jpg")))
    np.testing.assert_array_equal(np.asarray(image.convert("RGB")), np.asarray(stored.convert("RGB")))
    samples = audio.get_all_samples()
    assert samples.sample_rate == meta["audio_sample_rate"]
    assert samples.data.shape[-1] / samples.sample_rate == pytest.approx(meta["audio_duration_s"], abs=0.01)
    wave, _ = sf.read(io.BytesIO(member(store, feat["shard"], f"{key}.flac")), dtype="float32", always_2d=True)
    np.testing.assert_allclose(samples.data.numpy()[0], wave[:, 0], atol=1e-4)
    assert len(row[text_col]) == meta["text_n_chars"]
    assert row[text_col].encode() == member(store, feat["shard"], f"{key}.txt")


def complete(feat: dict) -> bool:
    return feat["has_image"] and feat["has_text"] and feat["has_audio"]


# -- the store's own shards -----------------------------------------------------------------------
@pytest.mark.parametrize("streaming", [False, True], ids=["arrow", "streaming"])
def test_store_shards_load_in_hf_datasets(interop, hf, streaming):
    ds = hf.load("webdataset", data_files=interop.shards, split="train", streaming=streaming)
    assert {"jpg", "txt", "flac", "json"} <= set(ds.features)
    assert isinstance(ds.features["jpg"], hf.datasets.Image) and isinstance(ds.features["flac"], hf.datasets.Audio)
    rows = list(ds.cast_column("jpg", hf.datasets.Image(decode=False)).cast_column("flac", hf.datasets.Audio(decode=False)))
    assert len(rows) == len(interop.feats)
    for row in rows:
        feat = interop.feats[(row["json"]["id"], row["json"]["aug"])]
        assert row["json"]["label"] == feat["label"] and row["json"]["split"] == feat["split"]
        assert (row["jpg"] is not None, row["txt"] != "", row["flac"] is not None) == \
               (feat["has_image"], feat["has_text"], feat["has_audio"])   # absent: null, or an empty text
        assert (row["jpg"] or {}).get("bytes", b"") == (member(interop.store, feat["shard"], row["__key__"] + ".jpg")
                                                        if feat["has_image"] else b"")
    assert any(r["jpg"] is None for r in rows) and any(r["flac"] is None for r in rows) and any(r["txt"] == "" for r in rows)
    decoded = next(r for r in ds if r["json"]["aug"] == 0 and complete(interop.feats[(r["json"]["id"], 0)]))
    check_decoded(decoded, interop.feats[(decoded["json"]["id"], 0)], interop.store, "jpg", "flac", "txt")


def test_store_shards_read_with_webdataset_ray_data_and_mmpipe(interop):
    import ray
    import webdataset as wds

    from pipeline.sources import read_webdataset

    samples = list(wds.WebDataset(interop.shards, shardshuffle=False).decode("rgb8"))
    assert len(samples) == len(interop.feats)
    for s in samples:
        feat = interop.feats[(s["json"]["id"], s["json"]["aug"])]
        assert s["json"]["label"] == feat["label"] and s["json"]["has_image"] == feat["has_image"]
        assert ("jpg" in s, s["txt"] != "", "flac" in s) == (feat["has_image"], feat["has_text"], feat["has_audio"])
        if feat["has_image"]:
            meta = json.loads(feat["meta"])
            assert s["jpg"].shape == (meta["image_height"], meta["image_width"], 3)
    # Ray Data: one row per sample (an absent image or clip is a missing value)
    rows = ray.data.read_webdataset(interop.shards, decoder=None).select_columns(["__key__", "json", "txt"]).take_all()
    assert len(rows) == len(interop.feats)
    labels = Counter(json.loads(r["json"])["label"] for r in rows)
    assert labels == Counter(f["label"] for f in interop.feats.values())
    # mmpipe reads its own shards back as an input: an empty .txt is no text
    records = {r.id: r for r in read_webdataset(str(interop.store / "samples" / "*" / "*.tar"))}
    assert len(records) == len(interop.feats)
    for (rid, aug), feat in interop.feats.items():
        rec = records[sample_key(rid, aug)]
        assert {m: m in rec.values for m in ("text", "image", "audio")} == \
               {m: feat[f"has_{m}"] for m in ("text", "image", "audio")}
        assert rec.label == feat["label"]


def test_store_tables_read_with_deltalake_and_polars(interop):
    import polars as pl
    from deltalake import DeltaTable, QueryBuilder

    dt = DeltaTable(str(interop.store / "features"))
    counts = pa.table(QueryBuilder().register("f", dt).execute(
        "SELECT label, count(*) AS n FROM f WHERE aug = 0 GROUP BY label").read_all())
    assert dict(zip(counts["label"].to_pylist(), counts["n"].to_pylist())) == \
           Counter(f["label"] for f in interop.originals.values())
    df = pl.read_delta(str(interop.store / "features"))
    assert df.height == len(interop.feats)
    assert dict(df.filter(pl.col("aug") == 0).select("id", "label").iter_rows()) == \
           {rid: f["label"] for rid, f in interop.originals.items()}
    rejects = pl.read_delta(str(interop.store / "rejects"))
    assert set(rejects["reason"]) >= {"duplicate", "image_corrupt", "missing_file"}


# -- mmpipe export ------------------------------------------------------------------------------
def test_parquet_export_loads_in_hf_datasets_and_polars(interop, hf):
    import polars as pl

    out = interop.out["parquet"]
    by_split = Counter(f["split"] for f in interop.originals.values())
    ds = hf.load("parquet", data_dir=str(out / "data"))
    assert {name: ds[name].num_rows for name in ds} == {hf_split(s): n for s, n in by_split.items()}
    assert isinstance(ds["train"].features["image"], hf.datasets.Image)
    assert isinstance(ds["train"].features["audio"], hf.datasets.Audio)
    card = hf.load(str(out))   # the folder, its splits from the dataset card
    assert {name: card[name].num_rows for name in card} == {hf_split(s): n for s, n in by_split.items()}
    plain = ds["train"].cast_column("image", hf.datasets.Image(decode=False)).cast_column("audio", hf.datasets.Audio(decode=False))
    for row in plain:
        feat = interop.originals[row["id"]]
        assert row["label"] == feat["label"] and row["split"] == feat["split"] and row["aug"] == 0
        assert (row["image"] is not None, row["text"] is not None, row["audio"] is not None) == \
               (feat["has_image"], feat["has_text"], feat["has_audio"])
        np.testing.assert_array_equal(np.asarray(row["image_emb"], np.float32), np.asarray(feat["image_emb"], np.float32))
    decoded = next(r for r in ds["train"] if complete(interop.originals[r["id"]]))
    check_decoded(decoded, interop.originals[decoded["id"]], interop.store, "image", "audio", "text")
    streamed = hf.load("parquet", data_dir=str(out / "data"), split="train", streaming=True)
    first = next(iter(streamed))
    assert first["label"] == interop.originals[first["id"]]["label"]
    assert sum(1 for _ in streamed) == by_split["train"]
    df = pl.read_parquet(str(out / "data" / "*" / "*.parquet"))
    assert dict(df.select("id", "label").iter_rows()) == {rid: f["label"] for rid, f in interop.originals.items()}
    assert df.filter(pl.col("image").is_null()).height == sum(not f["has_image"] for f in interop.originals.values())


def test_webdataset_export_loads_in_hf_datasets_and_webdataset(interop, hf):
    import webdataset as wds

    out = interop.out["webdataset"]
    by_split = Counter(f["split"] for f in interop.originals.values())
    ds = hf.load("webdataset", data_dir=str(out), streaming=True)
    counts = {name: sum(1 for _ in ds[name].select_columns(["json"])) for name in ds}
    assert counts == {hf_split(s): n for s, n in by_split.items()}
    row = next(r for r in ds["train"] if complete(interop.originals[r["json"]["id"]]))
    check_decoded(row, interop.originals[row["json"]["id"]], interop.store, "jpg", "flac", "txt")
    samples = list(wds.WebDataset(sorted(glob.glob(str(out / "*" / "*.tar"))), shardshuffle=False).decode("rgb8"))
    assert {s["json"]["id"]: s["json"]["label"] for s in samples} == {rid: f["label"] for rid, f in interop.originals.items()}


def test_export_card_and_croissant_describe_what_was_written(interop):
    store = Store(str(interop.store))
    plan = plan_export(store, None, [], augmented=False)
    rejects = Counter(store.read("rejects", columns=["reason"])["reason"].to_pylist())
    for fmt in FORMATS:
        out = interop.out[fmt]
        card = (out / "README.md").read_text()
        assert "configs:" in card and f"features-table version {plan.version}" in card
        for label, n in Counter(f["label"] for f in interop.originals.values()).items():
            assert f"| {label} |" in card and f"| {n} |" in card
        for reason, n in rejects.items():
            assert f"| {reason} | {n} |" in card
        for stage, fp in plan.run["fingerprints"].items():
            assert f"| {stage} | {fp} |" in card
        meta = json.loads((out / "croissant.json").read_text())
        assert meta["@type"] == "sc:Dataset" and meta["conformsTo"] == "http://mlcommons.org/croissant/1.0"
        files = sorted(glob.glob(str(out / meta["distribution"][0]["includes"])))
        assert files and len(files) == len(glob.glob(str(out / "**" / ("*.parquet" if fmt == "parquet" else "*.tar")),
                                                     recursive=True))
        fields = {f["name"] for f in meta["recordSet"][0]["field"]}
        assert {"image", "text", "audio"} <= fields
    parquet_fields = {f["name"] for f in json.loads((interop.out["parquet"] / "croissant.json").read_text())["recordSet"][0]["field"]}
    assert parquet_fields <= set(pq.read_schema(glob.glob(str(interop.out["parquet"] / "data" / "*" / "*.parquet"))[0]).names)


def test_export_of_a_split_and_augmented_copies(interop, tmp_path):
    store = Store(str(interop.store))
    plan = plan_export(store, 0, ["train"], augmented=True)
    result = export(plan, "parquet", str(tmp_path / "out"))
    train = {k: f for k, f in interop.feats.items() if f["split"] == "train"}
    assert result.rows == len(train) and any(aug > 0 for _, aug in train)
    table = pa.concat_tables(pq.read_table(p) for p in glob.glob(str(tmp_path / "out" / "data" / "*" / "*.parquet")))
    assert sorted(zip(table["id"].to_pylist(), table["aug"].to_pylist())) == sorted(train)
    assert [p.name for p in (tmp_path / "out" / "data").iterdir()] == ["train"]


@pytest.mark.parametrize("which, args, message", [
    ("store", ["--format", "parquet", "--version", "9"], r"features table of .* has no version 9 \(versions 0\.\.0\)$"),
    ("store", ["--format", "csv"], r"--format must be one of parquet, webdataset, not 'csv'$"),
    ("store", ["--format", "parquet", "--split", "train,holdout"], r"no split holdout at features version 0 \(splits: .*\)$"),
    ("empty", ["--format", "webdataset"], r"store .* has no features table: nothing to export"),
    ("missing", ["--format", "webdataset"], r"store not found: .*nothere$"),
])
def test_export_user_errors_are_one_line(interop, tmp_path, monkeypatch, capsys, which, args, message):
    import re

    from pipeline import cli

    store = {"store": interop.store, "empty": tmp_path / "empty", "missing": tmp_path / "nothere"}[which]
    (tmp_path / "empty").mkdir()
    monkeypatch.setattr(sys, "argv", ["mmpipe", "export", str(store), "--out", str(tmp_path / "out"), *args])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and re.match(r"mmpipe: error: " + message, err[0]), err
    assert not (tmp_path / "out").exists()


# -- the shard layout, without Ray ----------------------------------------------------------------
def test_every_shard_opens_with_the_samples_that_have_the_most_members(tmp_path):
    """Rows without an image or a text come first in the block; in the shard the samples with
    every member come first, so the five that HF reads its columns from agree; every sample has
    a ``.txt`` (empty without a text) and a ``.json`` with the same keys."""
    from pipeline.sinks import write_block_shards
    from tests.stages.helpers import make_batch

    jpg = io_bytes(Image.new("RGB", (8, 8), (200, 30, 30)), "JPEG")
    n = 12
    batch = make_batch(image=[None] * 4 + [jpg] * (n - 4), text=["a", None, "c", None] + [f"t{i}" for i in range(n - 4)],
                       audio=[b"fLaC-clip"] * n)
    batch["aug"] = np.zeros(n, dtype=np.int64)
    store = Store(str(tmp_path / "store"))
    store.fs.create_dir(store.path_of("samples", "r1"), recursive=True)
    write_block_shards([batch], store.uri, "r1", max_count=100)
    (shard,) = glob.glob(str(tmp_path / "store" / "samples" / "r1" / "*.tar"))
    with tarfile.open(shard) as tar:
        members = [(m.name.split(".", 1), tar.extractfile(m).read()) for m in tar.getmembers()]
    samples: dict[str, dict[str, bytes]] = {}
    for (key, ext), data in members:
        samples.setdefault(key, {})[ext] = data
    sets = [tuple(sorted(s)) for s in samples.values()]
    assert sets[:8] == [("flac", "jpg", "json", "txt")] * 8 and set(sets[8:]) == {("flac", "json", "txt")}
    assert [samples[f"row{i}"]["txt"] for i in range(4)] == [b"a", b"", b"c", b""]
    metas = [json.loads(s["json"]) for s in samples.values()]
    assert len({tuple(sorted(m)) for m in metas}) == 1 and all(isinstance(m["meta"], str) for m in metas)
    assert [m["has_image"] for m in metas] == [True] * 8 + [False] * 4


def test_a_webdataset_export_brings_older_shards_to_the_current_layout():
    from pipeline.export import _normalize_sample

    old = {"jpg": b"\xff\xd8", "json": json.dumps({"id": "a", "label": "x", "meta": {"image_width": 8},
                                                   "aug_params": {}, "dropped": {}}).encode()}
    sample = _normalize_sample("a", old)
    meta = json.loads(sample["json"])
    assert sample["txt"] == b"" and sample["jpg"] == b"\xff\xd8" and sample["__key__"] == "a"
    assert meta["meta"] == '{"image_width": 8}' and meta["aug_params"] == "{}"
    assert (meta["has_image"], meta["has_text"], meta["has_audio"]) == (True, False, False)


def io_bytes(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()
