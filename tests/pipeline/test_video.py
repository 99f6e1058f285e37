"""Video end to end: manifest rows with clips through the Ray Data path (cleanup, the audio track,
near-duplicate clips, augmentation, features), the stored layout read without mmpipe, reruns,
training and prediction on four modalities."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from deltalake import DeltaTable

from pipeline.demo import CLASSES, CLIP_FPS, _clip, make_demo
from pipeline.cli import predict_records
from pipeline.runner import run
from stages.video import decode_clip, encode_mp4, frames_from_bytes, probe
from tests.conftest_http import body, http_server, network_guard  # noqa: F401
from tests.pipeline.helpers import config
from training.train import train

VIDEO_STAGES = {"stages": {
    "cleanup": {"video": {"params": {"max_side": 64, "fps": 8, "frames": 8, "min_duration_s": 0.5}}},
    "augment": {"copies": {"params": {"copies": 1}}, "video": {}},
    "features": {"video": {"encoder": "framestats"}},
}}


def reencoded(clip: bytes) -> bytes:
    """The same clip as a re-upload: scaled to 3/4, re-encoded at a lower quality, no audio."""
    frames = decode_clip(clip, fps=CLIP_FPS, max_side=48, max_frames=1000, max_duration_s=60).frames
    return encode_mp4(frames, CLIP_FPS, crf=30)


@pytest.fixture(scope="module")
def video_run(tmp_path_factory, ray_session):
    folder = tmp_path_factory.mktemp("video")
    manifest = make_demo(folder / "data", n=8, videos=16)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    media = folder / "data" / "media"
    (media / "copy.mp4").write_bytes(reencoded((media / "v00000.mp4").read_bytes()))
    rng = np.random.default_rng(7)
    (media / "own.wav").write_bytes((media / "s00001.wav").read_bytes())
    (media / "withaudio.mp4").write_bytes(_clip("ocean", rng))
    text = {r["id"]: r["text"] for r in rows if r.get("text")}   # a copy keeps its caption: the same sample
    copy = {"id": "copy-of-v00000", "label": CLASSES[0], "video": "media/copy.mp4",
            **({"text": text["v00000"]} if "v00000" in text else {})}
    at = next(i for i, r in enumerate(rows) if r["id"] == "v00000") + 1   # usually in the original's block
    rows[at:at] = [copy]
    rows += [{"id": "own-audio", "label": "ocean", "video": "media/withaudio.mp4", "audio": "media/own.wav"}]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    store = folder / "store"
    cfg = config(folder, manifest, store, VIDEO_STAGES)
    result = run(cfg, log=lambda s: None)
    return folder, manifest, store, cfg, result, rows


def in_driver(cfg):
    """The same config with the processing pass in this process (reruns: no actor start-up)."""
    return cfg.model_copy(update={"execution": cfg.execution.model_copy(update={"local_max_rows": 10_000})})


def features(store, columns=None):
    return DeltaTable(str(store / "features")).to_pyarrow_table(columns=columns)


def test_video_rows_are_cleaned_featurised_and_stored(video_run):
    folder, manifest, store, cfg, result, rows = video_run
    rejects = {r["id"]: r for r in DeltaTable(str(store / "rejects")).to_pyarrow_table().to_pylist()}
    assert rejects["bad-truncated-video"]["reason"] == "video_corrupt"
    assert rejects["bad-black-video"]["reason"] == "video_blank"
    assert rejects["bad-audio-only-video"]["reason"] == "video_no_stream"
    # a re-encoded, rescaled copy: other bytes (no exact match), caught by its frames' perceptual hashes;
    # the first of the two to reach the index is kept (blocks in flight together race for it)
    pair = {"copy-of-v00000": "v00000", "v00000": "copy-of-v00000"}
    (dropped,) = [i for i in pair if rejects.get(i, {}).get("reason") == "duplicate"]
    assert rejects[dropped]["detail"] == pair[dropped]
    # ... and no two different clips are taken for each other (16 clips, four per class)
    assert {i for i, r in rejects.items() if r["reason"] == "duplicate"} == {dropped, "dup-of-s00000"}
    feats = {(r["id"], r["aug"]): r for r in features(store).to_pylist()}
    assert (pair[dropped], 0) in feats and (dropped, 0) not in feats
    clips = [r for r in rows if r.get("video") and r["id"].startswith("v") and r["id"] != dropped]
    assert len(clips) >= 15 and all((r["id"], 0) in feats for r in clips)
    dim = result.record["dims"]["video"]
    copied = [r for r in clips if (r["id"], 1) in feats]   # the train split's clips have a copy
    assert len(copied) >= 8
    for r in clips:
        for aug in (0, 1) if r in copied else (0,):
            row = feats[(r["id"], aug)]
            assert row["has_video"] and len(row["video_emb"]) == dim and np.abs(row["video_emb"]).sum() > 0
            # the clip's audio track became the row's audio, cleaned and featurised like any audio
            assert row["has_audio"] and row["sha_audio"] == f"video:{row['sha_video']}"
            assert json.loads(row["meta"])["audio_from_video"] is True
    for r in copied:
        assert "video" in json.loads(feats[(r["id"], 1)]["aug_params"])   # lineage of the copy's ops
    own = feats[("own-audio", 0)]
    assert own["has_audio"] and "audio_from_video" not in json.loads(own["meta"])
    image_rows = [v for (i, a), v in feats.items() if i.startswith("s")]
    assert image_rows and not any(v["has_video"] for v in image_rows)
    assert all(len(v["video_emb"]) == dim and not np.any(v["video_emb"]) for v in image_rows)   # zeros where absent


def test_shards_hold_the_clip_and_its_frames_for_webdataset(video_run):
    folder, manifest, store, cfg, result, rows = video_run
    shards = sorted(str(p) for p in (store / "samples").rglob("*.tar"))
    samples = {s["__key__"]: s for s in wds.WebDataset(shards, shardshuffle=False).decode()}
    key = next(k[: -len("_aug1")] for k in sorted(samples) if k.startswith("v") and k.endswith("_aug1"))
    clip = samples[key]
    assert probe(clip["mp4"]).codec == "h264" and max(probe(clip["mp4"]).width, probe(clip["mp4"]).height) <= 64
    frames = clip["video_frames.npy"]   # webdataset decodes .npy as numpy
    assert frames.shape[0] == 8 and frames.shape[-1] == 3 and frames.dtype == np.uint8
    assert "flac" in clip and clip["json"]["has_video"] is True
    copy = samples[f"{key}_aug1"]
    assert copy["mp4"] != clip["mp4"] and frames_from_bytes(_member(shards, f"{key}_aug1.video_frames.npy")).shape == frames.shape


def _member(shards: list[str], name: str) -> bytes:
    for shard in shards:
        with tarfile.open(shard) as tar:
            if name in tar.getnames():
                return tar.extractfile(name).read()
    raise KeyError(name)


def test_rerun_is_a_no_op_and_an_audio_change_redoes_the_clips_tracks(video_run, tmp_path):
    folder, manifest, store, cfg, result, rows = video_run
    cfg = in_driver(cfg)
    again = run(cfg, log=lambda s: None)
    assert again.record["counts"]["processed"] == 0
    before = {(r["id"], r["aug"]): r for r in features(store, ["id", "aug", "audio_emb", "video_emb"]).to_pylist()}
    changed = cfg.model_copy(deep=True)
    changed.stages["features"]["audio"]["params"] = {"n_mfcc": 13}
    third = run(changed, log=lambda s: None)
    after = {(r["id"], r["aug"]): r for r in features(store, ["id", "aug", "audio_emb", "video_emb", "has_audio"]).to_pylist()}
    assert third.record["counts"]["partial"] == len([k for k in after if k[1] == 0])
    track = after[("v00002", 0)]
    assert track["has_audio"] and len(track["audio_emb"]) != len(before[("v00002", 0)]["audio_emb"])
    assert track["video_emb"] == before[("v00002", 0)]["video_emb"]   # the clip itself was kept


def test_a_reencoded_clip_is_a_duplicate_of_the_stored_one(video_run, tmp_path):
    folder, manifest, store, cfg, result, rows = video_run
    media = folder / "data" / "media"
    (media / "late-copy.mp4").write_bytes(reencoded((media / "v00005.mp4").read_bytes()))
    extra = manifest.with_name("more.jsonl")   # beside the manifest: its relative paths resolve there
    original = next(r for r in rows if r["id"] == "v00005")
    copy = {"id": "late-copy", "label": CLASSES[1], "video": str(media / "late-copy.mp4"),
            **({"text": original["text"]} if original.get("text") else {})}
    extra.write_text(manifest.read_text() + json.dumps(copy) + "\n")
    later = in_driver(cfg).model_copy(update={"source": cfg.source.model_copy(update={"path": str(extra), "roots": [str(folder)]})})
    run(later, log=lambda s: None)
    rejects = {r["id"]: r for r in DeltaTable(str(store / "rejects")).to_pyarrow_table().to_pylist()}
    assert rejects["late-copy"]["reason"] == "duplicate" and rejects["late-copy"]["detail"] == "v00005"


def test_training_and_prediction_on_video(video_run, tmp_path):
    folder, manifest, store, cfg, result, rows = video_run
    local = cfg.model_copy(update={"training": cfg.training.model_copy(update={"engine": "local", "epochs": 3})})
    only = train(local, str(store), fusion="concat", modalities=["video"], name="video-only")
    assert only.metrics["modalities"] == ["video"]
    every = train(local, str(store), fusion="attention", name="all")   # default: every stored modality
    assert every.metrics["modalities"] == ["image", "text", "audio", "video"]
    assert len(every.metrics["modality_weights"]) == 4 and (every.model_dir / "modality_weights.png").is_file()
    clips = tmp_path / "clips.jsonl"
    media = folder / "data" / "media"
    clips.write_text("".join(json.dumps({"id": f"q{k}", "label": CLASSES[k % 4], "video": str(media / f"v{k:05d}.mp4")}) + "\n"
                             for k in range(4)))
    query = local.model_copy(update={"source": local.source.model_copy(update={"path": str(clips), "roots": [str(folder)]})})
    out = tmp_path / "pred.parquet"
    predict_records(query, every.model_dir, out)
    preds = pq.read_table(out).to_pylist()
    assert [p["id"] for p in preds] == ["q0", "q1", "q2", "q3"] and all(p["prediction"] in CLASSES for p in preds)


def test_clips_by_url_follow_the_fetch_rules(tmp_path, http_server, network_guard):
    """A clip's URL is fetched like any medium: a video/* or octet-stream body is a clip, another
    Content-Type is refused before decoding; private addresses stay blocked."""
    clip = _clip("ocean", np.random.default_rng(3))
    http_server.add("/a.mp4", body(clip, "video/mp4"))
    http_server.add("/b.mp4", body(clip, "application/octet-stream"))
    http_server.add("/page.mp4", body(b"<html></html>", "text/html"))
    rows = [{"id": "a", "label": "ocean", "video": http_server.url("/a.mp4")},
            {"id": "b", "label": "ocean", "video": http_server.url("/b.mp4"), "text": "the same clip, captioned"},
            {"id": "page", "label": "ocean", "video": http_server.url("/page.mp4")},
            {"id": "inside", "label": "ocean", "video": "http://10.0.0.1/clip.mp4"}]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    store = tmp_path / "store"
    cfg = config(tmp_path, manifest, store, {**VIDEO_STAGES, "execution": {"local_max_rows": 100},
                                             "source": {"http": {"allow_hosts": ["127.0.0.1"], "retries": 0}}})
    run(cfg, log=lambda s: None)
    rejects = {r["id"]: r["reason"] for r in DeltaTable(str(store / "rejects")).to_pyarrow_table().to_pylist()}
    assert rejects == {"page": "http_content_type", "inside": "url_blocked"}
    assert set(features(store, ["id"])["id"].to_pylist()) == {"a", "b"}
