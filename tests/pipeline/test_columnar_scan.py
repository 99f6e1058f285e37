"""The scan's columnar path (JSONL chunks read by Arrow, ids assigned over columns) gives exactly
what the row-by-row path gives, and is the path the usual manifest takes."""
from __future__ import annotations

import json

import pyarrow as pa
import pytest

import pipeline.sources as sources
from core.config import Config, SourceConfig
from pipeline.incremental import SCANNED
from pipeline.plan import assign_ids, assign_ids_table
from pipeline.sources import iter_source, iter_source_tables, records_table

CLEAN = [
    {"id": "a1", "label": "cat", "text": "a cat on a mat"},
    {"id": "a2", "label": "dog", "split": "val", "text": "  leading and trailing  ", "image": "img/a2.png"},
    {"label": "cat", "text": "no id: made from the content"},
    {"id": "a4", "label": " ", "text": "blank label", "audio": "clips/a4.wav"},
    {"id": "a5", "label": "dog", "text": "\u3000\u2028", "image": "img/a5.png"},   # blank text: absent
    {"id": "a6", "label": "cat", "text": "caf\u00e9 \U0001F408 \u4e2d\u6587", "video": "v/a6.mp4"},
    {"id": "a7", "label": None, "split": None, "text": "nulls are absent"},
    {"id": "\x1c", "label": "dog", "text": "an id Python calls blank"},
    {"id": "a9", "label": "cat", "text": "x" * 60_000},
]
ODD = [
    '{"id": "b1", "label": "cat", "text": "other columns", "source_url": "http://example.invalid/x"}',
    '{"id": "b2", "label": 3, "text": "a number label"}',
    '[1, 2, 3]',
    '{"id": "b4", "text": "not closed"',
    '{"id": "b5", "text": "escaped surrogate \\ud83d\\ude00"}',
    '{"id": "b6", "text": "' + "y" * 70_000 + '"}',
    '{"id": "b7", "label": "cat", "text": "two objects"} {"id": "b8"}',
    '{"id": "b9", "label": "cat", "text": "a lone \\ud800 surrogate"}',
]


def _write(path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def _both(path, chunk_rows: int) -> tuple[pa.Table, pa.Table]:
    cfg = SourceConfig(path=str(path))
    columnar = pa.concat_tables(iter_source_tables(cfg, chunk_rows))
    by_row = records_table([r for chunk in iter_source(cfg, chunk_rows) for r in chunk])
    return columnar, by_row


@pytest.mark.parametrize("chunk_rows", [1, 4, 1000])
def test_columnar_manifest_equals_the_row_path(tmp_path, chunk_rows):
    lines = [json.dumps(r, ensure_ascii=False) for r in CLEAN] + ["", "   "] + ODD + [json.dumps(r, ensure_ascii=False) for r in CLEAN[:3]]
    path = tmp_path / "m.jsonl"
    _write(path, lines)
    columnar, by_row = _both(path, chunk_rows)
    assert columnar.num_rows == len(CLEAN) + len(ODD) + 3
    assert columnar.to_pylist() == by_row.to_pylist()
    lone = [r for r in columnar.to_pylist() if "surrogate (" in r["bad"]]
    assert len(lone) == 1 and lone[0]["id"].startswith("manifest-line-")


def test_the_usual_manifest_takes_the_arrow_path(tmp_path, monkeypatch):
    path = tmp_path / "m.jsonl"
    _write(path, [json.dumps(r, ensure_ascii=False) for r in CLEAN] * 3 + [ODD[2]])
    taken = []
    fast = sources._jsonl_table
    monkeypatch.setattr(sources, "_jsonl_table", lambda *a: taken.append(fast(*a)) or taken[-1])
    rowwise = []
    record = sources._record
    monkeypatch.setattr(sources, "_record", lambda *a: rowwise.append(a[1]) or record(*a))
    columnar, by_row = _both(path, len(CLEAN))
    assert [t is not None for t in taken] == [True, True, True, False]   # the last chunk holds a JSON array
    assert rowwise.count(3 * len(CLEAN)) == 2   # its one row went through _record here and in iter_source
    assert columnar.to_pylist() == by_row.to_pylist()


def test_assign_ids_over_columns_equals_the_row_path():
    cfg = Config.model_validate({"store": "unused"})
    base = {c: "" for c in SCANNED.names if c not in ("row", "sha_sample")}
    rows = []
    for k, change in enumerate([
        {"id": "x1", "label": "cat", "text": "t", "sha_text": "aa"},
        {"label": "dog", "sha_image": "bb", "image_ref": "img/1.png"},
        {"label": "dog", "image_ref": "http://h/x.png"},                      # no hash yet: its reference
        {"id": "x4", "split": "val", "label": "cat", "sha_text": "cc"},
        {"id": "x5", "split": "holdout", "label": "cat", "sha_text": "dd"},
        {"id": "x6", "split": 'it"s', "label": "cat", "reject_stage": "ingest.scan", "reject_reason": "missing_file"},
        {"id": "x7", "label": "caf\u00e9", "sha_video": "ee", "video_ref": "v/7.mp4"},
        {"id": "x8", "label": "cat", "video_ref": "v/8.mp4", "sha_text": "ff"},
        {"id": "x9", "label": "dog", "sha_audio": "gg", "sha_video": "hh"},
        {"id": "y1", "label": 'a "quoted" \\ label\x7f', "sha_text": "ii"},   # escapes: the Python path
        {"label": "cat", "image_ref": "img/\u00e9t\u00e9.png", "sha_video": "jj"},
        {"label": "", "reject_stage": "ingest.scan", "reject_reason": "empty_record"},
    ]):
        rows.append({**base, "row": k, **change})
    for derived in ({}, {"audio": "video"}):
        by_row = [dict(r) for r in rows]
        assign_ids(by_row, cfg, derived)
        table = assign_ids_table(pa.Table.from_pylist(rows), cfg, derived)
        assert table.select(SCANNED.names).to_pylist() == pa.Table.from_pylist(by_row, schema=SCANNED).to_pylist()
    assert {r["reject_reason"] for r in by_row if r["id"] in ("x5", "x6")} == {"bad_split"}
