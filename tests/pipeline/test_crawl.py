"""Crawl-shaped input through the whole pipeline: http(s) references against a loopback server,
the bad-modality policy, and a fuzz run of randomly corrupted files with every id accounted for."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from deltalake import DeltaTable

from pipeline.demo import _audio, _image, make_demo
from pipeline.runner import run
from tests.conftest_http import body, fail_first, http_server, network_guard, redirect, slow, status  # noqa: F401
from tests.pipeline.helpers import config
from tests.pipeline.test_run import assert_accounting


def rejects(store: Path) -> dict[str, dict]:
    return {r["id"]: r for r in DeltaTable(str(store / "rejects")).to_pyarrow_table().to_pylist()}


def features(store: Path) -> dict[str, dict]:
    t = DeltaTable(str(store / "features")).to_pyarrow_table().to_pylist()
    return {r["id"]: r for r in t if r["aug"] == 0}


def test_http_references_end_accepted_or_rejected_with_their_reason(tmp_path, http_server, network_guard, ray_session):
    rng = np.random.default_rng(0)
    jpg = _image("forest", rng)
    http_server.add("/ok.jpg", body(jpg, "image/jpeg"))
    http_server.add("/flaky.jpg", fail_first(1, status(500), body(_image("desert", rng), "image/jpeg")))
    http_server.add("/gone.jpg", status(404))
    http_server.add("/html.jpg", body(b"<html></html>", "text/html"))
    http_server.add("/slow.jpg", slow(2.0, body(jpg, "image/jpeg")))
    http_server.add("/big.wav", body(b"\0" * 50_000, "audio/wav"))
    http_server.add("/hop.jpg", redirect("/ok.jpg"))
    http_server.add("/ok.wav", body(_audio("ocean", rng), "audio/wav"))
    http_server.add("/to-inside.jpg", redirect("http://10.0.0.1/admin.jpg"))
    port = http_server.base_url.rsplit(":", 1)[1]
    rows = [
        {"id": "ok", "label": "forest", "image": http_server.url("/ok.jpg"), "audio": http_server.url("/ok.wav")},
        {"id": "flaky", "label": "forest", "image": http_server.url("/flaky.jpg"), "text": "pine"},
        {"id": "redirected", "label": "forest", "image": http_server.url("/hop.jpg"), "text": "moss and fern"},
        {"id": "gone", "label": "forest", "image": http_server.url("/gone.jpg")},
        {"id": "html", "label": "forest", "image": http_server.url("/html.jpg")},
        {"id": "slow", "label": "forest", "image": http_server.url("/slow.jpg")},
        {"id": "big", "label": "ocean", "audio": http_server.url("/big.wav")},
        {"id": "ftp", "label": "ocean", "image": "ftp://127.0.0.1/x.jpg"},
        {"id": "metadata", "label": "ocean", "image": "http://169.254.169.254/latest/meta-data/iam.jpg"},
        {"id": "localhost", "label": "ocean", "image": f"http://localhost:{port}/ok.jpg"},
        {"id": "decimal", "label": "ocean", "image": f"http://2130706433:{port}/ok.jpg"},
        {"id": "redirect-inside", "label": "ocean", "image": http_server.url("/to-inside.jpg")},
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    store = tmp_path / "store"
    # The loopback server is allowed by name; every other way to reach inside is refused.
    http = {"timeout_s": 0.5, "retries": 1, "backoff_s": 0.05, "max_bytes": 40_000, "allow_hosts": ["127.0.0.1"]}
    run(config(tmp_path, manifest, store, {"source": {"http": http}, "stages": {"dedup": {"params": {"exact": ["image"]}}}}),
        log=lambda s: None)
    rej = {k: v["reason"] for k, v in rejects(store).items()}
    assert rej == {"gone": "http_status", "html": "http_content_type", "slow": "http_timeout",
                   "big": "http_too_large", "ftp": "url_scheme", "redirected": "duplicate", "metadata": "url_blocked",
                   "localhost": "url_blocked", "decimal": "url_blocked", "redirect-inside": "url_blocked"}
    assert set(features(store)) == {"ok", "flaky"}
    assert http_server.hits("/flaky.jpg") == 2 and http_server.hits("/gone.jpg") == 1
    assert_accounting(store, {r["id"] for r in rows})


def test_bad_modality_policy_drop_keeps_the_sample_without_it(tmp_path, ray_session):
    manifest = make_demo(tmp_path / "data", n=4)
    rows = [json.loads(l) for l in manifest.read_text().splitlines() if json.loads(l)["id"].startswith("s")]
    (manifest.parent / "media" / "cut.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    rows.append({"id": "half-bad", "label": "city", "image": "media/cut.jpg", "text": "neon street with traffic"})
    rows.append({"id": "all-bad", "label": "city", "image": "media/cut.jpg"})
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    store = tmp_path / "store"
    run(config(tmp_path, manifest, store, {"bad_modality": "drop_modality"}), log=lambda s: None)
    kept = features(store)["half-bad"]
    assert not kept["has_image"] and kept["has_text"]
    assert json.loads(kept["dropped"]) == {"image": "image_corrupt"}
    assert rejects(store)["all-bad"]["reason"] == "no_modality"
    # the default policy rejects the whole sample
    store2 = tmp_path / "store2"
    run(config(tmp_path, manifest, store2), log=lambda s: None)
    assert rejects(store2)["half-bad"]["reason"] == "image_corrupt"


def _corrupt(data: bytes, rng: np.random.Generator) -> bytes:
    kind = rng.integers(5)
    if kind == 0:
        return data[: rng.integers(0, len(data))]
    if kind == 1:
        b = bytearray(data)
        for i in rng.integers(0, len(b), size=rng.integers(1, 50)):
            b[i] = rng.integers(256)
        return bytes(b)
    if kind == 2:
        return rng.bytes(int(rng.integers(0, 5000)))
    if kind == 3:
        return data[:64] + rng.bytes(max(0, len(data) - 64))
    return b""


def fuzz_run(tmp_path: Path, per_modality: int) -> None:
    rng = np.random.default_rng(1)
    media = tmp_path / "media"
    media.mkdir()
    rows = []
    for k in range(per_modality):
        (media / f"i{k}.jpg").write_bytes(_corrupt(_image("city", rng), rng))
        buf = io.BytesIO()
        sf.write(buf, rng.normal(0, 0.2, 8000).astype(np.float32), 16000, format=["WAV", "FLAC", "OGG"][k % 3])
        (media / f"a{k}.wav").write_bytes(_corrupt(buf.getvalue(), rng))
        text = _corrupt(f"<p>caption {k} with some words</p>".encode(), rng).decode("utf-8", "replace")
        rows += [{"id": f"img{k}", "image": f"media/i{k}.jpg", "label": "x"},
                 {"id": f"aud{k}", "audio": f"media/a{k}.wav", "label": "y"},
                 {"id": f"txt{k}", "text": text, "label": "z"}]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    store = tmp_path / "store"
    rec = run(config(tmp_path, manifest, store), log=lambda s: None).record
    assert_accounting(store, {r["id"] for r in rows})
    assert rec["counts"]["rejected"] > per_modality   # most corrupted media are caught
    assert all(r["reason"] for r in rejects(store).values())


def test_fuzzed_media_through_the_pipeline_every_id_accounted_for(tmp_path, ray_session):
    fuzz_run(tmp_path, per_modality=60)


@pytest.mark.slow
def test_fuzz_a_few_hundred_per_modality(tmp_path, ray_session):
    fuzz_run(tmp_path, per_modality=300)
