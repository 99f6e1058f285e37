"""Commits that mark superseded rows in Delta deletion vectors instead of rewriting their files:
what mmpipe's readers, deltalake's own engine and polars read back, vectors replaced, checkpoints,
compaction, and the switch between vectors and copy on write."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from deltalake import DeltaTable

import core.store
from core import deletion
from core.config import ExecutionConfig
from core.maintenance import compact
from core.scan import ray_read
from core.schema import FEATURES_SCHEMA
from core.store import DataFiles, Store
from training.stream import open_snapshot


def _rows(ids: list[int], run: str) -> pa.Table:
    rows = [{"id": f"r{i}", "label": "a", "split": "train" if i % 3 else "val", "aug": 0, "has_text": True,
             "text_emb": [float(i)], "run_id": run} for i in ids]
    return pa.Table.from_pylist([{f.name: r.get(f.name) for f in FEATURES_SCHEMA} for r in rows], schema=FEATURES_SCHEMA)


def _commit(store: Store, ids: list[int], run: str, delete: list[int] = (), vectors_from: int | None = 0) -> int | None:
    files = store.data_files("features", run)
    files.write(_rows(ids, run))
    return store.commit("features", files, pa.array([f"r{i}\t0" for i in delete], pa.string()), run,
                        vectors_from=vectors_from)


def _engine(store: Store, version: int | None = None) -> dict[str, str]:
    """id -> run_id as deltalake's own engine reads the table (it applies deletion vectors)."""
    dt = DeltaTable(store.features_uri, version=version)
    t = pa.RecordBatchReader.from_stream(dt.scan(columns=["id", "run_id"])).read_all()
    assert len(set(t["id"].to_pylist())) == t.num_rows, "a row is live twice"
    return dict(zip(t["id"].to_pylist(), t["run_id"].to_pylist()))


def _ours(store: Store, version: int | None = None) -> dict[str, str]:
    t = store.read("features", version=version, columns=["id", "run_id"])
    assert len(set(t["id"].to_pylist())) == t.num_rows, "a row is live twice"
    return dict(zip(t["id"].to_pylist(), t["run_id"].to_pylist()))


@pytest.fixture
def small_files(monkeypatch):
    monkeypatch.setattr(DataFiles, "FILE_ROWS", 10)
    monkeypatch.setattr(DataFiles, "GROUP_ROWS", 5)   # files of two row groups: a vector spans both


@pytest.mark.parametrize("threads", [1, 3])
def test_a_small_change_marks_rows_and_keeps_the_files(tmp_path, small_files, monkeypatch, threads):
    monkeypatch.setattr(core.store, "REWRITE_THREADS", threads)
    store = Store(str(tmp_path / "s"))
    assert _commit(store, list(range(30)), "run-a") == 0
    first = set(store.table(store.features_uri).file_uris())
    _commit(store, [3, 25], "run-b", delete=[3, 4, 25])   # upsert r3 and r25, delete r4
    dt = store.table(store.features_uri)
    assert deletion.supported(dt)
    after = set(dt.file_uris())
    assert first < after and len(after - first) == 1, "no stored file rewritten, one new file"
    masks = deletion.deleted_rows(dt)
    assert sorted(len(d) for d in masks.values()) == [1, 2]   # r25's file, and r3 + r4's file
    expected = {f"r{i}": "run-b" if i in (3, 25) else "run-a" for i in range(30) if i != 4}
    assert _ours(store) == _engine(store) == expected
    assert dict(zip(*pl.read_delta(store.features_uri).select("id", "run_id").to_dict(as_series=False).values())) == expected
    assert store.count("features") == 29 and store.count("features", pc.field("split") == "val") == 10
    assert _ours(store, version=0) == _engine(store, version=0) == {f"r{i}": "run-a" for i in range(30)}   # time travel


def test_a_vector_is_replaced_and_a_mostly_deleted_file_rewritten(tmp_path, small_files):
    store = Store(str(tmp_path / "s"))
    _commit(store, list(range(30)), "run-a")
    _commit(store, [], "run-b", delete=[1, 2])
    _commit(store, [], "run-c", delete=[3, 4, 5])   # the file's vector grows to 5 of its 10 rows
    dt = store.table(store.features_uri)
    assert len(dt.file_uris()) == 3 and sorted(len(d) for d in deletion.deleted_rows(dt).values()) == [5]
    assert len(deletion.descriptors(store.fs, store.path_of("features"), dt.version())) == 1
    _commit(store, [], "run-d", delete=[6])   # past DV_MAX_SHARE: the file's 4 live rows are written anew
    dt = store.table(store.features_uri)
    assert len(dt.file_uris()) == 3 and not deletion.deleted_rows(dt)
    assert deletion.descriptors(store.fs, store.path_of("features"), dt.version()) == {}
    expected = {f"r{i}": "run-a" for i in [0, 7, 8, 9, *range(10, 30)]}
    assert _ours(store) == _engine(store) == expected
    _commit(store, [], "run-e", delete=list(range(10, 20)))   # a whole file: removed, nothing written
    assert len(store.table(store.features_uri).file_uris()) == 2 and set(_engine(store)) == set(expected) - {f"r{i}" for i in range(10, 20)}


def test_vectors_survive_a_checkpoint_and_compaction_purges_them(tmp_path, small_files):
    store = Store(str(tmp_path / "s"))
    _commit(store, list(range(30)), "run-a")
    _commit(store, [], "run-b", delete=[1, 11, 21])
    store.table(store.features_uri).create_checkpoint()
    _commit(store, [], "run-c", delete=[2, 12])   # the old vectors come from the checkpoint
    expected = {f"r{i}": "run-a" for i in range(30) if i not in (1, 2, 11, 12, 21)}
    assert _ours(store) == _engine(store) == expected
    compact(store.uri)
    dt = store.table(store.features_uri)
    assert not deletion.deleted_rows(dt) and len(dt.file_uris()) == 1
    assert _ours(store) == _engine(store) == expected


def test_copy_on_write_below_the_row_threshold_and_the_switch(tmp_path, small_files):
    assert [ExecutionConfig(deletion_vectors=v).vectors_from_rows() for v in ("on", "off", "auto")] == [0, None, 500_000]
    store = Store(str(tmp_path / "s"))
    _commit(store, list(range(30)), "run-a")
    _commit(store, [], "run-b", delete=[1], vectors_from=31)   # 30 rows stored: under the threshold
    dt = store.table(store.features_uri)
    assert not deletion.supported(dt) and dt.to_pyarrow_table().num_rows == 29   # rewritten; any reader reads it
    _commit(store, [], "run-c", delete=[2], vectors_from=29)
    dt = store.table(store.features_uri)
    assert deletion.supported(dt) and len(deletion.deleted_rows(dt)) == 1
    _commit(store, [], "run-d", delete=[3], vectors_from=None)   # a table with vectors keeps them ("off" rewrites)
    dt = store.table(store.features_uri)
    assert len(deletion.deleted_rows(dt)) == 0 and set(_engine(store)) == {f"r{i}" for i in range(30) if i not in (1, 2, 3)}


def test_training_and_ray_readers_skip_deleted_rows(tmp_path, small_files, ray_session):
    store = Store(str(tmp_path / "s"))
    _commit(store, list(range(30)), "run-a")
    _commit(store, [], "run-b", delete=[0, 5, 13, 29])
    live = sorted(f"r{i}" for i in range(30) if i not in (0, 5, 13, 29))
    snap = open_snapshot(tmp_path / "s")
    read = [i for b in snap.batches(["id"], pc.field("split") == "train") for i in b.column(0).to_pylist()]
    assert sorted(read) == [i for i in live if int(i[1:]) % 3]   # the filter's column is not among those read
    ds = ray_read(snap.dataset(), ["id", "text_emb"], block_bytes=1).map_batches(
        lambda t: t, batch_format="pyarrow", batch_size=None).materialize()
    rows = ds.take_all()
    assert sorted(r["id"] for r in rows) == live
    assert all(r["text_emb"][0] == float(r["id"][1:]) for r in rows), "rows and their columns stay aligned"
    assert "ReadDeltaSnapshot->MapBatches" in ds.stats(), "the read is not split: the map fuses into it"


def test_vector_bytes_read_back_by_deltalake(tmp_path, monkeypatch):
    """Both roaring container kinds (a bitmap past 4,096 positions, arrays), in two containers,
    read back by deltalake's reader of the format; and the high-bits split past 2**32."""
    monkeypatch.setattr(core.store, "DV_MAX_SHARE", 1.0)
    monkeypatch.setattr(DataFiles, "FILE_ROWS", 100_000)   # one file
    store = Store(str(tmp_path / "s"))
    _commit(store, list(range(70_000)), "run-a")
    gone = [0, 7, *range(100, 5200), *range(66_000, 66_011)]
    _commit(store, [], "run-b", delete=gone)
    (rows,) = deletion.deleted_rows(store.table(store.features_uri)).values()
    assert rows.tolist() == gone
    assert len(_engine(store)) == store.count("features") == 70_000 - len(gone)
    data = deletion.serialize(np.array([3, 2 ** 32 + 3]))
    assert data[:4] == (1681511377).to_bytes(4, "little") and int.from_bytes(data[4:12], "little") == 2
    assert deletion.z85(bytes([0x86, 0x4F, 0xD2, 0x6F, 0xB5, 0x59, 0xF7, 0x5B])) == "HelloWorld"   # ZeroMQ RFC 32


def test_a_commit_never_overwrites_a_version_another_writer_took(tmp_path, small_files):
    store = Store(str(tmp_path / "s"))
    _commit(store, list(range(30)), "run-a")
    _commit(store, [], "run-b", delete=[1])
    version = store.table(store.features_uri).version()
    before = (tmp_path / "s" / "features" / "_delta_log" / f"{version:020d}.json").read_bytes()
    with pytest.raises(deletion.CommitConflict):
        deletion.commit(store.fs, store.path_of("features"), store.features_uri, version, [], {})
    assert (tmp_path / "s" / "features" / "_delta_log" / f"{version:020d}.json").read_bytes() == before
