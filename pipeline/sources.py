"""Sources: a manifest (JSONL / CSV / Parquet), a folder of files grouped by stem, or WebDataset
shards. Each becomes a stream of ``SourceRecord`` chunks; media stay references until ingest reads them."""
from __future__ import annotations

import glob
import json
import tarfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from core.config import SourceConfig

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
AUDIO_EXTS = {".wav", ".flac", ".ogg", ".mp3", ".opus"}
TEXT_EXTS = {".txt"}
MANIFEST_COLUMNS = {"id", "label", "split", "text", "image", "audio"}


class SourceError(ValueError):
    """The input cannot be read at all (a user error: one line, no traceback)."""


@dataclass
class SourceRecord:
    row: int
    id: str = ""
    label: str = ""
    split: str = ""
    text: str | None = None
    image: str | None = None        # path relative to base, absolute path, URL, or "shard.tar#member"
    audio: str | None = None
    base: str = ""                  # folder relative refs resolve against

    def to_dict(self) -> dict:
        return dict(vars(self))   # every field is a str / int / None: no deep copy (asdict) needed


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
            chunk.append(_record(path, row, n, base))
            n += 1
            if len(chunk) >= chunk_rows:
                yield chunk
                chunk = []
    except (OSError, pa.ArrowInvalid, UnicodeDecodeError) as exc:
        raise SourceError(f"cannot read manifest {path}: {str(exc).splitlines()[0]}") from None
    if chunk:
        yield chunk


def _manifest_rows(path: Path, suffix: str, chunk_rows: int) -> Iterator[object]:
    if suffix in (".jsonl", ".ndjson", ".json"):
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise SourceError(f"manifest {path} line {n} is not valid JSON: {exc.msg}") from None
    elif suffix == ".csv":
        reader = pacsv.open_csv(path, read_options=pacsv.ReadOptions(block_size=1 << 22),
                                convert_options=pacsv.ConvertOptions(
                                    column_types={c: pa.string() for c in MANIFEST_COLUMNS}, strings_can_be_null=True))
        for batch in reader:
            yield from batch.to_pylist()
    else:
        for batch in pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20).iter_batches(batch_size=chunk_rows):
            yield from batch.to_pylist()


def _record(path: Path, row: object, n: int, base: str) -> SourceRecord:
    if not isinstance(row, dict):
        raise SourceError(f"manifest {path} row {n + 1} is not an object")
    unknown = set(row) - MANIFEST_COLUMNS
    if unknown:
        raise SourceError(f"manifest {path} has unknown column(s): {', '.join(sorted(unknown))}")
    return SourceRecord(
        row=n, id=_clean(row.get("id")) or "", label=_clean(row.get("label")) or "",
        split=_clean(row.get("split")) or "", text=_clean(row.get("text")),
        image=_clean(row.get("image")), audio=_clean(row.get("audio")), base=base)


def read_folder(root: Path) -> list[SourceRecord]:
    """``root/<label>/<stem>.{jpg,txt,wav,...}``: files sharing a stem are one record."""
    groups: dict[tuple[str, str], dict[str, Path]] = defaultdict(dict)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        ext = path.suffix.lower()
        kind = "image" if ext in IMAGE_EXTS else "audio" if ext in AUDIO_EXTS else "text" if ext in TEXT_EXTS else None
        if kind is None:
            continue
        rel_dir = path.parent.relative_to(root)
        groups[(str(rel_dir), path.stem)][kind] = path
    base = str(root.resolve())
    records = []
    for n, ((rel_dir, stem), files) in enumerate(sorted(groups.items())):
        label = "" if rel_dir == "." else Path(rel_dir).parts[-1]
        text = None
        if "text" in files:
            text = files["text"].read_text(encoding="utf-8", errors="replace")
        records.append(SourceRecord(
            row=n, id="", label=label, text=text,
            image=str(files["image"].relative_to(root)) if "image" in files else None,
            audio=str(files["audio"].relative_to(root)) if "audio" in files else None, base=base))
    return records


def read_webdataset(pattern: str) -> list[SourceRecord]:
    """WebDataset ``.tar`` shards: members grouped by ``__key__``; ``.cls``/``.json`` give the label."""
    shards = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
    if not shards:
        raise SourceError(f"no WebDataset shards match {pattern}")
    records = []
    for shard in shards:
        try:
            with tarfile.open(shard) as tar:
                members = [m for m in tar.getmembers() if m.isfile()]
                groups: dict[str, dict[str, tarfile.TarInfo]] = defaultdict(dict)
                for m in members:
                    key, _, ext = Path(m.name).name.partition(".")
                    groups[str(Path(m.name).parent / key)][ext.lower()] = m
                for key, files in groups.items():
                    rec = SourceRecord(row=len(records), id=Path(key).name, base=str(Path(shard).parent.resolve()))
                    for ext, m in files.items():
                        ref = f"{Path(shard).resolve()}#{m.name}"
                        if "." + ext in IMAGE_EXTS:
                            rec.image = ref
                        elif "." + ext in AUDIO_EXTS:
                            rec.audio = ref
                        elif ext in ("txt", "text"):
                            rec.text = tar.extractfile(m).read().decode("utf-8", "replace")
                        elif ext in ("cls", "label"):
                            rec.label = tar.extractfile(m).read().decode().strip()
                        elif ext == "json":
                            meta = json.loads(tar.extractfile(m).read() or b"{}")
                            rec.label = str(meta.get("label", rec.label) or "")
                            rec.split = str(meta.get("split", "") or "")
                    records.append(rec)
        except (OSError, tarfile.TarError) as exc:
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
