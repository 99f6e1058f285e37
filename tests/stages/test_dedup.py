"""stages.dedup: exact and near duplicates, within a batch, across batches and against the store."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from stages import dedup
from stages.base import StageContext, fingerprint_of, object_column
from stages.dedup import (Dedup, DedupIndex, DedupParams, Signature, StoredSignatures, close_index, create_index,
                          index_name, seed_index, signature_of, start_index)
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
    assert len(sig["image_phash"]) == 16 and len(sig["text_minhash"]) == 684   # base64 of 128 uint32
    assert Signature.from_json("kept", out["dedup_sig"][0]) == signature_of("kept", {
        "image": batch["image"][0], "text": text, "audio": None}, DedupParams())


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
    """The index's own banding (rows added a matrix at a time, bands looked up by a hash of their
    values) gives the candidates MinHashLSH.query gives, filtered by the same Jaccard estimate."""
    from datasketch import LeanMinHash, MinHashLSH

    from stages.dedup import MINHASH_SCHEME, _MinHashBands

    rng = np.random.default_rng(3)
    base = rng.integers(0, 2**32, size=(40, 128), dtype=np.uint32)
    rows = [base[k % 40].copy() for k in range(400)]
    for k, row in enumerate(rows[40:], start=40):   # copies with 0-40 % of their values redrawn
        redraw = rng.random(128) < (k % 9) / 20
        row[redraw] = rng.integers(0, 2**32, size=int(redraw.sum()), dtype=np.uint32)

    def lean(values):
        return LeanMinHash(seed=1, hashvalues=values, scheme=MINHASH_SCHEME)

    for threshold in (0.5, 0.9):
        bands, lsh = _MinHashBands(threshold, 128), MinHashLSH(threshold=threshold, num_perm=128)
        bands.add(np.arange(200), np.asarray(rows[:200]), wait=True)   # a seed's chunk, then single inserts
        bands.flush()
        bands.add(np.arange(200, 300), np.asarray(rows[200:300]))
        for k in range(300):
            lsh.insert(k, lean(rows[k]))
        queries, found = bands.pairs(np.asarray(rows[250:]), np.arange(150))
        for n, row in enumerate(rows[250:]):
            q = lean(row)
            expected = {k for k in lsh.query(q) if q.jaccard(lean(rows[k])) >= threshold}
            assert set(found[queries == n].tolist()) == expected
        assert np.count_nonzero(queries >= 50) > 20   # near copies of rows not in the index were found


# -- the compact index against the rules, row by row ----------------------------------------
class Reference:
    """The matching rules of the module docstring, applied row by row to every registered row."""

    def __init__(self, p: DedupParams, existing: list[tuple[str, str]]):
        from datasketch import MinHashLSH

        self.p, self.ranges = p, MinHashLSH(threshold=p.minhash_threshold, num_perm=p.num_perm).hashranges
        self.kept: dict[str, Signature] = {}   # in registration order
        for row_id, sig in existing:
            if sig:
                self.kept.pop(row_id, None)
                self.kept[row_id] = Signature.from_json(row_id, sig)

    def check(self, sigs: list[Signature]) -> list[str | None]:
        out = []
        for sig in sigs:
            self.kept.pop(sig.id, None)
            out.append(next((i for i, e in self.kept.items() if self.matches(sig, e)), None))
            if out[-1] is None:
                self.kept[sig.id] = sig
        return out

    def matches(self, q: Signature, e: Signature) -> bool:
        if any(key in q.sha and e.sha.get(key) == q.sha[key] for key in self.p.exact):
            return True
        near = q.image_phash is not None or q.text_minhash is not None
        return near and bool(q.modalities) and q.modalities == e.modalities and all(
            self.close(m, q, e) for m in q.modalities)

    def close(self, m: str, q: Signature, e: Signature) -> bool:
        if m == "image" and q.image_phash is not None:
            return e.image_phash is not None and (
                bin(int(q.image_phash, 16) ^ int(e.image_phash, 16)).count("1") <= self.p.phash_threshold)
        if m == "text" and q.text_minhash is not None and self.p.text_minhash:
            a, b = q.text_minhash, e.text_minhash
            return (b is not None and len(b) == len(a) and any(a[s:t] == b[s:t] for s, t in self.ranges)
                    and sum(x == y for x, y in zip(a, b)) / len(a) >= self.p.minhash_threshold)
        return e.sha.get(m) == q.sha[m]


def random_signatures(rng: np.random.Generator, n: int, p: DedupParams, ids: int) -> list[Signature]:
    """Rows drawn from a few families per modality: exact copies, near copies on both sides of the
    thresholds, short texts (no MinHash), every mix of modalities, ids that come back."""
    images = rng.integers(0, 2**63, 6, dtype=np.uint64)
    texts = rng.integers(0, 2**32, (6, p.num_perm), dtype=np.uint32)
    mixes = [("image",), ("text",), ("audio",), ("image", "text"), ("text", "audio"), ("image", "audio"),
             ("image", "text", "audio")]
    out = []
    for _ in range(n):
        family = {m: int(rng.integers(0, 6)) for m in mixes[rng.integers(0, len(mixes))]}
        sha, phash, minhash = {}, None, None
        for m, f in family.items():
            variant = int(rng.integers(0, 4))   # 0: the family's exact content
            sha[m] = dedup._sha(f"{m}{f}.{variant}.{rng.integers(0, 3) if variant else 0}")
            if m == "image" and p.image_phash:
                flips = rng.choice(64, int(rng.integers(0, 10)) if variant else 0, replace=False)
                phash = f"{int(images[f]) ^ sum(1 << int(b) for b in flips):016x}"
            if m == "text" and p.text_minhash and f:   # family 0: short texts
                values = texts[f].copy()
                redraw = rng.random(p.num_perm) < (rng.uniform(0, 0.35) if variant else 0)
                values[redraw] = rng.integers(0, 2**32, int(redraw.sum()), dtype=np.uint32)
                minhash = values.tolist()
        sha["sample"] = dedup._sha(json.dumps(sha, sort_keys=True))
        out.append(Signature(f"r{rng.integers(0, ids)}", sha, phash, minhash))
    return out


def old_json(sig: Signature) -> str:
    """``dedup_sig`` as versions before the compact MinHash wrote it."""
    out = {"sha": sig.sha, **({"image_phash": sig.image_phash} if sig.image_phash else {}),
           **({"text_minhash": list(sig.text_minhash)} if sig.text_minhash is not None else {})}
    return json.dumps(out, sort_keys=True)


def random_run(seed: int, p: DedupParams, stored: int = 200, new: int = 300):
    """Stored (id, dedup_sig) in old and new forms, with repeats, empty ones and another num_perm;
    then the run's signatures cut into blocks of 1 to 40 rows."""
    rng = np.random.default_rng(seed)
    existing = []
    for k, sig in enumerate(random_signatures(rng, stored, p, ids=stored + new)):
        if k % 17 == 0 and sig.text_minhash is not None:
            sig.text_minhash = sig.text_minhash[:64]   # made with another num_perm: matches exactly only
        existing.append((sig.id, "" if k % 23 == 0 else old_json(sig) if k % 2 else sig.to_json()))
    sigs = random_signatures(rng, new, p, ids=stored + new)
    cuts = np.cumsum(rng.integers(1, 41, new))
    blocks = [sigs[a:b] for a, b in zip(np.r_[0, cuts], cuts) if a < new]
    return existing, blocks


PARAMS = [{}, {"exact": ["image", "text", "audio"]}, {"exact": [], "image_phash": False},
          {"text_minhash": False, "phash_threshold": 3}, {"minhash_threshold": 0.5, "phash_threshold": 10},
          {"exact": ["sample", "audio"], "num_perm": 64, "minhash_threshold": 0.7}]


@pytest.mark.parametrize("params", PARAMS)
def test_compact_index_follows_the_rules_on_random_signatures(params, monkeypatch):
    """Verdicts equal the rules applied row by row, across seeds, blocks, reprocessed ids and
    compactions (forced often here, as are merges of the sorted runs and blocks matched in groups)."""
    monkeypatch.setattr(dedup, "COMPACT_MIN", 8)
    monkeypatch.setattr(dedup, "QUERY_GROUP", 7)
    monkeypatch.setattr(dedup._KeyIndex, "SMALL", 16)
    p = DedupParams.model_validate(params)
    for seed in range(2):
        existing, blocks = random_run(seed, p)
        index, reference = DedupIndex(p, existing), Reference(p, existing)
        verdicts = [index.check(block) for block in blocks]
        assert verdicts == [reference.check(block) for block in blocks]
        assert index.size() == len(reference.kept)
        kinds = [v is None for block in verdicts for v in block]
        assert min(kinds.count(True), kinds.count(False)) > 10   # both verdicts are common: the test has teeth


def test_bytes_per_row_stay_small():
    """Image + text + id rows: a few hundred bytes each (the MinHash values are 512), not kilobytes."""
    p, rng = DedupParams(), np.random.default_rng(0)
    existing = [(f"sample-{k:08d}", Signature(
        f"sample-{k:08d}", {"image": dedup._sha(f"i{k}"), "text": dedup._sha(f"t{k}"), "sample": dedup._sha(f"s{k}")},
        f"{int(rng.integers(0, 2**63)):016x}", rng.integers(0, 2**32, 128, dtype=np.uint32).tolist()).to_json())
        for k in range(5000)]
    index = DedupIndex(p, existing)
    assert index.size() == 5000 and index.nbytes() / 5000 < 800
    images = DedupIndex(p, [(i, json.dumps({"sha": {k: v for k, v in json.loads(s)["sha"].items() if k != "text"},
                                            "image_phash": json.loads(s)["image_phash"]})) for i, s in existing])
    assert images.nbytes() / 5000 < 150


def test_old_json_signatures_stay_readable():
    p = DedupParams()
    sig = signature_of("a", {"image": encode_image(picture(1), "png"), "text": paragraph(3), "audio": None}, p)
    assert Signature.from_json("a", old_json(sig)) == Signature.from_json("a", sig.to_json()) == sig
    assert len(sig.to_json()) < 0.7 * len(old_json(sig))
    index = DedupIndex(p, [("a", old_json(sig))])
    assert index.check([signature_of("b", {"image": encode_image(picture(1), "png"), "text": paragraph(3),
                                           "audio": None}, p)]) == ["a"]


def stored_batches(pairs: list[tuple[str, str]], size: int = 3):
    """A ``RunScope.stored`` stand-in: record batches of the asked columns."""
    import pyarrow as pa

    table = pa.table({"id": [i for i, _ in pairs], "dedup_sig": [s for _, s in pairs], "other": [0] * len(pairs)})
    asked = []

    def stored(columns: list[str]):
        asked.append(list(columns))
        return table.select(columns).to_batches(max_chunksize=size)

    return stored, asked


def test_seeding_streams_stored_batches_and_skips_removed_ids():
    p = DedupParams()
    sigs = {i: signature_of(i, {"image": None, "text": paragraph(k), "audio": None}, p)
            for k, i in enumerate(["s1", "gone", "s2", "no-sig", "s3"], start=20)}
    stored, asked = stored_batches([(i, "" if i == "no-sig" else s.to_json()) for i, s in sigs.items()])
    source = StoredSignatures(stored, removed=frozenset({"gone"}))
    assert [(pos, i) for pos, i, *_ in source.rows()] == [(0, "s1"), (2, "s2"), (4, "s3")]
    assert source.count() == 5
    index = DedupIndex(p, source)
    assert index.size() == 3 and asked == [["id", "dedup_sig"], [], ["id", "dedup_sig"]]
    again = [signature_of(f"new-{i}", {"image": None, "text": paragraph(k), "audio": None}, p)
             for k, i in enumerate(["s1", "gone", "s2"], start=20)]
    assert index.check(again) == ["s1", None, "s2"]


def test_runtime_params_leave_the_fingerprint_alone():
    """Stores written before the index was sharded keep their rows: the fingerprint is the one made
    without the sharding params, and they do not change it."""
    before = {"exact": ["sample"], "image_phash": True, "phash_threshold": 6, "text_minhash": True,
              "minhash_threshold": 0.8, "num_perm": 128, "shingle": 3, "min_shingles": 5}
    assert Dedup.fingerprint({}) == fingerprint_of("dedup", 1, before) == Dedup.fingerprint({"shards": 4})
    assert Dedup.fingerprint({"rows_per_shard": 10}) == Dedup.fingerprint(DedupParams())
    assert Dedup.fingerprint({"num_perm": 64}) != Dedup.fingerprint({})
    # the video near-dup options came later: at their defaults they leave old stores' rows alone
    assert Dedup.fingerprint({"video_phash_threshold": 8}) == Dedup.fingerprint({})
    assert Dedup.fingerprint({"video_phash_threshold": 4}) != Dedup.fingerprint({})


def test_params_are_validated():
    with pytest.raises(ValidationError):
        DedupParams.model_validate({"exact": ["smell"]})
    with pytest.raises(ValidationError):
        DedupParams.model_validate({"phash_treshold": 4})


def _store_after(existing: list[tuple[str, str]], run: list[tuple[str, str]], ids: set[str]) -> list[tuple[str, str]]:
    """The stored rows after a run that processed ``ids`` and kept ``run`` (id, signature): those
    ids and a tenth of the others replaced (rewritten: they move after the untouched rows, as a
    rewritten data file does), a tenth removed, a few new rows at the end."""
    other = [s for _, s in existing if s]
    untouched, moved = [], []
    for k, (i, sig) in enumerate(existing):
        if i in ids or k % 10 == 3:
            continue
        (moved if k % 10 == 7 else untouched).append((i, other[(k * 7) % len(other)] if k % 10 == 7 else sig))
    return untouched + moved + run + [(f"new-{k}", other[(k * 13) % len(other)]) for k in range(15)]


@pytest.mark.parametrize("params", PARAMS[:4])
def test_a_saved_index_brought_up_to_date_answers_as_a_fresh_one(params, tmp_path, monkeypatch):
    """A shard saved after a run and refreshed against the store that run left gives the verdicts
    and size of one seeded from that store, parsing only the rows it did not hold."""
    monkeypatch.setattr(dedup, "COMPACT_MIN", 8)
    p = DedupParams.model_validate(params)
    existing, blocks = random_run(3, p)
    seen: set[str] = set()
    existing = [(i, s) for i, s in existing if not (i in seen or seen.add(i))]   # one row per id
    snapshot = str(tmp_path / "shard-0-of-1")
    first = DedupIndex(p, existing, snapshot)   # nothing saved yet: seeded from the store
    run = {}
    for block in blocks[:4]:
        for sig, kept in zip(block, first.check(block)):
            run.pop(sig.id, None)
            if kept is None:
                run[sig.id] = sig.to_json()
    first._shard.save(snapshot)
    now = _store_after(existing, list(run.items()), {sig.id for block in blocks[:4] for sig in block})
    held = {(i, s) for i, s in existing if s}
    to_parse = sum(1 for i, s in now if s and (i, s) not in held)
    parsed = []
    parse = dedup._Block.parse
    monkeypatch.setattr(dedup._Block, "parse", classmethod(lambda cls, ids, texts, n: parsed.append(len(ids)) or
                                                           parse(ids, texts, n)))
    restored = DedupIndex(p, now, snapshot)
    assert sum(parsed) == to_parse
    parsed.clear()
    fresh = DedupIndex(p, now)
    assert sum(parsed) == sum(1 for _, s in now if s) > 1.5 * to_parse
    assert restored.size() == fresh.size()
    verdicts = [restored.check(block) for block in blocks[4:]]
    assert verdicts == [fresh.check(block) for block in blocks[4:]]
    assert sum(v is not None for block in verdicts for v in block) > 10   # stored rows are matched


def test_a_saved_index_is_used_only_by_the_same_params_and_when_readable(tmp_path):
    p = DedupParams()
    existing, _ = random_run(4, p, stored=50, new=1)
    snapshot = tmp_path / "shard-0-of-1"
    DedupIndex(p, existing)._shard.save(str(snapshot))
    assert json.loads((snapshot / "outline.json").read_text())["params"] == p.model_dump(mode="json")
    assert dedup._Shard(p)._restore(str(snapshot))
    assert not dedup._Shard(DedupParams(num_perm=64))._restore(str(snapshot))    # other params
    assert not dedup._Shard(p, home=1, shards=2)._restore(str(snapshot))          # another shard's
    cut = snapshot / "seq._a.npy"
    cut.write_bytes(cut.read_bytes()[:100])                                       # cut short
    assert not dedup._Shard(p)._restore(str(snapshot))
    index = DedupIndex(p, existing, str(snapshot))                                # seeded from the store
    assert index.size() == DedupIndex(p, existing).size()


def test_a_refresh_keyed_by_version_parses_only_the_rows_written_since(tmp_path, monkeypatch):
    """With the stored ``run_id`` as each row's version, a saved shard holds a row while its (id,
    run id) is stored: a row written by a later run is parsed again, a removed one dies, and the
    rows copied as they were are not parsed."""
    import pyarrow as pa

    p = DedupParams()
    sig = {k: signature_of(f"r{k}", {"image": None, "text": paragraph(k), "audio": None}, p).to_json() for k in range(12)}

    def store_of(rows: list[tuple[str, str, str]]) -> StoredSignatures:
        table = pa.table({"id": [i for i, _, _ in rows], "run_id": [r for _, r, _ in rows],
                          "dedup_sig": [t for _, _, t in rows], "other": [0] * len(rows)})
        return StoredSignatures(lambda columns: table.select(columns).to_batches(max_chunksize=4), version="run_id")

    snapshot = str(tmp_path / "shard-0-of-1")
    DedupIndex(p, store_of([(f"r{k}", "run-a", sig[k]) for k in range(10)]), snapshot)._shard.save(snapshot)
    # run-b: r3 now holds r10's text, r4 written again (same text), r5 removed, r11 added; the
    # other rows copied as they were
    after = store_of([(f"r{k}", "run-a", sig[k]) for k in (0, 1, 2, 6, 7, 8, 9)]
                     + [("r3", "run-b", sig[10]), ("r4", "run-b", sig[4]), ("r11", "run-b", sig[11])])
    parsed = []
    parse = dedup._Block.parse
    monkeypatch.setattr(dedup._Block, "parse", classmethod(lambda cls, ids, texts, n: parsed.extend(ids) or parse(ids, texts, n)))
    restored = DedupIndex(p, after, snapshot)
    assert sorted(parsed) == ["r11", "r3", "r4"]   # by run id: r4's signature is not even compared
    fresh = DedupIndex(p, after)
    assert restored.size() == fresh.size() == 10
    probes = [signature_of(f"new-{k}", {"image": None, "text": paragraph(k), "audio": None}, p) for k in (3, 5, 10, 11)]
    assert restored.check(probes) == fresh.check(probes) == [None, None, "r3", "r11"]


def test_a_run_saves_its_own_rows_under_the_run_id_its_commit_stores(tmp_path, monkeypatch):
    """A shard saved with the run's id keeps the rows the run registered, keyed as its commit
    stores them: the next run parses none of those, drops the one the commit did not store, and
    answers as an index seeded from the store."""
    import pyarrow as pa

    p = DedupParams()
    sigs = {k: signature_of(f"r{k}", {"image": None, "text": paragraph(k), "audio": None}, p) for k in range(10)}

    def store_of(rows: list[tuple[int, str]]) -> StoredSignatures:
        table = pa.table({"id": [f"r{k}" for k, _ in rows], "run_id": [r for _, r in rows],
                          "dedup_sig": [sigs[k].to_json() for k, _ in rows]})
        return StoredSignatures(lambda columns: table.select(columns).to_batches(max_chunksize=4), version="run_id")

    snapshot = str(tmp_path / "shard-0-of-1")
    index = DedupIndex(p, store_of([(k, "run-a") for k in range(6)]), snapshot)
    assert index.check([sigs[k] for k in range(6, 10)]) == [None] * 4   # run-b registers r6..r9
    index._shard.save(snapshot, "run-b")
    after = store_of([(k, "run-a") for k in range(6)] + [(k, "run-b") for k in (6, 7, 8)])   # r9: rejected later
    parsed = []
    parse = dedup._Block.parse
    monkeypatch.setattr(dedup._Block, "parse", classmethod(lambda cls, ids, texts, n: parsed.extend(ids) or parse(ids, texts, n)))
    restored = DedupIndex(p, after, snapshot)
    assert parsed == []
    fresh = DedupIndex(p, after)
    assert restored.size() == fresh.size() == 9
    probes = [signature_of(f"copy-{k}", {"image": None, "text": paragraph(k), "audio": None}, p) for k in (7, 9)]
    assert restored.check(probes) == fresh.check(probes) == ["r7", None]


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


def test_shards_follow_the_stored_rows(monkeypatch):
    source = StoredSignatures(pairs=tuple((f"r{k}", "") for k in range(5)))
    monkeypatch.setattr(dedup.ray, "is_initialized", lambda: False)
    assert dedup.shard_count(DedupParams(rows_per_shard=2), source) == 1   # Ray not running: one, in-process
    monkeypatch.setattr(dedup.ray, "is_initialized", lambda: True)
    # Memory, not the cluster's CPUs, sets the count: the shards are 0-CPU actors.
    monkeypatch.setattr(dedup.ray, "cluster_resources", lambda: {"CPU": 1.0})
    assert dedup.shard_count(DedupParams(rows_per_shard=2), source) == 3
    assert dedup.shard_count(DedupParams(), source) == 1
    assert dedup.shard_count(DedupParams(shards=5), source) == 5
    # a saved layout is kept while its shards hold at most twice rows_per_shard each
    assert [dedup.shard_count(DedupParams(rows_per_shard=2), source, saved) for saved in (1, 2, 4, 6, 7)] == [3, 2, 4, 6, 3]


def test_the_saved_shard_count_is_the_latest_complete_set(tmp_path):
    def save(name: str) -> None:
        (tmp_path / name).mkdir()
        (tmp_path / name / "outline.json").write_text("{}")
        time.sleep(0.01)

    assert dedup.saved_count(str(tmp_path)) is None and dedup.saved_count("") is None
    save("shard-0-of-1")
    save("shard-0-of-2")   # the other of 2 missing: incomplete
    assert dedup.saved_count(str(tmp_path)) == 1
    save("shard-1-of-2")
    assert dedup.saved_count(str(tmp_path)) == 2


def test_a_sharded_index_seeds_itself_and_follows_the_rules(ray_local):
    """Rows spread over 3 shard actors that read the stored batches themselves (the reader shipped
    to them), a removed id skipped: blocks checked one after another get the rules' verdicts."""
    ray = ray_local
    p = DedupParams(shards=3)
    existing, blocks = random_run(5, p)
    gone = existing[1][0]
    stored, _ = stored_batches(existing, size=16)
    name = index_name("sharded-run")
    create_index(name, p.model_dump(), StoredSignatures(stored, removed=frozenset({gone})))
    try:
        actor = ray.get_actor(name)
        assert ray.get(actor.shards.remote()) == 3
        shard_sizes = [ray.get(ray.get_actor(f"{name}-shard-{k}").size.remote()) for k in range(3)]
        reference = Reference(p, [(i, s) for i, s in existing if i != gone])
        assert sum(shard_sizes) == len(reference.kept) and min(shard_sizes) > 0
        check = dedup.open_index(name, p)
        assert [check(block) for block in blocks] == [reference.check(block) for block in blocks]
        assert ray.get(actor.size.remote()) == len(reference.kept)
    finally:
        close_index(name)
    with pytest.raises(ValueError):
        ray.get_actor(f"{name}-shard-0")


def test_concurrent_blocks_never_keep_two_near_duplicates(ray_local):
    """Six blocks sent at once, each with one near copy of every one of 24 texts, the copies' ids
    spread over 3 shards: one block is kept whole and every other row names its copy there."""
    ray = ray_local
    p = DedupParams(shards=3)
    rng = np.random.default_rng(7)
    base = rng.integers(0, 2**32, (24, 128), dtype=np.uint32)
    blocks = []
    for v in range(6):
        block = []
        for f in rng.permutation(24):
            values = base[f].copy()   # 3 values redrawn per copy: two copies share >= 3 of 9 bands
            values[rng.choice(128, 3, replace=False)] = rng.integers(0, 2**32, 3, dtype=np.uint32)
            sha = {"text": dedup._sha(f"t{f}.{v}")}
            block.append(Signature(f"f{f}-v{v}", {**sha, "sample": dedup._sha(json.dumps(sha))}, None, values.tolist()))
        blocks.append(block)
    name = index_name("concurrent-run")
    create_index(name, p.model_dump(), [])
    try:
        actor = ray.get_actor(name)
        verdicts = ray.get([actor.check.remote(block) for block in blocks])
        whole = [v for v, out in enumerate(verdicts) if out == [None] * 24]
        assert len(whole) == 1
        for block, out in zip(blocks, verdicts):
            if out != [None] * 24:
                assert out == [f"{s.id.split('-')[0]}-v{whole[0]}" for s in block]
        assert ray.get(actor.size.remote()) == 24
    finally:
        close_index(name)


@pytest.mark.parametrize("shards", [1, 2])
def test_the_index_actor_saves_itself_for_the_next_run(ray_local, tmp_path, shards):
    """At the end of a run the index actor (or each of its shard actors) saves the stored rows it
    holds (not the run's own: the next run finds those in the store); the next run's index starts
    from them."""
    ray = ray_local
    p = DedupParams(shards=shards)
    stored = [signature_of(f"s{k}", {"image": None, "text": paragraph(30 + k), "audio": None}, p) for k in range(3)]
    pairs = [(s.id, s.to_json()) for s in stored]
    new = signature_of("n1", {"image": None, "text": paragraph(40), "audio": None}, p)
    name = index_name("saving-run")
    create_index(name, p.model_dump(), pairs, snapshots=str(tmp_path))
    try:
        assert ray.get(ray.get_actor(name).check.remote([new])) == [None]
        assert ray.get(ray.get_actor(name).save.remote()) == shards
    finally:
        close_index(name)
    held = 0
    for k in range(shards):
        shard = dedup._Shard(p, k, shards)
        assert shard._restore(str(tmp_path / f"shard-{k}-of-{shards}"))
        held += shard.size()
    assert held == 3
    again = index_name("next-run")
    create_index(again, p.model_dump(), pairs + [(new.id, new.to_json())], snapshots=str(tmp_path))
    try:
        copy = signature_of("c", {"image": None, "text": paragraph(40), "audio": None}, p)
        assert ray.get(ray.get_actor(again).check.remote([copy])) == ["n1"]
        assert ray.get(ray.get_actor(again).size.remote()) == 4   # the copy is not registered
    finally:
        close_index(again)
