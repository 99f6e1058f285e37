"""Path resolution in the scan: the per-scan folder cache gives os.path.realpath's answer, and a
symlink cannot lead a reference out of its root."""
import os

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
