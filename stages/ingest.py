"""Ingest: resolve each record's references, fetch / read the bytes, hash them (scan), and later
load the bytes into the batch for the processing pass (load)."""
from __future__ import annotations

import hashlib
import os
import stat
import tarfile
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from pipeline.config import HttpConfig
from stages.base import MODALITIES, Batch, Reject, Stage, StageParams, num_rows, object_column
from stages.registry import register_stage

MEDIA_REFS = ("image", "audio")


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


def is_url(ref: str) -> bool:
    return "://" in ref.split("#", 1)[0][:16]


def read_tar_member(ref: str) -> bytes:
    shard, _, member = ref.partition("#")
    with tarfile.open(shard) as tar:
        f = tar.extractfile(member)
        if f is None:
            raise FileNotFoundError(member)
        return f.read()


def realpath(path: str, real_dirs: dict[str, str] | None = None) -> str:
    """``os.path.realpath``, with the folders' real paths kept in ``real_dirs`` (one scan's
    lifetime): a file whose name is not a symlink costs one lstat instead of one per component."""
    head, tail = os.path.split(path)
    if real_dirs is None or tail in ("", ".", "..") or ".." in head.split(os.sep):
        return os.path.realpath(path)   # ".." must be resolved after the symlinks before it
    if head not in real_dirs:
        real_dirs[head] = os.path.realpath(head)
    real = os.path.join(real_dirs[head], tail)
    try:
        if stat.S_ISLNK(os.lstat(real).st_mode):
            return os.path.realpath(path)
    except OSError:
        pass   # missing: the caller reports it
    return real


def resolve_path(ref: str, base: str, roots: list[str], real_dirs: dict[str, str] | None = None) -> Path:
    """The absolute path a manifest reference names (symlinks resolved), or
    Reject(path_outside_root / missing_file). Strings, not Path objects: this runs for every
    reference of every run."""
    path = realpath(ref if os.path.isabs(ref) else os.path.join(base, ref), real_dirs)
    folders = real_dirs if real_dirs is not None else {}   # the roots are folders too: same cache, same lifetime
    for root in (base, *roots):
        if root and root not in folders:
            folders[root] = os.path.realpath(root)
    allowed = [folders[root] for root in (base, *roots) if root]
    if not any(path == root or path.startswith(root.rstrip(os.sep) + os.sep) for root in allowed):
        raise Reject("path_outside_root", f"{ref} resolves outside {', '.join(allowed)}")
    if not os.path.isfile(path):
        raise Reject("missing_file", f"{ref}: no such file")
    return Path(path)


class ScanParams(StageParams):
    roots: list[str] = []
    http: HttpConfig = HttpConfig()


# What the scan hands the planner per record (no media bytes).
SCAN_COLUMNS = ("row", "id", "label", "split", "text", "image_ref", "audio_ref", "image_loc", "audio_loc",
                "sha_image", "sha_text", "sha_audio", "reject_stage", "reject_reason", "reject_detail")


@register_stage
class IngestScan(Stage):
    """Pass 1: resolve and hash every reference. Output is small (no media bytes), so the driver
    can plan incremental work; fetched http(s) bodies are cached for the processing pass."""

    name = "ingest.scan"
    Params = ScanParams

    def __init__(self, params=None, context=None, hash_cache: dict | None = None):
        super().__init__(params, context)
        self._fetcher = None
        # (path, size, mtime_ns, ctime_ns, inode) -> content hash, like git's index: an unchanged
        # file is not read again. The runner loads and saves it next to the store.
        self.hash_cache: dict[tuple, str] = hash_cache if hash_cache is not None else {}
        self.hash_used: dict[tuple, str] = {}   # the entries this scan needed: what is worth keeping
        self.real_dirs: dict[str, str] = {}     # folder -> its real path, for this scan only

    @property
    def fetcher(self):
        if self._fetcher is None:
            from pipeline.fetch import Fetcher

            self._fetcher = Fetcher(self.params.http)
        return self._fetcher

    def process(self, batch: Batch) -> Batch:
        n = num_rows(batch)
        out = {k: object_column(["" for _ in range(n)]) for k in
               ("image_loc", "audio_loc", "sha_image", "sha_text", "sha_audio",
                "reject_stage", "reject_reason", "reject_detail")}
        urls = self._fetch_urls(batch)
        for i in range(n):
            try:
                self._scan_row(batch, out, i, urls)
            except Reject as r:
                out["reject_stage"][i], out["reject_reason"][i], out["reject_detail"][i] = self.name, r.reason, r.detail
                self.stats.rejected[r.reason] = self.stats.rejected.get(r.reason, 0) + 1
        batch.update(out)
        return batch

    def _fetch_urls(self, batch: Batch) -> dict[str, object]:
        """Fetch every http(s) reference of the batch at once (bounded concurrency)."""
        wanted = []
        for m in MEDIA_REFS:
            for ref in batch[m]:
                if ref and is_url(ref) and urlparse(ref).scheme in ("http", "https"):
                    wanted.append((ref, m))
        if not wanted:
            return {}
        results = self.fetcher.fetch_many(wanted)
        return {ref: res for (ref, _), res in zip(wanted, results)}

    def _scan_row(self, batch: Batch, out: Batch, i: int, urls: dict) -> None:
        text = batch["text"][i]
        refs = {m: batch[m][i] for m in MEDIA_REFS}
        if not text and not any(refs.values()):
            raise Reject("empty_record", "no image, text or audio")
        if text:
            out["sha_text"][i] = content_hash(text.encode("utf-8", "surrogatepass"))
        for m, ref in refs.items():
            if not ref:
                continue
            loc, sha = self._hash_ref(ref, str(batch["base"][i]), urls)
            out[f"{m}_loc"][i] = loc
            out[f"sha_{m}"][i] = sha

    def _hash_ref(self, ref: str, base: str, urls: dict) -> tuple[str, str]:
        """(location, content hash); a local file whose stat matches the hash cache is not read."""
        if is_url(ref) or ".tar#" in ref:
            loc, data = self._read_ref(ref, base, urls)
            self.stats.bytes_in += len(data)
            return loc, content_hash(data)
        path = resolve_path(ref, base, self.params.roots, self.real_dirs)
        try:
            st = path.stat()
        except OSError as exc:
            raise Reject("missing_file", f"{ref}: {exc.strerror}") from None
        key = (str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        sha = self.hash_cache.get(key)
        if sha is None:
            data = _read_file(path, ref)
            self.stats.bytes_in += len(data)
            sha = content_hash(data)
        self.hash_used[key] = sha
        return str(path), sha

    def _read_ref(self, ref: str, base: str, urls: dict) -> tuple[str, bytes]:
        if is_url(ref):
            scheme = urlparse(ref).scheme
            if scheme not in ("http", "https"):
                raise Reject("url_scheme", f"only http and https are fetched, not {scheme}://")
            res = urls[ref]
            if isinstance(res, Reject):
                raise res
            cache = Path(self.context.cache_dir or "/tmp/mmpipe-cache")
            cache.mkdir(parents=True, exist_ok=True)
            loc = cache / hashlib.sha256(ref.encode()).hexdigest()
            tmp = loc.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_bytes(res.data)
            os.replace(tmp, loc)   # atomic: a crash never leaves a half-written cache entry
            return str(loc), res.data
        if "#" in ref and ref.split("#", 1)[0].endswith(".tar"):
            try:
                return ref, read_tar_member(ref)
            except (OSError, KeyError, tarfile.TarError) as exc:
                raise Reject("missing_file", f"{ref}: {exc}") from None
        path = resolve_path(ref, base, self.params.roots)
        return str(path), _read_file(path, ref)


def _read_file(path: Path, ref: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise Reject("missing_file", f"{ref}: {exc.strerror}") from None


@register_stage
class IngestLoad(Stage):
    """Pass 2: load the bytes the scan resolved, and lay out the columns later stages expect."""

    name = "ingest"

    def process(self, batch: Batch) -> Batch:
        n = num_rows(batch)
        for col, default in (("reject_stage", ""), ("reject_reason", ""), ("reject_detail", ""),
                             ("meta", "{}"), ("dropped", "{}"), ("aug_params", "{}"), ("dedup_sig", "")):
            batch[col] = object_column([default] * n)
        batch["aug"] = np.zeros(n, dtype=np.int64)
        for m in MEDIA_REFS:
            values = []
            for i in range(n):
                loc = batch[f"{m}_loc"][i]
                if not loc:
                    values.append(None)
                    continue
                try:
                    data = read_tar_member(loc) if "#" in loc and ".tar#" in loc else Path(loc).read_bytes()
                except (OSError, KeyError, tarfile.TarError) as exc:
                    values.append(None)
                    self.reject(batch, i, "missing_file", f"{loc}: {exc}")
                    continue
                if content_hash(data) != batch[f"sha_{m}"][i]:
                    values.append(None)
                    self.reject(batch, i, "changed_during_run", f"{batch[f'{m}_ref'][i]} changed since it was scanned")
                    continue
                values.append(data)
            batch[m] = object_column(values)
        # The scan carries an absent text as "" (uniform column types); stages expect None.
        texts = batch.get("text", object_column([None] * n))
        batch["text"] = object_column([t if isinstance(t, str) and t != "" else None for t in texts])
        for m in MODALITIES:
            batch.setdefault(m, object_column([None] * n))
        return batch
