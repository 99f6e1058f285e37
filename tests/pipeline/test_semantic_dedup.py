"""``semantic_dedup``: a re-encoded, cropped image with its caption reworded is caught by the
embeddings where pHash and MinHash miss it, and no duplicate crosses classes on the demo data.
Unit checks of the index beside (a stored row is always the one kept)."""
from __future__ import annotations

import io
import json

import numpy as np
from deltalake import DeltaTable
from PIL import Image

from pipeline.demo import make_demo
from pipeline.runner import run
from stages.semantic import SemanticIndex
from tests.pipeline.helpers import config

SEMANTIC = {"semantic_dedup": {"params": {"modalities": ["image", "text"], "thresholds": {"image": 0.97, "text": 0.7}}}}


def near_copy(manifest) -> str:
    """Append a near copy of the first row with an image and a plain-text caption: the image
    cropped by a few pixels and re-encoded, the caption's words in another order."""
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    src = next(r for r in rows if "image" in r and "text" in r and "<" not in r["text"] and "audio" not in r)
    im = Image.open(manifest.parent / src["image"])
    w, h = im.size
    buf = io.BytesIO()
    im.crop((6, 4, w - 5, h - 7)).resize((w, h)).save(buf, format="JPEG", quality=75)
    (manifest.parent / "media" / "copy.jpg").write_bytes(buf.getvalue())
    words = src["text"].rstrip(".").split()
    copy = {"id": "copy", "label": src["label"], "split": "train", "image": "media/copy.jpg",
            "text": " ".join(reversed(words)).capitalize() + "!"}
    manifest.write_text(manifest.read_text() + json.dumps(copy) + "\n")
    return src["id"]


def rejects(store) -> dict[str, tuple[str, str]]:
    t = DeltaTable(str(store / "rejects")).to_pyarrow_table(columns=["id", "reason", "detail"]).to_pylist()
    return {r["id"]: (r["reason"], r["detail"]) for r in t}


def test_semantic_dedup_catches_what_the_hashes_miss(tmp_path, ray_session):
    manifest = make_demo(tmp_path / "data", n=60)
    original = near_copy(manifest)
    plain = tmp_path / "plain"
    run(config(tmp_path, manifest, plain, {"execution": {"local_max_rows": 1000}}), log=lambda s: None)
    assert "copy" not in rejects(plain)                       # pHash and MinHash let it through
    semantic = tmp_path / "semantic"
    record = run(config(tmp_path, manifest, semantic, {"stages": SEMANTIC}), log=lambda s: None).record
    assert record["execution"] == "ray-data"                   # the index in its Ray actor
    found = rejects(semantic)
    # one of the two is kept: within a run, whichever block reached the index first
    assert found.get("copy") == ("duplicate", original) or found.get(original) == ("duplicate", "copy"), found
    labels = {r["id"]: r["label"] for r in map(json.loads, manifest.read_text().splitlines()) if "id" in r}
    dups = {i: kept for i, (reason, kept) in found.items() if reason == "duplicate"}
    assert all(labels[i] == labels[kept] for i, kept in dups.items()), dups   # never across classes
    # the next run, with nothing changed, checks nothing and keeps it that way
    again = run(config(tmp_path, manifest, semantic, {"stages": SEMANTIC}), log=lambda s: None).record
    assert again["counts"]["processed"] == 0 and rejects(semantic) == found


def unit(v) -> np.ndarray:
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def test_the_index_needs_every_compared_modality_close_and_keeps_the_stored_row():
    rng = np.random.default_rng(0)
    base_img, base_txt = unit(rng.normal(size=(4, 16))), unit(rng.normal(size=(4, 8)))

    class Stored:   # RunScope.stored: Arrow batches of the stored originals
        def __call__(self, columns):
            import pyarrow as pa

            yield pa.record_batch({"id": ["a", "b", "gone"], "has_image": [True, True, True], "has_text": [True, False, True],
                                   "image_emb": pa.array(list(base_img[:3]), pa.list_(pa.float32())),
                                   "text_emb": pa.array(list(base_txt[:3]), pa.list_(pa.float32()))}).select(columns)

    index = SemanticIndex({"modalities": ["image", "text"], "threshold": 0.95}, Stored(), removed=frozenset({"gone"}))
    assert index.size() == 2
    near = lambda v: unit(v + 0.02 * rng.normal(size=v.shape))   # noqa: E731
    ids = ["x", "y", "z", "w", "a", "v"]
    img = np.stack([near(base_img[0]), near(base_img[0]), near(base_img[1]), near(base_img[2]), base_img[0], near(base_img[3])])
    txt = np.stack([near(base_txt[0]), unit(rng.normal(size=8)), near(base_txt[1]), near(base_txt[2]), base_txt[0], near(base_txt[3])])
    present = {"image": np.ones(6, bool), "text": np.array([True, True, False, True, True, True])}
    verdicts = index.check(ids, {"image": img, "text": txt}, present)
    # x: both close to stored a; y: image close, text not; z: image close to b (b has no text, z neither);
    # w: close to "gone", which this run removes; a: its own stored row is no duplicate; v: new
    assert verdicts == ["a", None, "b", None, None, None]
    again = index.check(["y2", "w2"], {"image": img[[1, 3]], "text": txt[[1, 3]]},
                        {"image": np.ones(2, bool), "text": np.ones(2, bool)})
    assert again == ["y", "w"]                                   # rows of this run count as kept too
