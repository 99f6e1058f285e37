"""The incremental planner, table-driven and without Ray: stored state x scanned input -> plan.

Each case states what the store holds (aug-0 feature rows and rejects, as ``pipeline.incremental.lineage_of``
builds them), the rows the scan produced and the expected plan: the ids to process (with ``redo`` and
``keep``), the rejects decided at plan time (with their reason), and the unchanged, removed and
partial ids. Every case also checks the accounting invariant (each input id in exactly one of rows,
rejects, unchanged) and that planning the same input twice gives the same plan.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import pytest

from core.config import Config
from pipeline.plan import Lineage, Plan, assign_ids, make_plan, stable_split

CFG = Config()
FPS = {"sample": "fp-s1", "image": "fp-i1", "text": "fp-t1", "audio": "fp-a1", "video": "fp-v1", "all": "fp-all1"}


def fps(**changed: str) -> dict[str, str]:
    """The fingerprints with some changed; ``all`` changes with any of them, as in ``fingerprints``."""
    out = {**FPS, **changed}
    out["all"] = "fp-all:" + ",".join(f"{k}={out[k]}" for k in ("sample", "image", "text", "audio"))
    return out


# -- helpers: a scanned row, a stored feature row, a stored reject -----------------------------

def scan(id: str, *, label: str = "cat", split: str | None = "train", image: str = "", text: str = "",
         audio: str = "", reason: str = "", row: int | None = None) -> dict:
    """A row as ``ingest.scan`` writes it; ``image``/``text``/``audio`` are content hashes ("" = absent).
    A row rejected at scan (``reason``) keeps its media references but has no media hashes."""
    media = {"image": "" if reason else image, "audio": "" if reason else audio}
    return {
        "row": row, "id": id, "label": label, "split": split or "",
        "text": f"text of {text}" if text else "",
        "image_ref": f"{image}.jpg" if image else "", "audio_ref": f"{audio}.wav" if audio else "",
        "image_loc": f"/data/{image}.jpg" if image else "", "audio_loc": f"/data/{audio}.wav" if audio else "",
        "sha_image": media["image"], "sha_text": text, "sha_audio": media["audio"],
        "video_ref": "", "video_loc": "", "sha_video": "",
        "reject_stage": "ingest.scan" if reason else "", "reject_reason": reason,
        "reject_detail": f"scan said {reason}" if reason else "",
    }


def sample_sha(**kw) -> str:
    """The whole-sample hash the planner gives a scanned row with these fields."""
    r = scan("probe", **kw)
    assign_ids([r], CFG)
    return r["sha_sample"]


def feat(id: str, *, label: str = "cat", split: str = "train", image: str = "", text: str = "", audio: str = "",
         fp: dict[str, str] = FPS) -> tuple[str, str, dict]:
    """A stored aug-0 feature row, made under fingerprints ``fp``."""
    return "features", id, {"id": id, "aug": 0, "label": label, "split": split,
                            "sha_image": image, "sha_text": text, "sha_audio": audio, "sha_video": "",
                            "fp_image": fp["image"], "fp_text": fp["text"], "fp_audio": fp["audio"], "fp_video": fp["video"],
                            "fp_sample": fp["sample"]}


SCAN_REASONS = {"missing_file", "path_outside_root", "empty_record"}


def rej(id: str, reason: str, detail: str = "", *, fp: dict[str, str] = FPS, **content) -> tuple[str, str, dict]:
    """A stored reject of a row with this content (``scan`` keywords), made under fingerprints ``fp``."""
    if reason in SCAN_REASONS:
        content["reason"] = reason
    return "rejects", id, {"id": id, "reason": reason, "detail": detail or f"stored {reason}",
                           "sha_sample": sample_sha(**content), "fp_all": fp["all"]}


def lineage(*entries: tuple[str, str, dict]) -> Lineage:
    lin = Lineage()
    for table, id, entry in entries:
        getattr(lin, table)[id] = entry
        if table == "features":
            lin.keys[id] = [0, 1] if entry["split"] == "train" else [0]
    return lin


def R(redo: str, keep: str = "", **fields) -> dict:
    """An expected row of ``plan.rows``: a partial row keeps the stored modalities it does not redo."""
    return {"redo": redo, "keep": keep, **fields}


def X(reason: str, detail: str | None = None) -> dict:
    """An expected row of ``plan.rejects`` (detail checked when given)."""
    return {"reject_reason": reason} | ({} if detail is None else {"reject_detail": detail})


@dataclass
class Case:
    name: str
    stored: list
    scanned: list[dict]
    rows: dict[str, dict] = field(default_factory=dict)
    rejects: dict[str, dict] = field(default_factory=dict)
    unchanged: set[str] = field(default_factory=set)
    removed: set[str] = field(default_factory=set)
    partial: set[str] = field(default_factory=set)
    fps: dict[str, str] = field(default_factory=lambda: FPS)
    dedup: bool = True


# Content-derived id and the hash split, computed once: the case table states them literally.
CONTENT_ID = sample_sha(text="t-noid", image="i-noid")
NOSPLIT = stable_split("nosplit", CFG.split.train, CFG.split.val)

CASES = [
    # -- fresh store ------------------------------------------------------------------------
    Case("empty-store-all-new", stored=[],
         scanned=[scan("a", image="i1", text="t1", audio="a1"), scan("b", text="t2"), scan("c", audio="a3", text="t3")],
         rows={"a": R("image,text,audio"), "b": R("text"), "c": R("text,audio")}),
    Case("dedup-off-duplicates-all-kept", stored=[], dedup=False,
         scanned=[scan("a", text="t1"), scan("b", text="t1")],
         rows={"a": R("text"), "b": R("text")}),
    # -- idempotence -------------------------------------------------------------------------
    Case("identical-rerun-unchanged",
         stored=[feat("a", image="i1", text="t1", audio="a1"), feat("b", text="t2", split="val"),
                 rej("c", "too_blurry", image="i3")],
         scanned=[scan("a", image="i1", text="t1", audio="a1"), scan("b", text="t2", split="val"), scan("c", image="i3")],
         unchanged={"a", "b", "c"}),
    Case("stored-scan-reject-unchanged",
         stored=[rej("m", "missing_file", image="gone")],
         scanned=[scan("m", image="gone", reason="missing_file")],
         unchanged={"m"}),
    Case("stored-bad-split-unchanged",
         stored=[rej("s", "bad_split", text="t1", split="dev")],
         scanned=[scan("s", text="t1", split="dev")],
         unchanged={"s"}),
    Case("stored-duplicate-with-kept-unchanged",
         stored=[feat("a", text="t1"), rej("b", "duplicate", "a", text="t1")],
         scanned=[scan("a", text="t1"), scan("b", text="t1")],
         unchanged={"a", "b"}),
    Case("stored-repeated-ids-unchanged",
         stored=[feat("x", text="t1"), rej("x~2", "duplicate", "x", text="t1"),
                 rej("x~3", "duplicate_id", "id x repeated in the input", text="t2")],
         scanned=[scan("x", text="t1"), scan("x", text="t1"), scan("x", text="t2")],
         unchanged={"x", "x~2", "x~3"}),
    # -- content changes -----------------------------------------------------------------------
    Case("image-content-changed-partial",
         stored=[feat("a", image="i1", text="t1", audio="a1"), feat("b", image="i2", text="t2")],
         scanned=[scan("a", image="i1-new", text="t1", audio="a1"), scan("b", image="i2", text="t2")],
         rows={"a": R("image", "text,audio")}, partial={"a"}, unchanged={"b"}),
    Case("text-content-changed-partial",
         stored=[feat("a", image="i1", text="t1")],
         scanned=[scan("a", image="i1", text="t1-new")],
         rows={"a": R("text", "image")}, partial={"a"}),
    Case("two-modalities-changed-partial",
         stored=[feat("a", image="i1", text="t1", audio="a1")],
         scanned=[scan("a", image="i1-new", text="t1", audio="a1-new")],
         rows={"a": R("image,audio", "text")}, partial={"a"}),
    Case("label-changed-full",
         stored=[feat("a", label="cat", image="i1", text="t1"), feat("b", text="t2")],
         scanned=[scan("a", label="dog", image="i1", text="t1"), scan("b", text="t2")],
         rows={"a": R("image,text")}, unchanged={"b"}),
    Case("split-changed-full",
         stored=[feat("a", split="train", image="i1", text="t1"), feat("b", text="t2")],
         scanned=[scan("a", split="test", image="i1", text="t1"), scan("b", text="t2")],
         rows={"a": R("image,text")}, unchanged={"b"}),
    Case("input-removed",
         stored=[feat("a", text="t1"), feat("b", text="t2"), rej("c", "too_short", audio="a3")],
         scanned=[scan("a", text="t1")],
         unchanged={"a"}, removed={"b", "c"}),
    Case("everything-removed",
         stored=[feat("a", text="t1"), rej("c", "too_short", audio="a3")], scanned=[],
         removed={"a", "c"}),
    # -- fingerprint changes -------------------------------------------------------------------
    # -- a stored duplicate whose kept row is rejected or loses its place ------------------------
    Case("duplicates-order-swapped-first-in-input-kept",
         stored=[feat("a", text="t1"), rej("b", "duplicate", "a", text="t1")],
         scanned=[scan("b", text="t1", row=0), scan("a", text="t1", row=1)],
         rows={"b": R("text")}, rejects={"a": X("duplicate", "b")}),
    Case("kept-row-now-missing-duplicate-kept-instead",
         stored=[feat("a", image="i1"), rej("b", "duplicate", "a", image="i1")],
         scanned=[scan("a", image="i1", reason="missing_file"), scan("b", image="i1")],
         rows={"b": R("image")}, rejects={"a": X("missing_file")}),
    Case("new-row-first-stale-duplicate-detail-renewed",
         stored=[feat("a", text="t1"), rej("b", "duplicate", "a", text="t1")],
         scanned=[scan("n", text="t1", row=0), scan("a", text="t1", row=1), scan("b", text="t1", row=2)],
         rows={"n": R("text")}, rejects={"a": X("duplicate", "n"), "b": X("duplicate", "n")}),
    Case("audio-fingerprint-changed-partial",
         stored=[feat("a", text="t1", audio="a1"), feat("b", image="i2", audio="a2"), feat("c", audio="a3")],
         scanned=[scan("a", text="t1", audio="a1"), scan("b", image="i2", audio="a2"), scan("c", audio="a3")],
         fps=fps(audio="fp-a2"),
         rows={"a": R("audio", "text"), "b": R("audio", "image"), "c": R("audio")},
         partial={"a", "b", "c"}),
    Case("sample-fingerprint-changed-full",
         stored=[feat("a", image="i1", text="t1", audio="a1"), feat("b", text="t2")],
         scanned=[scan("a", image="i1", text="t1", audio="a1"), scan("b", text="t2")],
         fps=fps(sample="fp-s2"),
         rows={"a": R("image,text,audio"), "b": R("text")}),
    Case("stored-reject-fingerprint-changed-again",
         stored=[rej("c", "too_short", audio="a3"), rej("m", "missing_file", image="gone")],
         scanned=[scan("c", audio="a3"), scan("m", image="gone", reason="missing_file")],
         fps=fps(audio="fp-a2"),
         rows={"c": R("audio")}, rejects={"m": X("missing_file")}),
    # -- stored rejects ------------------------------------------------------------------------
    Case("stored-reject-content-changed-again",
         stored=[rej("c", "too_blurry", image="i3"), rej("d", "too_short", audio="a4")],
         scanned=[scan("c", image="i3-new", text="t3"), scan("d", audio="a4")],
         rows={"c": R("image,text")}, unchanged={"d"}),
    Case("stored-scan-reject-now-readable",
         stored=[rej("m", "missing_file", image="i-found")],
         scanned=[scan("m", image="i-found")],
         rows={"m": R("image")}),
    Case("stored-scan-reject-other-reason",
         stored=[rej("m", "missing_file", image="gone")],
         scanned=[scan("m", image="gone", reason="path_outside_root")],
         rejects={"m": X("path_outside_root", "scan said path_outside_root")}),
    Case("interrupted-run-features-and-reject-full",
         stored=[feat("a", image="i1", text="t1"), rej("a", "too_blurry", image="i1", text="t1")],
         scanned=[scan("a", image="i1", text="t1")],
         rows={"a": R("image,text")}),
    Case("interrupted-run-scan-reject-again",
         stored=[feat("m", image="gone"), rej("m", "missing_file", image="gone")],
         scanned=[scan("m", image="gone", reason="missing_file")],
         rejects={"m": X("missing_file")}),
    Case("stored-feature-now-scan-rejected",
         stored=[feat("a", image="i1", text="t1")],
         scanned=[scan("a", image="i1", text="t1", reason="missing_file")],
         rejects={"a": X("missing_file")}),
    # -- rejects decided at plan time ----------------------------------------------------------
    Case("scan-reject-new",
         stored=[],
         scanned=[scan("a", text="t1"), scan("m", image="gone", reason="missing_file"), scan("e", reason="empty_record")],
         rows={"a": R("text")}, rejects={"m": X("missing_file", "scan said missing_file"), "e": X("empty_record")}),
    Case("exact-duplicate-first-kept",
         stored=[],
         scanned=[scan("a", image="i1", text="t1"), scan("b", image="i1", text="t1"), scan("c", image="i1", text="t1")],
         rows={"a": R("image,text")}, rejects={"b": X("duplicate", "a"), "c": X("duplicate", "a")}),
    Case("exact-duplicate-first-by-row-number",
         stored=[],
         scanned=[scan("b", text="t1", row=1), scan("a", text="t1", row=0)],
         rows={"a": R("text")}, rejects={"b": X("duplicate", "a")}),
    Case("same-content-other-label-not-duplicate",
         stored=[],
         scanned=[scan("a", label="cat", text="t1"), scan("b", label="dog", text="t1")],
         rows={"a": R("text"), "b": R("text")}),
    Case("new-duplicate-of-stored-row",
         stored=[feat("a", text="t1")],
         scanned=[scan("a", text="t1"), scan("b", text="t1")],
         unchanged={"a"}, rejects={"b": X("duplicate", "a")}),
    Case("repeated-id-same-content",
         stored=[],
         scanned=[scan("x", text="t1"), scan("x", text="t1")],
         rows={"x": R("text")}, rejects={"x~2": X("duplicate", "x")}),
    Case("repeated-id-other-content",
         stored=[],
         scanned=[scan("x", text="t1"), scan("x", text="t2"), scan("x", image="i3")],
         rows={"x": R("text")},
         rejects={"x~2": X("duplicate_id", "id x repeated in the input"),
                  "x~3": X("duplicate_id", "id x repeated in the input")}),
    Case("bad-split",
         stored=[],
         scanned=[scan("s", text="t1", split="dev"), scan("a", text="t2", split="val")],
         rows={"a": R("text", split="val")},
         rejects={"s": X("bad_split", "split must be train, val or test, not 'dev'")}),
    Case("bad-split-not-a-duplicate-keeper",
         stored=[],
         scanned=[scan("s", text="t1", split="dev"), scan("a", text="t1")],
         rows={"a": R("text")}, rejects={"s": X("bad_split")}),
    # -- stored duplicates whose kept row moved ------------------------------------------------
    Case("stored-duplicate-kept-changed-again",
         stored=[feat("a", text="t1"), rej("b", "duplicate", "a", text="t1")],
         scanned=[scan("a", text="t1-new"), scan("b", text="t1")],
         rows={"a": R("text"), "b": R("text")}, partial={"a"}),
    Case("stored-duplicate-kept-removed-again",
         stored=[feat("a", text="t1"), rej("b", "duplicate", "a", text="t1")],
         scanned=[scan("b", text="t1")],
         rows={"b": R("text")}, removed={"a"}),
    Case("stored-duplicate-kept-changed-new-keeper",
         stored=[feat("a", text="t1"), rej("b", "duplicate", "a", text="t1")],
         scanned=[scan("a", text="t1-new"), scan("c", text="t1"), scan("b", text="t1")],
         rows={"a": R("text"), "c": R("text")}, partial={"a"},
         rejects={"b": X("duplicate", "c")}),
    # -- ids and splits ------------------------------------------------------------------------
    Case("id-from-content-when-missing",
         stored=[],
         scanned=[scan("", text="t-noid", image="i-noid")],
         rows={CONTENT_ID: R("image,text")}),
    Case("id-from-content-rerun-unchanged",
         stored=[feat(CONTENT_ID, text="t-noid", image="i-noid")],
         scanned=[scan("", text="t-noid", image="i-noid")],
         unchanged={CONTENT_ID}),
    Case("missing-split-gets-hash-split",
         stored=[],
         scanned=[scan("nosplit", text="t1", split=None)],
         rows={"nosplit": R("text", split=NOSPLIT)}),
    Case("missing-split-rerun-unchanged",
         stored=[feat("nosplit", text="t1", split=NOSPLIT)],
         scanned=[scan("nosplit", text="t1", split=None)],
         unchanged={"nosplit"}),
]


def _plan(case: Case) -> Plan:
    scanned = copy.deepcopy(case.scanned)   # the planner fills ids, splits and reasons in place
    for n, r in enumerate(scanned):
        if r["row"] is None:
            r["row"] = n
    return make_plan(scanned, lineage(*copy.deepcopy(case.stored)), case.fps, CFG, dedup=case.dedup)


def _summary(plan: Plan) -> tuple:
    return ([(r["id"], r["redo"], r["keep"], r["split"]) for r in plan.rows],
            [(r["id"], r["reject_reason"], r["reject_detail"]) for r in plan.rejects],
            sorted(plan.unchanged), sorted(plan.removed), sorted(plan.partial), plan.input_ids)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_plan(case: Case) -> None:
    plan = _plan(case)

    rows = {r["id"]: r for r in plan.rows}
    assert len(rows) == len(plan.rows), "an id planned twice"
    assert set(rows) == set(case.rows)
    for id, want in case.rows.items():
        assert {k: rows[id][k] for k in want} == want, id
        assert rows[id]["fp_all"] == case.fps["all"]
    rejects = {r["id"]: r for r in plan.rejects}
    assert len(rejects) == len(plan.rejects), "an id rejected twice"
    assert set(rejects) == set(case.rejects)
    for id, want in case.rejects.items():
        assert {k: rejects[id][k] for k in want} == want, id
        assert rejects[id]["reject_stage"]
    assert plan.unchanged == case.unchanged
    assert plan.removed == case.removed
    assert plan.partial == case.partial

    # Accounting: every input id in exactly one of rows, rejects, unchanged; none of them removed.
    assert len(plan.input_ids) == len(set(plan.input_ids)) == len(case.scanned)
    buckets = [set(rows), set(rejects), plan.unchanged]
    for id in plan.input_ids:
        assert sum(id in b for b in buckets) == 1, id
    assert set().union(*buckets) == set(plan.input_ids)
    assert not plan.removed & set(plan.input_ids)
    assert plan.partial <= set(rows)
    assert plan.processed_ids == set(rows) | set(rejects)

    # The same input planned again (fresh copies) gives the same plan: ids, splits, decisions.
    assert _summary(_plan(case)) == _summary(plan)


class _LineageStore:
    """What the streamed planner reads of a store: row counts and lineage batches."""

    def __init__(self, lin: Lineage):
        import pyarrow as pa

        from pipeline.incremental import FEATURE_LINEAGE, REJECT_LINEAGE

        rows = [{**lin.features[i], "aug": a} for i, augs in lin.keys.items() for a in augs]
        self.tables = {"features": pa.Table.from_pylist([{c: r.get(c) for c in FEATURE_LINEAGE} for r in rows]),
                       "rejects": pa.Table.from_pylist([{c: r.get(c) for c in REJECT_LINEAGE} for r in lin.rejects.values()])}

    def count(self, which: str, filter=None) -> int:
        return self.tables[which].num_rows

    def batches(self, which: str, columns: list[str]):
        table = self.tables[which]
        return table.select(columns).to_batches(max_chunksize=1) if table.num_rows else iter(())


@pytest.mark.parametrize("bucket_rows", [1, 2, 1000])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_streamed_plan_equals_the_plan_in_memory(case: Case, bucket_rows: int, tmp_path) -> None:
    """The planner that buckets input and lineage by id (one bucket per row, per two rows, one in
    all) decides every row as ``make_plan`` does over everything at once, and supersedes the same
    stored keys."""
    from pipeline.incremental import Planner

    want = _plan(case)
    scanned = copy.deepcopy(case.scanned)
    for n, r in enumerate(scanned):
        if r["row"] is None:
            r["row"] = n
    cfg = CFG.model_copy(update={"execution": CFG.execution.model_copy(update={"plan_bucket_rows": bucket_rows})})
    planner = Planner(_LineageStore(lineage(*copy.deepcopy(case.stored))), case.fps, cfg, "run-1", tmp_path,
                      expected_rows=len(scanned), dedup=case.dedup)
    for k in range(0, len(scanned), 2):   # the scan's output arrives in chunks
        planner.add(scanned[k:k + 2])
    got = planner.finish()

    assert got.buckets == 1 if bucket_rows == 1000 else got.buckets >= len(scanned) / bucket_rows
    assert sorted((r["id"], r["redo"], r["keep"], r["split"], r["fp_all"]) for r in got.rows.dicts()) == \
        sorted((r["id"], r["redo"], r["keep"], r["split"], r["fp_all"]) for r in want.rows)
    assert sorted((r["id"], r["reason"], r["detail"]) for r in got.rejects.dicts()) == \
        sorted((r["id"], r["reject_reason"], r["reject_detail"]) for r in want.rejects)
    assert (got.input, got.unchanged, got.removed, got.partial) == \
        (len(want.input_ids), len(want.unchanged), len(want.removed), len(want.partial))
    assert {r["id"] for r in got.removed_ids.dicts()} == want.removed
    stored = lineage(*copy.deepcopy(case.stored))
    touched = want.processed_ids | want.removed
    assert sorted((r["id"], r["aug"]) for r in got.feature_tombs.dicts()) == \
        sorted((i, a) for i in touched for a in stored.keys.get(i, []))
    assert sorted(r["id"] for r in got.reject_tombs.dicts()) == sorted(i for i in touched if i in stored.rejects)


def test_a_streamed_rerun_decides_unchanged_rows_without_making_them_python_rows(tmp_path, monkeypatch):
    """Unchanged rows of a bucket with distinct ids are found by Arrow joins: ``plan_rows`` sees
    only the changed row, and the plan still counts every unchanged one."""
    import pipeline.incremental as inc

    stored = [feat(f"u{i}", text=f"t{i}") for i in range(6)]
    scanned = [scan(f"u{i}", text=f"t{i}" if i != 2 else "changed", row=i) for i in range(6)]
    seen = []
    real = inc.plan_rows
    monkeypatch.setattr(inc, "plan_rows", lambda rows, *a, **k: (seen.extend(r["id"] for r in rows), real(rows, *a, **k))[1])
    planner = inc.Planner(_LineageStore(lineage(*stored)), FPS, CFG, "run-1", tmp_path, expected_rows=6)
    planner.add(scanned)
    got = planner.finish()
    assert seen == ["u2"]
    assert got.unchanged == 5 and [r["id"] for r in got.rows.dicts()] == ["u2"]
