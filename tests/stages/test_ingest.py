"""Path resolution in the scan: the per-scan folder cache gives os.path.realpath's answer, and a
symlink cannot lead a reference out of its root."""
import os

import numpy as np
import pytest

from stages.base import Reject
from stages.ingest import realpath, resolve_path


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "root" / "a" / "b").mkdir(parents=True)
    (tmp_path / "outside" / "y").mkdir(parents=True)
    (tmp_path / "root" / "a" / "b" / "f.txt").write_text("x")
    (tmp_path / "outside" / "secret.txt").write_text("s")
    os.symlink(tmp_path / "root" / "a", tmp_path / "root" / "link")
    os.symlink(tmp_path / "root" / "a" / "b" / "f.txt", tmp_path / "root" / "a" / "b" / "g.txt")
    os.symlink(tmp_path / "outside" / "secret.txt", tmp_path / "root" / "a" / "b" / "esc.txt")
    os.symlink(tmp_path / "outside" / "y", tmp_path / "root" / "a" / "ly")
    return tmp_path / "root"


@pytest.mark.parametrize("ref", ["link/b/f.txt", "link/b/g.txt", "a/b/esc.txt", "a/b/../b/f.txt", "a/b/missing",
                                 "link/b/./f.txt", "a/ly/../secret.txt", "a/ly/x", "a//b/f.txt"])
def test_cached_realpath_equals_os_realpath(tree, ref):
    cache: dict[str, str] = {}
    path = os.path.join(tree, ref)
    assert realpath(path, cache) == os.path.realpath(path)
    assert realpath(path, cache) == os.path.realpath(path)   # again, from the cache


@pytest.mark.parametrize("ref", ["a/b/esc.txt", "a/ly/../secret.txt", "../outside/secret.txt"])
def test_symlinks_and_dotdot_cannot_leave_the_root(tree, ref):
    with pytest.raises(Reject) as exc:
        resolve_path(ref, str(tree), [], {})
    assert exc.value.reason == "path_outside_root"


def test_inside_links_resolve_to_the_file(tree):
    assert resolve_path("link/b/g.txt", str(tree), [], {}) == (tree / "a" / "b" / "f.txt").resolve()
    with pytest.raises(Reject) as exc:
        resolve_path("a/b/missing", str(tree), [], {})
    assert exc.value.reason == "missing_file"


# -- the scan's hash cache ------------------------------------------------------------------------
def _entry(tmp_path, name: str, body: bytes):
    from stages.ingest import HashCache, content_hash

    path = tmp_path / name
    path.write_bytes(body)
    return HashCache.key(str(path), path.stat()), content_hash(body)


def test_hash_cache_keeps_what_a_scan_used_and_nothing_else(tmp_path, monkeypatch):
    from stages.ingest import HashCache

    monkeypatch.setattr(HashCache, "BATCH", 3)   # several written batches
    folder = str(tmp_path / "cache")
    entries = [_entry(tmp_path, f"f{i}", f"body {i}".encode()) for i in range(8)]
    first = HashCache.load(folder)
    assert first.get_many([key for key, _ in entries]) == [None] * 8
    for key, sha in entries:
        first.use_many([key], [sha])
    first.save()
    second = HashCache.load(folder)
    assert len(second) == 8 and second.get_many([key for key, _ in entries]) == [sha for _, sha in entries]
    assert second.keys.nbytes + second.shas.nbytes == 8 * 32   # arrays, not objects
    second.use_many([key for key, _ in entries[:2]], [sha for _, sha in entries[:2]])
    second.save()                                              # the next run used two of them
    third = HashCache.load(folder)
    assert len(third) == 2 and third.get_many([entries[5][0], entries[1][0]]) == [None, entries[1][1]]
    third.use_many([entries[6][0]], [entries[6][1]])
    third.discard()                                            # a failed run changes nothing
    assert len(HashCache.load(folder)) == 2 and not list((tmp_path / "cache").glob("*.tmp"))


def test_hash_cache_keys_change_with_the_file_and_survive_zero_bytes(tmp_path):
    from stages.ingest import HashCache

    key, sha = _entry(tmp_path, "a", b"one")
    again, _ = _entry(tmp_path, "a", b"two, longer")           # rewritten in place: size and mtime move
    assert key != again
    zeros = b"\x07" + b"\x00" * 15                              # numpy S16 values drop trailing zero bytes
    cache = HashCache(np.array([zeros, key], "S16"), np.array([b"\x00" * 16, bytes.fromhex(sha)], "S16"))
    assert cache.get_many([zeros, key, b"\x07" + b"\x00" * 14 + b"\x01", b"\xff" * 16]) == ["00" * 16, sha, None, None]


def test_a_cache_file_in_another_layout_is_dropped_not_fatal(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from stages.ingest import HashCache

    (tmp_path / "cache").mkdir()
    pq.write_table(pa.table({"path": ["/x"], "size": [1], "sha": ["ab"]}), tmp_path / "cache" / HashCache.FILE)
    assert len(HashCache.load(str(tmp_path / "cache"))) == 0
    (tmp_path / "cache" / HashCache.FILE).write_bytes(b"not parquet")
    assert len(HashCache.load(str(tmp_path / "cache"))) == 0
