"""stages.dedup: exact and near duplicates, within a batch, across batches and against the store."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from stages.base import StageContext, object_column
from stages.dedup import (Dedup, DedupParams, close_index, create_index, index_name, seed_index, signature_of,
                          start_index)
from stages.media import encode_flac, encode_image

WORDS = ("river stone bright morning quiet forest path under clouds where small birds sing softly "
         "while farmers carry baskets toward market square and children chase dogs near old bridges "
         "painted blue by summer light that fades slowly into evening gold across distant hills "
         "covered with wheat barley grapes olives figs and wild flowers").split()


def picture(seed: int, size: int = 128) -> np.ndarray:
    """A smooth, structured RGB picture (sums of low-frequency waves): phash sees its shape."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    chans = []
    for _ in range(3):
        freqs, phases = rng.uniform(0.5, 4, size=(3, 2)), rng.uniform(0, 2 * np.pi, 3)
        chans.append(sum(np.sin(2 * np.pi * (a * x + b * y) + p) for (a, b), p in zip(freqs, phases)))
    img = np.stack(chans, -1)
    return ((img - img.min()) / (img.max() - img.min()) * 255).astype(np.uint8)


def paragraph(seed: int, n: int = 60) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, n)) + "."


def make_batch(rows: list[dict]) -> dict[str, np.ndarray]:
    """A cleaned batch: rows give id and media; redo defaults to every modality."""
    cols = {c: [] for c in ("id", "image", "text", "audio", "redo", "reject_stage", "reject_reason",
                            "reject_detail", "aug")}
    for r in rows:
        for m in ("image", "text", "audio"):
            cols[m].append(r.get(m))
        cols["id"].append(r["id"])
        cols["redo"].append(r.get("redo", "image,text,audio"))
        cols["reject_stage"].append(r.get("reject_reason", "") and "cleanup.text")
        cols["reject_reason"].append(r.get("reject_reason", ""))
        cols["reject_detail"].append("")
        cols["aug"].append(r.get("aug", 0))
    batch = {c: object_column(v) for c, v in cols.items() if c != "aug"}
    batch["aug"] = np.array(cols["aug"], dtype=np.int32)
    return batch


def verdicts(batch: dict[str, np.ndarray]) -> dict[str, tuple[str, str]]:
    """id -> (reason, detail); ("", "") for kept rows."""
    return {str(i): (r, d) for i, r, d in zip(batch["id"], batch["reject_reason"], batch["reject_detail"])}


@pytest.fixture
def run_id(request) -> str:
    """A fresh run id per test, and its in-process index dropped afterwards."""
    rid = request.node.name
    yield rid
    close_index(index_name(rid))


def stage(run_id: str, **params) -> Dedup:
    return Dedup(params, StageContext(run_id=run_id))


def test_reencoded_near_duplicate_jpegs_are_caught(run_id):
    a, b = picture(1), picture(2)
    smaller = np.asarray(Image.fromarray(a).resize((116, 116)))
    batch = make_batch([
        {"id": "a-q95", "image": encode_image(a, "jpg", 95)},
        {"id": "a-q60-small", "image": encode_image(smaller, "jpg", 60)},
        {"id": "a-png", "image": encode_image(a, "png")},
        {"id": "b", "image": encode_image(b, "jpg", 95)},
    ])
    out = stage(run_id)(batch)
    assert verdicts(out) == {"a-q95": ("", ""), "a-q60-small": ("duplicate", "a-q95"),
                             "a-png": ("duplicate", "a-q95"), "b": ("", "")}
    assert out["reject_stage"][1] == "dedup"


def test_lightly_edited_text_is_caught_unrelated_is_not(run_id):
    text = paragraph(1)
    words = text.split()
    words[30] = "zebra"
    batch = make_batch([
        {"id": "orig", "text": text},
        {"id": "edited", "text": " ".join(words)},
        {"id": "other", "text": paragraph(2)},
    ])
    assert verdicts(stage(run_id)(batch)) == {
        "orig": ("", ""), "edited": ("duplicate", "orig"), "other": ("", "")}


def test_short_texts_only_match_exactly(run_id):
    batch = make_batch([
        {"id": "a", "text": "a red cat"},
        {"id": "b", "text": "a red dog"},
        {"id": "c", "text": "a red cat"},
    ])
    assert verdicts(stage(run_id)(batch)) == {"a": ("", ""), "b": ("", ""), "c": ("duplicate", "a")}


def test_exact_duplicates_and_sample_scope(run_id):
    flac = encode_flac(np.sin(np.linspace(0, 200, 8000)).astype(np.float32), 8000)
    img = encode_image(picture(3), "png")
    batch = make_batch([
        {"id": "s1", "audio": flac, "text": "hello there"},
        {"id": "s2", "audio": flac, "text": "hello there"},         # the whole sample again
        {"id": "s3", "audio": flac},                                 # same audio, fewer modalities
        {"id": "s4", "image": img, "text": "a caption"},
        {"id": "s5", "image": img, "text": "another caption"},       # same image, other text
    ])
    assert verdicts(stage(run_id)(batch)) == {
        "s1": ("", ""), "s2": ("duplicate", "s1"), "s3": ("", ""), "s4": ("", ""), "s5": ("", "")}


def test_exact_per_modality(run_id):
    img = encode_image(picture(3), "png")
    batch = make_batch([
        {"id": "s4", "image": img, "text": "a caption"},
        {"id": "s5", "image": img, "text": "another caption"},
    ])
    params = {"exact": ["image"], "image_phash": False, "text_minhash": False}
    assert verdicts(stage(run_id, **params)(batch))["s5"] == ("duplicate", "s4")


def test_nothing_enabled_keeps_everything(run_id):
    batch = make_batch([{"id": "a", "text": "same"}, {"id": "b", "text": "same"}])
    out = stage(run_id, exact=[], image_phash=False, text_minhash=False)(batch)
    assert list(out["reject_reason"]) == ["", ""]


def test_kept_rows_get_a_signature_and_others_are_skipped(run_id):
    text = paragraph(5)
    batch = make_batch([
        {"id": "kept", "text": text, "image": encode_image(picture(4), "jpg", 90)},
        {"id": "rejected", "text": text, "reject_reason": "text_too_short"},
        {"id": "augmented", "text": text, "aug": 1},
        {"id": "unchanged", "text": text, "redo": ""},
    ])
    assert "dedup_sig" not in batch
    out = stage(run_id)(batch)
    assert list(out["reject_reason"]) == ["", "text_too_short", "", ""]
    assert list(out["dedup_sig"][1:]) == ["", "", ""]
    sig = json.loads(out["dedup_sig"][0])
    assert set(sig["sha"]) == {"image", "text", "sample"}
    assert len(sig["image_phash"]) == 16 and len(sig["text_minhash"]) == 128


def test_across_batches_and_against_the_store(run_id):
    p = DedupParams()
    stored = signature_of("stored-1", {"image": None, "text": paragraph(7), "audio": None}, p)
    create_index(index_name(run_id), p.model_dump(), [(stored.id, stored.to_json()), ("old-no-sig", "")])
    dedup = stage(run_id)
    first = dedup(make_batch([{"id": "new-1", "text": paragraph(7)}, {"id": "new-2", "text": paragraph(8)}]))
    second = dedup(make_batch([{"id": "new-3", "text": paragraph(8)}]))
    assert verdicts(first) == {"new-1": ("duplicate", "stored-1"), "new-2": ("", "")}
    assert verdicts(second) == {"new-3": ("duplicate", "new-2")}


def test_reprocessed_id_does_not_match_itself(run_id):
    p = DedupParams()
    text = paragraph(9)
    old = signature_of("a", {"image": None, "text": text, "audio": None}, p)
    create_index(index_name(run_id), p.model_dump(), [("a", old.to_json())])
    out = stage(run_id)(make_batch([{"id": "a", "text": text}, {"id": "b", "text": text}]))
    assert verdicts(out) == {"a": ("", ""), "b": ("duplicate", "a")}
    assert json.loads(out["dedup_sig"][0])["sha"] == old.sha


def test_changed_row_frees_its_old_signature(run_id):
    p = DedupParams()
    old = signature_of("a", {"image": None, "text": paragraph(10), "audio": None}, p)
    create_index(index_name(run_id), p.model_dump(), [("a", old.to_json())])
    out = stage(run_id)(make_batch([{"id": "a", "text": paragraph(11)}, {"id": "b", "text": paragraph(10)}]))
    assert verdicts(out) == {"a": ("", ""), "b": ("", "")}


def test_undecodable_image_is_rejected(run_id):
    out = stage(run_id)(make_batch([{"id": "x", "image": b"not an image"}]))
    assert out["reject_reason"][0] == "dedup_error"


def test_minhash_bands_find_what_datasketch_lsh_finds():
    """The index's own banding (rows added a matrix at a time) gives the candidates
    MinHashLSH.query gives, filtered by the same Jaccard estimate."""
    from datasketch import LeanMinHash, MinHashLSH

    from stages.dedup import MINHASH_SCHEME, _MinHashBands

    rng = np.random.default_rng(3)
    base = rng.integers(0, 2**32, size=(40, 128), dtype=np.uint32)
    rows = [base[k % 40].copy() for k in range(400)]
    for k, row in enumerate(rows[40:], start=40):   # copies with 0-40 % of their values redrawn
        redraw = rng.random(128) < (k % 9) / 20
        row[redraw] = rng.integers(0, 2**32, size=int(redraw.sum()), dtype=np.uint32)
    ids = [f"r{k}" for k in range(400)]

    def lean(values):
        return LeanMinHash(seed=1, hashvalues=values, scheme=MINHASH_SCHEME)

    for threshold in (0.5, 0.9):
        bands, lsh = _MinHashBands(threshold, 128), MinHashLSH(threshold=threshold, num_perm=128)
        bands.add(ids[:300], np.asarray(rows[:300]))
        for i, row in zip(ids[:300], rows[:300]):
            lsh.insert(i, lean(row))
        for i in ids[:300:7]:   # removed from both
            bands.remove(i)
            lsh.remove(i)
        for row in rows[250:]:
            q = lean(row)
            expected = {i for i in lsh.query(q) if q.jaccard(lean(bands.values[i])) >= threshold}
            assert bands.near(row) == expected
        assert sum(len(bands.near(row)) for row in rows[300:]) > 20   # near copies were found


def test_seeding_runs_without_garbage_collection_and_restores_it(monkeypatch):
    """Seeding makes many small objects that all live on; a long-lived driver's collections would
    walk its whole heap each time. Collection is paused for the seed and back on after it."""
    import gc

    from stages import dedup

    seen = []
    from_json = dedup.Signature.from_json
    monkeypatch.setattr(dedup.Signature, "from_json",
                        classmethod(lambda cls, i, t: (seen.append(gc.isenabled()), from_json(i, t))[1]))
    p = DedupParams()
    stored = signature_of("a", {"image": None, "text": paragraph(1), "audio": None}, p)
    index = dedup.DedupIndex(p, [("a", stored.to_json()), ("b", stored.to_json())])
    assert seen == [False, False] and gc.isenabled()
    assert index.check([signature_of("c", {"image": None, "text": paragraph(1), "audio": None}, p)]) == ["a"]


def test_params_are_validated():
    with pytest.raises(ValidationError):
        DedupParams.model_validate({"exact": ["video"]})
    with pytest.raises(ValidationError):
        DedupParams.model_validate({"phash_treshold": 4})


# -- through a real Ray actor (kept last: Ray stays up for the rest of the module) ----------
@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=1, include_dashboard=False)
    yield ray
    ray.shutdown()


def test_stage_through_ray_actor(ray_local):
    ray = ray_local
    p = DedupParams()
    stored = signature_of("stored", {"image": encode_image(picture(1), "jpg", 95), "text": None, "audio": None}, p)
    name = index_name("ray-run")
    create_index(name, p.model_dump(), [(stored.id, stored.to_json())])
    try:
        small = np.asarray(Image.fromarray(picture(1)).resize((120, 120)))
        batch = make_batch([{"id": "near", "image": encode_image(small, "jpg", 60)},
                            {"id": "new", "image": encode_image(picture(2), "jpg", 90)}])

        @ray.remote(num_cpus=1)
        def run_stage(b):   # a worker process finds the index by name, as map_batches actors do
            return Dedup({}, StageContext(run_id="ray-run"))(b)

        out = ray.get(run_stage.remote(batch))
        assert verdicts(out) == {"near": ("duplicate", "stored"), "new": ("", "")}
        again = Dedup({}, StageContext(run_id="ray-run"))(make_batch([{"id": "again", "image": batch["image"][1]}]))
        assert verdicts(again) == {"again": ("duplicate", "new")}
        assert ray.get(ray.get_actor(name).size.remote()) == 2
    finally:
        close_index(name)
    with pytest.raises(RuntimeError, match="create_index"):
        Dedup({}, StageContext(run_id="ray-run"))


def test_an_index_started_before_its_seed_answers_checks_only_once_seeded(ray_local):
    """The runner starts the index actor before the scan and seeds it after the plan: a check that
    arrives first waits for the seed (so stored rows still count as seen first)."""
    ray = ray_local
    p = DedupParams()
    text = paragraph(12)
    stored = signature_of("stored", {"image": None, "text": text, "audio": None}, p)
    name = index_name("early-run")
    start_index(name, p.model_dump())
    try:
        pending = ray.get_actor(name).check.remote([signature_of("new", {"image": None, "text": text, "audio": None}, p)])
        assert ray.wait([pending], timeout=1.0)[0] == []   # waits for the seed
        seed_index(name, [(stored.id, stored.to_json())])
        assert ray.get(pending, timeout=30) == ["stored"]

    finally:
        close_index(name)
    broken = index_name("broken-run")   # a seed that fails fails every check instead of leaving it waiting
    start_index(broken, p.model_dump())
    try:
        seed_index(broken, [("broken", "{not json")])
        with pytest.raises(ray.exceptions.RayTaskError, match="could not be seeded"):
            ray.get(ray.get_actor(broken).check.remote([stored]), timeout=30)
    finally:
        close_index(broken)
