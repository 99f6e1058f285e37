"""Sources: a manifest (JSONL / CSV / Parquet), a folder of files grouped by stem, or WebDataset
shards. Each becomes a stream of ``SourceRecord`` chunks; media stay references until ingest reads them."""
from __future__ import annotations

import glob
import io
import json
import re
import tarfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from core.config import SourceConfig
from stages.modalities import INLINE, MODALITIES, REGISTRY, modality_of_suffix

MANIFEST_COLUMNS = {"id", "label", "split", *MODALITIES}
MAX_LINE_BYTES = 64 * 1024 * 1024   # a longer JSONL line is a bad_record, never read whole
MAX_FIELD_CHARS = 64 * 1024          # id, label, split and media references (texts: cleanup.text's limit)
_NOT_INLINE = MANIFEST_COLUMNS - set(INLINE)
_S = pa.string()
# What the scan reads per record: one column per modality, "" where absent.
SCAN_INPUT = pa.schema([("row", pa.int64()), *((c, _S) for c in ("id", "label", "split", "base", "bad", "extra")),
                        *((m, _S) for m in MODALITIES)])
# str.isspace()'s characters (none above U+3000), for deciding blank values in Arrow as ``_clean`` does
_BLANK = "^[" + "".join(f"\\x{{{ord(c):x}}}" for c in map(chr, range(0x3001)) if c.isspace()) + "]*$"
_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")   # an escaped UTF-16 surrogate: left to json (surrogatepass)


@dataclass
class BadRow:
    """A manifest row that could not be parsed: it becomes a ``bad_record`` reject, not an error."""

    line: int
    why: str


class SourceError(ValueError):
    """The input cannot be read at all (a user error: one line, no traceback)."""


@dataclass
class SourceRecord:
    row: int
    id: str = ""
    label: str = ""
    split: str = ""
    # modality -> its value: text itself, media as a path relative to base, an absolute path, an
    # http(s) URL or "shard.tar#member"; an absent modality has no entry
    values: dict[str, str] = field(default_factory=dict)
    base: str = ""                  # folder relative refs resolve against
    bad: str = ""                   # why the source's row is unusable (the scan rejects it: bad_record)
    extra: str = ""                 # the manifest's other columns, a JSON object (kept in meta.source)

    @classmethod
    def columns(cls) -> set[str]:
        return (set(cls.__dataclass_fields__) - {"values"}) | set(MODALITIES)


def _clean(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, float) and value != value:  # NaN from CSV / Parquet
        return None
    text = str(value)
    return text if text.strip() != "" else None


def iter_manifest(path: Path, chunk_rows: int = 10_000) -> Iterator[list[SourceRecord]]:
    """The manifest's records in chunks of ``chunk_rows``, read as a stream (never the whole file)."""
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".ndjson", ".json", ".csv", ".parquet"):
        raise SourceError(f"unknown manifest type {path.suffix!r} (use .jsonl, .csv or .parquet)")
    base = str(path.parent.resolve())
    n = 0
    chunk: list[SourceRecord] = []
    try:
        for row in _manifest_rows(path, suffix, chunk_rows):
            chunk.append(_record(row, n, base))
            n += 1
            if len(chunk) >= chunk_rows:
                yield chunk
                chunk = []
    except (OSError, pa.ArrowInvalid, UnicodeDecodeError) as exc:
        raise SourceError(f"cannot read manifest {path}: {str(exc).splitlines()[0]}") from None
    if chunk:
        yield chunk


def _manifest_rows(path: Path, suffix: str, chunk_rows: int) -> Iterator[dict | BadRow]:
    """The manifest's rows as dicts, in order; a row that cannot be parsed comes as a ``BadRow``."""
    if suffix in (".jsonl", ".ndjson", ".json"):
        with path.open("rb") as f:
            for n, line in _jsonl_lines(f):
                yield _parse_line(n, line)
    elif suffix == ".csv":
        bad: list[BadRow] = []

        def invalid(row) -> str:   # a row with too many or too few fields: recorded, the file goes on
            bad.append(BadRow(row.number or 0, f"line {row.number or '?'} has {row.actual_columns} fields, "
                                               f"expected {row.expected_columns}: {row.text[:200]!r}"))
            return "skip"

        reader = pacsv.open_csv(path, read_options=pacsv.ReadOptions(block_size=1 << 22, use_threads=False),
                                parse_options=pacsv.ParseOptions(invalid_row_handler=invalid, newlines_in_values=True),
                                convert_options=pacsv.ConvertOptions(
                                    column_types={c: pa.string() for c in MANIFEST_COLUMNS}, strings_can_be_null=True))
        for batch in reader:
            yield from bad
            bad.clear()
            yield from batch.to_pylist()
        yield from bad
    else:
        for batch in pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20).iter_batches(batch_size=chunk_rows):
            yield from batch.to_pylist()


def _jsonl_lines(f) -> Iterator[tuple[int, bytes | BadRow]]:
    """A JSONL file's non-blank lines with their numbers; a line longer than ``MAX_LINE_BYTES``
    comes as a ``BadRow`` (skipped without being held)."""
    n = 0
    while line := f.readline(MAX_LINE_BYTES + 1):
        n += 1
        if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
            while (rest := f.readline(1 << 20)) and not rest.endswith(b"\n"):
                pass
            yield n, BadRow(n, f"line {n} is longer than {MAX_LINE_BYTES} bytes")
        elif line.strip():
            yield n, line


def _parse_line(n: int, line: bytes | BadRow) -> dict | BadRow:
    if isinstance(line, BadRow):
        return line
    try:
        row = json.loads(line)
        if _SURROGATE.search(line):   # a lone one cannot be written as UTF-8 (Arrow, Parquet)
            json.dumps(row, ensure_ascii=False).encode("utf-8")
        return row
    except UnicodeEncodeError:
        return BadRow(n, f"line {n} holds a lone UTF-16 surrogate (a \\uD800-\\uDFFF escape without its pair)")
    except UnicodeDecodeError:
        return BadRow(n, f"line {n} is not UTF-8")
    except json.JSONDecodeError as exc:
        return BadRow(n, f"line {n} is not valid JSON: {exc.msg} (column {exc.colno})")
    except RecursionError:
        return BadRow(n, f"line {n} nests too deeply")


def records_table(records: list[SourceRecord]) -> pa.Table:
    """Records as the scan's input columns (``SCAN_INPUT``)."""
    columns = {key: [getattr(r, key) for r in records] for key in ("row", "id", "label", "split", "base", "bad", "extra")}
    columns.update((m, [r.values.get(m) or "" for r in records]) for m in MODALITIES)
    return pa.table(columns, schema=SCAN_INPUT)


def iter_source_tables(cfg: SourceConfig, chunk_rows: int = 10_000) -> Iterator[pa.Table]:
    """``iter_source`` as the scan's input columns. A JSONL manifest is read a chunk at a time by
    Arrow's JSON reader when every row of the chunk is an object of short strings (the usual
    manifest: no Python object per row); any other chunk goes through ``_record`` row by row."""
    path = Path(cfg.path or "")
    if _kind(cfg) != "manifest" or path.suffix.lower() not in (".jsonl", ".ndjson", ".json"):
        for chunk in iter_source(cfg, chunk_rows):
            yield records_table(chunk)
        return
    base, n, block = str(path.parent.resolve()), 0, []
    try:
        with path.open("rb") as f:
            lines = _jsonl_lines(f)
            while block := [item for _, item in zip(range(chunk_rows), lines)]:
                table = _jsonl_table([line for _, line in block], n, base)
                if table is None:
                    table = records_table([_record(_parse_line(k, line), n + i, base) for i, (k, line) in enumerate(block)])
                n += table.num_rows
                yield table
    except OSError as exc:
        raise SourceError(f"cannot read manifest {path}: {str(exc).splitlines()[0]}") from None


def _jsonl_table(lines: list[bytes | BadRow], first_row: int, base: str) -> pa.Table | None:
    """Lines of JSON as ``SCAN_INPUT`` columns, or None when ``_record`` must look at them row by row
    (a line that is not an object of strings, a long field, other columns, an escaped surrogate)."""
    if any(isinstance(line, BadRow) for line in lines):
        return None
    blob = b"".join(lines)
    try:
        blob.decode("utf-8")
        if _SURROGATE.search(blob):
            return None
        table = pajson.read_json(io.BytesIO(blob), read_options=pajson.ReadOptions(use_threads=False,
                                                                                   block_size=len(blob) + 1))
    except (UnicodeDecodeError, pa.ArrowInvalid):
        return None
    if table.num_rows != len(lines) or not set(table.column_names) <= MANIFEST_COLUMNS:
        return None
    for column in table.columns:
        if column.type == pa.null():
            continue
        if column.type != _S or (pc.max(pc.utf8_length(column)).as_py() or 0) > MAX_FIELD_CHARS:
            return None
    n = table.num_rows

    def values(name: str) -> pa.Array:   # "" where absent, null or blank (as ``_clean`` decides)
        if name not in table.column_names or table[name].type == pa.null():
            return pa.array([""] * n, _S)
        column = table[name].combine_chunks()
        return pc.if_else(pc.fill_null(pc.match_substring_regex(column, _BLANK), True), "", column)

    return pa.table({"row": pa.array(np.arange(first_row, first_row + n, dtype=np.int64)),
                     **{c: values(c) for c in ("id", "label", "split")},
                     "base": pa.array([base] * n, _S), "bad": pa.array([""] * n, _S), "extra": pa.array([""] * n, _S),
                     **{m: values(m) for m in MODALITIES}}, schema=SCAN_INPUT)


def _record(row: dict | BadRow, n: int, base: str) -> SourceRecord:
    """A manifest row as a record; a row that is not one (bad JSON, not an object, a field of the
    wrong type or size) as a record the scan rejects with ``bad_record``, its id made from its line."""
    if isinstance(row, BadRow):
        return SourceRecord(row=n, id=f"manifest-line-{row.line}", base=base, bad=row.why)
    if not isinstance(row, dict):
        return SourceRecord(row=n, id=f"manifest-row-{n + 1}", base=base,
                            bad=f"row {n + 1} is a JSON {type(row).__name__}, not an object")
    if all(type(v) is str and len(v) <= MAX_FIELD_CHARS for v in row.values()) and row.keys() <= MANIFEST_COLUMNS:
        values = {m: v for m in MODALITIES if (v := row.get(m)) and not v.isspace()}   # the usual row: strings only
        return SourceRecord(row=n, id=_clean(row.get("id")) or "", label=_clean(row.get("label")) or "",
                            split=_clean(row.get("split")) or "", values=values, base=base)
    others = {k: row[k] for k in sorted(row, key=str) if k not in MANIFEST_COLUMNS and row[k] is not None}
    extra = json.dumps(others, sort_keys=True, default=str, ensure_ascii=False) if others else ""
    problem = next((f"{key} is a {type(row[key]).__name__}, not a string"
                    for key in MANIFEST_COLUMNS if isinstance(row.get(key), (dict, list, bool))), None)
    problem = problem or next((f"{key} is {len(str(row[key]))} characters, over {MAX_FIELD_CHARS}"
                               for key in _NOT_INLINE if len(str(row.get(key) or "")) > MAX_FIELD_CHARS), None)
    problem = problem or (f"its other columns are {len(extra)} characters of JSON, over {MAX_FIELD_CHARS}"
                          if len(extra) > MAX_FIELD_CHARS else None)
    if problem:
        own = _clean(row.get("id")) if not isinstance(row.get("id"), (dict, list, bool)) else None
        return SourceRecord(row=n, id=own if own and len(own) <= MAX_FIELD_CHARS else f"manifest-row-{n + 1}",
                            base=base, bad=f"row {n + 1}: {problem}")
    values = {m: v for m in MODALITIES if (v := _clean(row.get(m))) is not None}
    return SourceRecord(row=n, id=_clean(row.get("id")) or "", label=_clean(row.get("label")) or "",
                        split=_clean(row.get("split")) or "", values=values, base=base, extra=extra)


def read_folder(root: Path) -> list[SourceRecord]:
    """``root/<label>/<stem>.{jpg,txt,wav,mp4,...}``: files sharing a stem are one record."""
    groups: dict[tuple[str, str], dict[str, Path]] = defaultdict(dict)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        kind = modality_of_suffix(path.suffix)
        if kind is None:
            continue
        rel_dir = path.parent.relative_to(root)
        groups[(str(rel_dir), path.stem)][kind] = path
    base = str(root.resolve())
    records = []
    for n, ((rel_dir, stem), files) in enumerate(sorted(groups.items())):
        label = "" if rel_dir == "." else Path(rel_dir).parts[-1]
        values = {m: path.read_text(encoding="utf-8", errors="replace") if REGISTRY[m].inline
                  else str(path.relative_to(root)) for m, path in files.items()}
        records.append(SourceRecord(row=n, id="", label=label, values=values, base=base))
    return records


MAX_TAR_MEMBERS = 1_000_000          # members read from one input shard at most (a tar bomb's count)
MAX_TAR_MEMBER_BYTES = 256 * 1024 * 1024


def _unsafe_member(m: tarfile.TarInfo) -> str | None:
    """Why a shard member is not read (a link, a device, a path that leaves the shard, too large)."""
    if m.issym() or m.islnk():
        return f"{m.name} is a link"
    if not m.isfile():
        return f"{m.name} is not a regular file"
    parts = Path(m.name).parts
    if m.name.startswith("/") or ".." in parts:
        return f"{m.name} names a path outside the shard"
    if m.size > MAX_TAR_MEMBER_BYTES:
        return f"{m.name} is {m.size} bytes, over {MAX_TAR_MEMBER_BYTES}"
    return None


def read_webdataset(pattern: str) -> list[SourceRecord]:
    """WebDataset ``.tar`` shards: members grouped by ``__key__``; ``.cls``/``.json`` give the label.
    Members are read in place (never extracted); a sample with a link, a device, a path leaving the
    shard or an oversized member is a ``bad_record``, and a shard with more than MAX_TAR_MEMBERS
    members ends there with one."""
    shards = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
    if not shards:
        raise SourceError(f"no WebDataset shards match {pattern}")
    records = []
    for shard in shards:
        base = str(Path(shard).parent.resolve())
        try:
            with tarfile.open(shard) as tar:
                groups: dict[str, dict[str, tarfile.TarInfo]] = defaultdict(dict)
                unsafe: dict[str, str] = {}
                for count, m in enumerate(tar, 1):
                    if count > MAX_TAR_MEMBERS:
                        records.append(SourceRecord(row=len(records), id=f"{Path(shard).name}-over-{MAX_TAR_MEMBERS}-members",
                                                    base=base, bad=f"{shard}: more than {MAX_TAR_MEMBERS} members; the rest is not read"))
                        break
                    if m.isdir():
                        continue
                    key, _, ext = Path(m.name).name.partition(".")
                    group = str(Path(m.name.lstrip("/")).parent / key)
                    why = _unsafe_member(m)
                    if why:
                        unsafe.setdefault(group, why)
                    else:
                        groups[group][ext.lower()] = m
                for key in unsafe:
                    records.append(SourceRecord(row=len(records), id=Path(key).name, base=base,
                                                bad=f"{shard}: {unsafe[key]}"))
                for key, files in groups.items():
                    if key in unsafe:
                        continue
                    rec = SourceRecord(row=len(records), id=Path(key).name, base=base)
                    for ext, m in files.items():
                        if m.size == 0:   # an empty member is an absent value (mmpipe's own .txt without a text)
                            continue
                        kind = modality_of_suffix(ext)
                        if kind is not None and REGISTRY[kind].inline:
                            rec.values[kind] = tar.extractfile(m).read().decode("utf-8", "replace")
                        elif kind is not None:
                            rec.values[kind] = f"{Path(shard).resolve()}#{m.name}"
                        elif ext in ("cls", "label"):
                            rec.label = tar.extractfile(m).read().decode().strip()
                        elif ext == "json":
                            try:
                                meta = json.loads(tar.extractfile(m).read() or b"{}")
                            except ValueError:
                                meta = None
                            if not isinstance(meta, dict):
                                rec.bad = f"{shard}: {m.name} is not a JSON object"
                                continue
                            rec.label = str(meta.get("label", rec.label) or "")
                            rec.split = str(meta.get("split", "") or "")
                    records.append(rec)
        except (OSError, tarfile.TarError, ValueError) as exc:
            raise SourceError(f"cannot read WebDataset shard {shard}: {exc}") from None
    return records


def read_source(cfg: SourceConfig) -> list[SourceRecord]:
    return [rec for chunk in iter_source(cfg) for rec in chunk]


def _kind(cfg: SourceConfig) -> str:
    if not cfg.path:
        raise SourceError("no input given: pass --input PATH or set source.path in the config")
    path = Path(cfg.path)
    kind = cfg.kind
    if kind == "auto":
        if path.is_dir():
            kind = "folder"
        elif path.suffix == ".tar" or "*" in cfg.path:
            kind = "webdataset"
        else:
            kind = "manifest"
    if kind == "folder" and not path.is_dir():
        raise SourceError(f"input folder not found: {path}")
    if kind == "manifest" and not path.is_file():
        raise SourceError(f"manifest not found: {path}")
    return kind


def iter_source(cfg: SourceConfig, chunk_rows: int = 10_000) -> Iterator[list[SourceRecord]]:
    """The source's records in chunks, in input order. A manifest streams; a folder's or
    WebDataset's listing is made first (one entry per file, media stay references)."""
    kind = _kind(cfg)
    if kind == "manifest":
        yield from iter_manifest(Path(cfg.path), chunk_rows)
        return
    records = read_webdataset(cfg.path) if kind == "webdataset" else read_folder(Path(cfg.path))
    for k in range(0, len(records), chunk_rows):
        yield records[k:k + chunk_rows]


def source_size(cfg: SourceConfig) -> int:
    """About how many records the source holds, without parsing it: lines of a JSONL / CSV
    manifest, a Parquet manifest's row count, files of a folder. For sizing, never for counts."""
    kind = _kind(cfg)
    path = Path(cfg.path)
    if kind == "manifest":
        if path.suffix.lower() == ".parquet":
            try:
                return pq.ParquetFile(path).metadata.num_rows
            except (OSError, pa.ArrowInvalid):
                return 0
        with path.open("rb") as f:
            return sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 22), b""))
    if kind == "folder":
        return sum(1 for p in path.rglob("*") if p.is_file())
    return 0
