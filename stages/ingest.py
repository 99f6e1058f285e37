"""Ingest: resolve each record's references, fetch / read the bytes, hash them (scan), and later
load the bytes into the batch for the processing pass (load)."""
from __future__ import annotations

import hashlib
import json
import os
import stat
import tarfile
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from stages.base import MODALITIES, Batch, Reject, RunScope, Stage, StageParams, num_rows, object_column
from stages.fetch import FETCH_REASONS, HttpConfig
from stages.modalities import INLINE, MEDIA
from stages.registry import register_stage

MEDIA_REFS = MEDIA   # modalities the scan resolves and hashes as files or URLs (text is inline)


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


class HashCache:
    """The scan's content hashes of local files by stat key, kept between runs of one store in
    ``hashes.parquet`` under its cache folder; only the entries a scan used are saved again, so
    it does not grow forever. Safe to lose.

    No Python object per file: the known entries are two sorted arrays (a 16-byte digest of the stat
    key, the 16-byte content hash), 32 bytes an entry; the entries a scan uses go to a Parquet file
    beside it as they come, in batches, and replace the cache when the run ends well."""

    FILE = "hashes.parquet"
    BATCH = 65_536   # used entries buffered before they are written

    def __init__(self, keys: np.ndarray | None = None, shas: np.ndarray | None = None, folder: str = ""):
        keys = np.zeros(0, "S16") if keys is None else keys
        shas = np.zeros(0, "S16") if shas is None else shas
        order = np.argsort(keys, kind="stable")
        self.keys, self.shas = keys[order], shas[order]
        self.folder = folder
        self._used_keys, self._used_shas = bytearray(), bytearray()
        self._writer = None
        self._tmp: Path | None = None

    @staticmethod
    def key(path: str, st: os.stat_result) -> bytes:
        """The stat key (path, size, mtime, ctime, inode) as a 16-byte digest: a rewritten file gets another."""
        text = f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}"
        return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()

    def __len__(self) -> int:
        return len(self.keys)

    def get_many(self, keys: list[bytes]) -> list[str | None]:
        """The content hash (hex) known for each stat key, or None (one vectorised lookup)."""
        if not len(self.keys) or not keys:
            return [None] * len(keys)
        query = np.array(keys, "S16")   # compared as numpy S16 values, which drop trailing zero bytes alike
        at = np.minimum(np.searchsorted(self.keys, query), len(self.keys) - 1)
        hit = (self.keys[at] == query).tolist()
        hexes = self.shas[at].tobytes().hex()   # 16 bytes each, zero bytes included
        return [hexes[32 * k:32 * k + 32] if h else None for k, h in enumerate(hit)]

    def use_many(self, keys: list[bytes], shas: list[str]) -> None:
        """Record that this scan saw these files: their entries are kept for the next run."""
        self._used_keys += b"".join(keys)
        self._used_shas += bytes.fromhex("".join(shas))
        if len(self._used_keys) >= 16 * self.BATCH:
            self._flush()

    @classmethod
    def load(cls, folder: str) -> "HashCache":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = Path(folder) / cls.FILE
        if not folder or not path.is_file():
            return cls(folder=folder)
        try:
            t = pq.read_table(path, columns=["key", "sha"])
            keys, shas = (_fixed(t.column(c).combine_chunks(), size) for c, size in (("key", 16), ("sha", 16)))
        except (OSError, KeyError, ValueError, pa.ArrowInvalid):   # unreadable or another layout: start afresh
            return cls(folder=folder)
        return cls(keys, shas, folder)

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self.folder or not self._used_keys:
            self._used_keys, self._used_shas = bytearray(), bytearray()
            return
        batch = pa.table({"key": pa.FixedSizeBinaryArray.from_buffers(pa.binary(16), len(self._used_keys) // 16,
                                                                       [None, pa.py_buffer(bytes(self._used_keys))]),
                          "sha": pa.FixedSizeBinaryArray.from_buffers(pa.binary(16), len(self._used_shas) // 16,
                                                                       [None, pa.py_buffer(bytes(self._used_shas))])})
        if self._writer is None:
            Path(self.folder).mkdir(parents=True, exist_ok=True)
            self._tmp = Path(self.folder) / f"{self.FILE}.{os.getpid()}.tmp"
            self._writer = pq.ParquetWriter(self._tmp, batch.schema)
        self._writer.write_table(batch)
        self._used_keys, self._used_shas = bytearray(), bytearray()

    def save(self) -> None:
        """The entries this scan used become the cache (nothing scanned here: the cache stays)."""
        self._flush()
        if self._writer is not None:
            self._writer.close()
            os.replace(self._tmp, Path(self.folder) / self.FILE)
            self._writer = None

    def discard(self) -> None:
        """A failed run: the entries it used are dropped, the saved cache stays as it was."""
        if self._writer is not None:
            self._writer.close()
            self._tmp.unlink(missing_ok=True)
            self._writer = None
        self._used_keys, self._used_shas = bytearray(), bytearray()


def _fixed(column, size: int) -> np.ndarray:
    """A fixed-size binary Arrow array as a numpy ``S<size>`` array (one copy, no Python objects)."""
    import pyarrow as pa

    if column.type != pa.binary(size) or column.null_count:
        raise ValueError(f"expected fixed-size binary({size}) without nulls, got {column.type}")
    data = column.buffers()[1]
    return np.frombuffer(data, f"S{size}", count=len(column), offset=column.offset * size).copy()


_HASH_CACHES: dict[str, HashCache] = {}   # run id -> the run's cache, in the process that scans


# What the scan hands the planner per record (no media bytes).
SCAN_COLUMNS = ("row", "id", "label", "split", *INLINE, *(f"{m}_ref" for m in MEDIA), *(f"{m}_loc" for m in MEDIA),
                *(f"sha_{m}" for m in MODALITIES), "reject_stage", "reject_reason", "reject_detail", "extra")


@register_stage
class IngestScan(Stage):
    """Pass 1: resolve and hash every reference. Output is small (no media bytes), so the driver
    can plan incremental work; fetched http(s) bodies are cached for the processing pass."""

    name = "ingest.scan"
    Params = ScanParams
    phase = "scan"
    reads = (*MODALITIES, "base", "bad")
    writes = SCAN_COLUMNS
    reasons = {"bad_record": "the source's row could not be read: invalid JSON or CSV, not an object, a field of "
                             "the wrong type or too long (detail: the line); its id is made from the line",
               "empty_record": f"the record has no {', '.join(MODALITIES[:-1])} or {MODALITIES[-1]}",
               "missing_file": "a referenced file (or tar member) does not exist or cannot be read",
               "path_outside_root": "a path resolves outside the manifest's folder and source.roots",
               **FETCH_REASONS}

    def __init__(self, params=None, context=None):
        super().__init__(params, context)
        self._fetcher = None
        # stat key (path, size, mtime_ns, ctime_ns, inode) -> content hash, like git's index: an unchanged
        # file is not read again. The run hooks load and save it in the store's cache folder.
        cache = _HASH_CACHES.get(self.context.run_id)
        self.hash_cache = HashCache() if cache is None else cache   # (an empty one is falsy)
        self.real_dirs: dict[str, str] = {}     # folder -> its real path, for this scan only

    @classmethod
    def open_run(cls, scope: RunScope) -> None:
        _HASH_CACHES[scope.run_id] = HashCache.load(scope.cache_dir)

    @classmethod
    def close_run(cls, scope: RunScope, failed: bool) -> None:
        cache = _HASH_CACHES.pop(scope.run_id, None)
        if cache is not None:
            cache.discard() if failed else cache.save()

    @property
    def fetcher(self):
        if self._fetcher is None:
            from stages.fetch import Fetcher

            self._fetcher = Fetcher(self.params.http)
        return self._fetcher

    def process(self, batch: Batch) -> Batch:
        n = num_rows(batch)
        out = {k: object_column(["" for _ in range(n)]) for k in
               (*(f"{m}_loc" for m in MEDIA), *(f"sha_{m}" for m in MODALITIES),
                "reject_stage", "reject_reason", "reject_detail")}
        urls = self._fetch_urls(batch)
        files: list[tuple[int, str, Path, str, bytes]] = []   # local files to hash: (row, modality, path, ref, key)
        for i in self._hash_inline(batch, out):
            try:
                self._scan_row(batch, out, i, urls, files)
            except Reject as r:
                self._reject(out, i, r)
        self._hash_files(out, files)
        out["extra"] = object_column([str(v or "") for v in batch["extra"]]) if "extra" in batch else object_column([""] * n)
        batch.update(out)
        return batch

    def _hash_inline(self, batch: Batch, out: Batch) -> np.ndarray:
        """Hash the rows that hold only inline values (text) at once; return the other rows
        (media to resolve, a bad record, nothing at all), which ``_scan_row`` takes one by one."""
        inline = np.zeros(num_rows(batch), bool)
        for m in INLINE:
            inline |= batch[m].astype(bool)
        other = ~inline
        for key in (*MEDIA_REFS, "bad"):
            if key in batch:
                other |= batch[key].astype(bool)
        simple = np.flatnonzero(~other)
        for m in INLINE:
            values, sha = batch[m], out[f"sha_{m}"]
            for i in simple:
                if values[i]:
                    sha[i] = content_hash(values[i].encode("utf-8", "surrogatepass"))
        return np.flatnonzero(other)

    def _reject(self, out: Batch, i: int, r: Reject) -> None:
        out["reject_stage"][i], out["reject_reason"][i], out["reject_detail"][i] = self.name, r.reason, r.detail
        self.stats.rejected[r.reason] = self.stats.rejected.get(r.reason, 0) + 1

    def _hash_files(self, out: Batch, files: list[tuple[int, str, Path, str, bytes]]) -> None:
        """Content hashes of the batch's local files: looked up in the hash cache together, read
        only where the cache has no entry for the file's stat key."""
        if not files:
            return
        keys = [f[4] for f in files]
        shas = self.hash_cache.get_many(keys)
        for k, (i, m, path, ref, key) in enumerate(files):
            if out["reject_reason"][i]:
                continue
            if shas[k] is None:
                try:
                    data = _read_file(path, ref)
                except Reject as r:
                    self._reject(out, i, r)
                    continue
                self.stats.bytes_in += len(data)
                shas[k] = content_hash(data)
            out[f"sha_{m}"][i] = shas[k]
        self.hash_cache.use_many([key for key, sha in zip(keys, shas) if sha is not None],
                                 [sha for sha in shas if sha is not None])

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

    def _scan_row(self, batch: Batch, out: Batch, i: int, urls: dict, files: list) -> None:
        if "bad" in batch and batch["bad"][i]:
            raise Reject("bad_record", str(batch["bad"][i]))
        inline = {m: batch[m][i] for m in INLINE}
        refs = {m: batch[m][i] for m in MEDIA_REFS}
        if not any(inline.values()) and not any(refs.values()):
            raise Reject("empty_record", f"no {', '.join(MODALITIES)}")
        for m, value in inline.items():
            if value:
                out[f"sha_{m}"][i] = content_hash(value.encode("utf-8", "surrogatepass"))
        found = []
        for m, ref in refs.items():
            if not ref:
                continue
            base = str(batch["base"][i])
            if is_url(ref) or ".tar#" in ref:
                loc, data = self._read_ref(ref, base, urls)
                self.stats.bytes_in += len(data)
                out[f"{m}_loc"][i], out[f"sha_{m}"][i] = loc, content_hash(data)
                continue
            path = resolve_path(ref, base, self.params.roots, self.real_dirs)
            try:
                st = path.stat()
            except OSError as exc:
                raise Reject("missing_file", f"{ref}: {exc.strerror}") from None
            out[f"{m}_loc"][i] = str(path)
            found.append((i, m, path, ref, HashCache.key(str(path), st)))
        files += found   # hashed with the batch's other files (``_hash_files``), unless the row is rejected here

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
    reads = (*(f"{m}_loc" for m in MEDIA), *(f"sha_{m}" for m in MEDIA), *INLINE)
    writes = (*MODALITIES, "aug", "meta", "dropped", "aug_params", "dedup_sig",
              "reject_stage", "reject_reason", "reject_detail")
    reasons = {"missing_file": "a file scanned in pass 1 was gone when the processing pass read it",
               "changed_during_run": "a file's content changed between the scan and the processing pass",
               # decided by the planner, recorded under this stage:
               "duplicate": "the whole sample repeats an earlier input (detail: the kept id)",
               "duplicate_id": "the id repeats an earlier input's with other content",
               "bad_split": "the split is not train, val or test"}

    def process(self, batch: Batch) -> Batch:
        n = num_rows(batch)
        for col, default in (("reject_stage", ""), ("reject_reason", ""), ("reject_detail", ""),
                             ("meta", "{}"), ("dropped", "{}"), ("aug_params", "{}"), ("dedup_sig", "")):
            batch[col] = object_column([default] * n)
        batch["aug"] = np.zeros(n, dtype=np.int64)
        if "extra" in batch:   # the manifest's own other columns (a crawl's url, caption source, ...)
            batch["meta"] = object_column([json.dumps({"source": json.loads(e)}, sort_keys=True) if e else "{}"
                                           for e in batch["extra"]])
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
        for m in INLINE:
            texts = batch.get(m, object_column([None] * n))
            batch[m] = object_column([t if isinstance(t, str) and t != "" else None for t in texts])
        for m in MODALITIES:
            batch.setdefault(m, object_column([None] * n))
        return batch
