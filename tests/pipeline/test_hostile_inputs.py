"""Input shards mmpipe did not write: members are read in place, never extracted; links, devices,
paths leaving the shard, oversized members and tar bombs end as ``bad_record`` rejects while the
good samples go through."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest

from pipeline import sources
from pipeline.demo import _image
from pipeline.runner import run
from pipeline.sources import read_webdataset
from tests.pipeline.helpers import config
from tests.pipeline.test_run import assert_accounting


def _add(tar: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def hostile_shard(path, jpg: bytes) -> None:
    with tarfile.open(path, "w") as tar:
        _add(tar, "good1.jpg", jpg)
        _add(tar, "good1.txt", b"a forest of pines")
        _add(tar, "good1.cls", b"forest")
        _add(tar, "../escape.jpg", jpg)                       # traversal
        _add(tar, "/abs/rooted.jpg", jpg)                     # absolute
        _add(tar, "linked.jpg", kind=tarfile.SYMTYPE, link="/etc/passwd")
        _add(tar, "hard.jpg", kind=tarfile.LNKTYPE, link="good1.jpg")
        _add(tar, "dev.jpg", kind=tarfile.CHRTYPE)
        _add(tar, "meta.jpg", jpg)
        _add(tar, "meta.json", b"[not, json")                  # a sample whose .json is not an object
        _add(tar, "good2.txt", b"waves on the shore")
        _add(tar, "good2.json", json.dumps({"label": "ocean", "split": "train"}).encode())


def test_unsafe_members_become_bad_records(tmp_path):
    shard = tmp_path / "in.tar"
    hostile_shard(shard, _image("forest", np.random.default_rng(0)))
    records = {r.id: r for r in read_webdataset(str(shard))}
    good = {k: r for k, r in records.items() if not r.bad}
    assert set(good) == {"good1", "good2"} and good["good1"].label == "forest" and good["good2"].split == "train"
    bad = {k: r.bad.split(": ", 1)[1] for k, r in records.items() if r.bad}
    assert bad == {"escape": "../escape.jpg names a path outside the shard",
                   "rooted": "/abs/rooted.jpg names a path outside the shard",
                   "linked": "linked.jpg is a link", "hard": "hard.jpg is a link",
                   "dev": "dev.jpg is not a regular file", "meta": "meta.json is not a JSON object"}


def test_oversized_members_and_tar_bombs_are_refused(tmp_path, monkeypatch):
    shard = tmp_path / "bomb.tar"
    with tarfile.open(shard, "w") as tar:
        _add(tar, "big.jpg", b"x" * 2000)
        for k in range(50):
            _add(tar, f"s{k}.txt", b"t")
    monkeypatch.setattr(sources, "MAX_TAR_MEMBER_BYTES", 1000)
    monkeypatch.setattr(sources, "MAX_TAR_MEMBERS", 20)
    records = read_webdataset(str(shard))
    bad = {r.id: r.bad for r in records if r.bad}
    assert "big.jpg is 2000 bytes, over 1000" in bad["big"]
    assert "more than 20 members" in bad["bomb.tar-over-20-members"]
    assert len([r for r in records if not r.bad]) == 19   # what came before the cap


def test_a_hostile_shard_through_the_pipeline_every_id_accounted_for(tmp_path, ray_session):
    shard = tmp_path / "data" / "in.tar"
    shard.parent.mkdir()
    hostile_shard(shard, _image("forest", np.random.default_rng(0)))
    store = tmp_path / "store"
    run(config(tmp_path, shard, store), log=lambda s: None)
    from deltalake import DeltaTable

    rejects = {r["id"]: r["reason"] for r in DeltaTable(str(store / "rejects")).to_pyarrow_table().to_pylist()}
    assert {k: v for k, v in rejects.items() if v == "bad_record"}.keys() == {"escape", "rooted", "linked", "hard", "dev", "meta"}
    assert_accounting(store, {"good1", "good2", "escape", "rooted", "linked", "hard", "dev", "meta"})
    assert not (tmp_path / "escape.jpg").exists() and not (tmp_path / "abs").exists()


@pytest.fixture(autouse=True)
def _no_extraction(monkeypatch):
    """Reading a shard never writes a member anywhere."""
    def refuse(*args, **kwargs):
        raise AssertionError("a shard member was extracted")
    monkeypatch.setattr(tarfile.TarFile, "extract", refuse)
    monkeypatch.setattr(tarfile.TarFile, "extractall", refuse)
