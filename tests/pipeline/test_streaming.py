"""What lets a run stream: sources read in chunks, spills, and commits that write data files and
rewrite only the stored files holding superseded rows."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from core.config import SourceConfig
import core.store
from core.schema import FEATURES_SCHEMA
from core.store import DataFiles, Store, row_keys
from pipeline.sources import SourceError, iter_source, read_source, source_size
from pipeline.incremental import base_ids
from pipeline.spill import Partitioned, Spill, in_sorted

ROOT = Path(__file__).resolve().parents[2]


def _rows(n: int, run: str, start: int = 0) -> pa.Table:
    rows = [{"id": f"r{i}", "label": "a", "split": "train", "aug": 0, "has_text": True, "text_emb": [float(i)],
             "run_id": run} for i in range(start, start + n)]
    return pa.Table.from_pylist([{f.name: r.get(f.name) for f in FEATURES_SCHEMA} for r in rows], schema=FEATURES_SCHEMA)


def _commit(store: Store, table: pa.Table, run: str, delete: list[str] = ()) -> int | None:
    files = store.data_files("features", run)
    files.write(table)
    return store.commit("features", files, pa.array(list(delete), pa.string()), run)


@pytest.mark.parametrize("threads", [1, 3])
def test_commit_rewrites_only_the_files_holding_deleted_keys(tmp_path, monkeypatch, threads):
    monkeypatch.setattr(DataFiles, "FILE_ROWS", 10)
    monkeypatch.setattr(DataFiles, "GROUP_ROWS", 5)
    monkeypatch.setattr(core.store, "REWRITE_THREADS", threads)
    store = Store(str(tmp_path / "s"))
    assert _commit(store, _rows(30, "run-a"), "run-a") == 0
    first = set(store.table(store.features_uri).file_uris())
    assert len(first) == 3   # 10 rows a file
    # upsert r3 and r25 (delete their old keys, add new rows), delete r4
    new = pa.concat_tables([_rows(1, "run-b", 3), _rows(1, "run-b", 25)])
    v = _commit(store, new, "run-b", delete=["r3\t0", "r4\t0", "r25\t0"])
    assert v == 1
    t = store.read("features")
    assert t.num_rows == 29 and sorted(t["id"].to_pylist()) == sorted(f"r{i}" for i in range(30) if i != 4)
    assert {r["id"]: r["run_id"] for r in t.to_pylist()}["r3"] == "run-b"
    after = set(store.table(store.features_uri).file_uris())
    assert len(first & after) == 1, "the file holding none of the keys (r10..r19) is kept as it is"
    assert {DataFiles.run_of(Path(u).name) for u in after - first} == {"run-b"}   # recover() knows whose they are
    assert store.read("features", version=0).num_rows == 30   # time travel
    assert _commit(store, _rows(0, "run-c"), "run-c") is None   # nothing to do: no new version


def test_a_data_file_ends_at_file_bytes_for_wide_rows(tmp_path, monkeypatch):
    """Wide rows (media embeddings) end a file by its stored size before FILE_ROWS: a read task of
    training takes a whole file."""
    monkeypatch.setattr(DataFiles, "GROUP_ROWS", 5)
    store = Store(str(tmp_path / "s"))
    wide = _rows(30, "run-a").set_column(FEATURES_SCHEMA.get_field_index("text_emb"), "text_emb",
                                         pa.array([np.random.default_rng(i).random(2000).tolist() for i in range(30)],
                                                  FEATURES_SCHEMA.field("text_emb").type))
    group_bytes = 5 * 2000 * 4
    monkeypatch.setattr(DataFiles, "FILE_BYTES", 2 * group_bytes)   # two row groups a file
    assert _commit(store, wide, "run-a") == 0
    sizes = [n for n in (pq.ParquetFile(f).metadata.num_rows for f in sorted((tmp_path / "s" / "features").glob("*.parquet")))]
    assert sizes == [10, 10, 10] and store.read("features").num_rows == 30


def test_a_failed_rewrite_fails_the_commit_and_leaves_files_recover_removes(tmp_path, monkeypatch):
    monkeypatch.setattr(DataFiles, "FILE_ROWS", 10)
    monkeypatch.setattr(DataFiles, "GROUP_ROWS", 5)
    monkeypatch.setattr(core.store, "REWRITE_THREADS", 3)
    store = Store(str(tmp_path / "s"))
    _commit(store, _rows(30, "run-a"), "run-a")
    assert len(store.table(store.features_uri).file_uris()) == 3
    store.write_text("runs/run-a.json", json.dumps({"run_id": "run-a", "started": "1"}))
    real = DataFiles.delete_from

    def flaky(self, name, *args):
        if "00001" in name:
            raise OSError("disk gone")
        return real(self, name, *args)

    monkeypatch.setattr(DataFiles, "delete_from", flaky)
    with pytest.raises(OSError, match="disk gone"):
        _commit(store, _rows(1, "run-b", 3), "run-b", delete=[f"r{i}\t0" for i in (3, 13, 23)])
    assert store.table(store.features_uri).version() == 0 and store.read("features").num_rows == 30
    store.recover()
    assert not any("run-b" in p.name for p in (tmp_path / "s" / "features").glob("*.parquet"))


def test_recover_removes_the_data_files_of_a_run_that_never_committed(tmp_path):
    store = Store(str(tmp_path / "s"))
    _commit(store, _rows(5, "run-a"), "run-a")
    store.write_text("runs/run-a.json", json.dumps({"run_id": "run-a", "started": "1"}))
    dead = store.data_files("features", "run-dead")
    dead.write(_rows(5, "run-dead", 5))
    dead.close()   # written, never committed (the run was killed)
    names = lambda: sorted(p.name for p in (tmp_path / "s" / "features").glob("*.parquet"))   # noqa: E731
    assert any("run-dead" in n for n in names())
    store.recover()
    assert not any("run-dead" in n for n in names()) and any("run-a" in n for n in names())
    assert store.read("features").num_rows == 5


def test_row_keys_join_id_and_aug():
    t = pa.table({"id": ["a", "b"], "aug": pa.array([0, 2], pa.int32())})
    assert row_keys(t, "features").to_pylist() == ["a\t0", "b\t2"]
    assert row_keys(t, "rejects").to_pylist() == ["a", "b"]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_manifests_are_read_in_chunks_in_input_order(tmp_path, suffix):
    rows = [{"id": f"r{i}", "label": "a", "text": f"text {i}"} for i in range(25)]
    path = tmp_path / f"m{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".csv":
        path.write_text("id,label,text\n" + "".join(f"{r['id']},{r['label']},{r['text']}\n" for r in rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    cfg = SourceConfig(path=str(path))
    chunks = list(iter_source(cfg, chunk_rows=10))
    assert [len(c) for c in chunks] == [10, 10, 5]
    assert [r.row for c in chunks for r in c] == list(range(25))
    assert [r.id for c in chunks for r in c] == [r.id for r in read_source(cfg)]
    assert source_size(cfg) in (25, 26)   # lines (a CSV's header counts) or Parquet rows


def test_bad_manifest_lines_become_bad_records_and_the_rest_is_read(tmp_path):
    """A 10-million-line manifest is not lost to one bad line: each bad line is a record the scan
    rejects (``bad_record``), with an id made from its line number and the line in the detail."""
    from pipeline.sources import MAX_LINE_BYTES

    good = [json.dumps({"id": f"r{i}", "text": "x y z"}) for i in range(30)]
    bad = ["{not json", "[1, 2, 3]", json.dumps({"id": "listy", "text": ["a", "b"]}),
           json.dumps({"id": "x" * 70_000, "text": "long id"})]
    path = tmp_path / "m.jsonl"
    with path.open("wb") as f:
        f.write(("\n".join(good[:10] + bad[:2] + good[10:20] + bad[2:4]) + "\n").encode())
        f.write(b"\xff\xfe not utf-8\n")
        f.write(b"{" + b" " * (MAX_LINE_BYTES + 10) + b"}\n")   # longer than a line may be
        f.write(("\n".join(good[20:]) + "\n").encode())
    records = [r for chunk in iter_source(SourceConfig(path=str(path)), chunk_rows=7) for r in chunk]
    assert [r.id for r in records if not r.bad] == [f"r{i}" for i in range(30)]
    flagged = {r.id: r.bad for r in records if r.bad}
    assert list(flagged) == ["manifest-line-11", "manifest-row-12", "listy", "manifest-row-24", "manifest-line-25",
                             "manifest-line-26"]
    assert "line 11 is not valid JSON" in flagged["manifest-line-11"]
    assert "a JSON list, not an object" in flagged["manifest-row-12"]
    assert "text is a list" in flagged["listy"]
    assert "id is 70000 characters" in flagged["manifest-row-24"]
    assert "not UTF-8" in flagged["manifest-line-25"]
    assert f"longer than {MAX_LINE_BYTES} bytes" in flagged["manifest-line-26"]


def test_csv_rows_with_the_wrong_number_of_fields_become_bad_records(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("id,label,text\nr0,a,one\nr1,a,two,extra\nr2,a,three\nr3\nr4,a,four\n")
    records = [r for chunk in iter_source(SourceConfig(path=str(path))) for r in chunk]
    assert [r.id for r in records if not r.bad] == ["r0", "r2", "r4"]
    assert sorted(r.bad.split(":")[0] for r in records if r.bad) == ["line 3 has 4 fields, expected 3",
                                                                     "line 5 has 1 fields, expected 3"]


def test_spills_read_back_what_was_added_across_files_and_partitions(tmp_path):
    schema = pa.schema([("id", pa.string()), ("n", pa.int64())])
    spill = Spill(tmp_path / "s.parquet", schema, group_rows=4)
    spill.add_rows([{"id": f"x{i}", "n": i} for i in range(10)])
    assert [g for _, g in spill.groups()] == [0, 1, 2]
    spill.add_rows([{"id": "late", "n": 10}])   # added after a read: a further file
    assert [r["n"] for r in spill.dicts()] == list(range(11)) and spill.rows == 11
    parts = Partitioned(tmp_path / "p", schema, 4, "id", key=base_ids)
    parts.add(pa.Table.from_pylist([{"id": f"k{i % 7}" + ("~2" if i > 20 else ""), "n": i} for i in range(30)], schema=schema))
    seen = {}
    for k, part in enumerate(parts.close().parts):
        for r in part.dicts():
            seen.setdefault(r["id"].split("~")[0], set()).add(k)
    assert all(len(ks) == 1 for ks in seen.values()), "a key and its ~n forms meet in one part"
    assert parts.rows == 30 and sum(len(list(p.dicts())) for p in parts.parts) == 30
    assert pc.sum(pa.concat_tables([p.table() for p in parts.parts])["n"]).as_py() == sum(range(30))


def test_in_sorted_is_isin_against_a_sorted_array():
    rng = np.random.default_rng(0)
    members = np.sort(rng.integers(0, 2**63, 5_000, dtype=np.uint64))
    values = np.concatenate([rng.choice(members, 300), rng.integers(0, 2**63, 300, dtype=np.uint64)])
    assert (in_sorted(values, members) == np.isin(values, members)).all()
    assert not in_sorted(values, np.zeros(0, np.uint64)).any()


HEAP_PROBE = """
from pipeline.spill import release_free_heap

def heap_kb():
    kb, heap = 0, False
    for line in open("/proc/self/smaps"):
        if "-" in line.split()[0] and not line.startswith(("Rss", "Size")):
            heap = line.rstrip().endswith("[heap]")
        elif heap and line.startswith("Rss:"):
            kb += int(line.split()[1])
    return kb

base = heap_kb()
rows = [{f"column_{k}": f"value {i} {k}" for k in range(40)} for i in range(60_000)]
keep = rows[::500]   # a few survivors, as a plan keeps a few objects per bucket
del rows
before = heap_kb()
release_free_heap()
print(base, before, heap_kb(), len(keep))
"""


def test_freed_row_dicts_leave_the_heap():
    """What the planner does after each bucket: rows made Python dicts, dropped, the C heap trimmed
    (in a fresh process: this one's heap holds whatever the tests before left)."""
    out = subprocess.run([sys.executable, "-c", HEAP_PROBE], capture_output=True, text=True, check=True, cwd=ROOT)
    base, before, after, kept = map(int, out.stdout.split())
    assert kept == 120
    assert before - base > 20_000, out.stdout   # the rows' dicts grew the heap by tens of MB
    assert before - after > 0.6 * (before - base), out.stdout   # and most of that went back
