"""Sources: a manifest (JSONL / CSV / Parquet), a folder of files grouped by stem, or WebDataset
shards. Each becomes a list of ``SourceRecord``; media stay references until ingest reads them."""
from __future__ import annotations

import glob
import json
import tarfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

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


def read_manifest(path: Path) -> list[SourceRecord]:
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".ndjson", ".json"):
            rows = []
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise SourceError(f"manifest {path} line {n} is not valid JSON: {exc.msg}") from None
        elif suffix == ".csv":
            table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(
                column_types={c: pa.string() for c in MANIFEST_COLUMNS}, strings_can_be_null=True))
            rows = table.to_pylist()
        elif suffix == ".parquet":
            rows = pq.read_table(path).to_pylist()
        else:
            raise SourceError(f"unknown manifest type {path.suffix!r} (use .jsonl, .csv or .parquet)")
    except (OSError, pa.ArrowInvalid, UnicodeDecodeError) as exc:
        raise SourceError(f"cannot read manifest {path}: {str(exc).splitlines()[0]}") from None
    base = str(path.parent.resolve())
    records = []
    for n, row in enumerate(rows):
        if not isinstance(row, dict):
            raise SourceError(f"manifest {path} row {n + 1} is not an object")
        unknown = set(row) - MANIFEST_COLUMNS
        if unknown:
            raise SourceError(f"manifest {path} has unknown column(s): {', '.join(sorted(unknown))}")
        records.append(SourceRecord(
            row=n, id=_clean(row.get("id")) or "", label=_clean(row.get("label")) or "",
            split=_clean(row.get("split")) or "", text=_clean(row.get("text")),
            image=_clean(row.get("image")), audio=_clean(row.get("audio")), base=base))
    return records


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
    if kind == "webdataset":
        return read_webdataset(cfg.path)
    if kind == "folder":
        if not path.is_dir():
            raise SourceError(f"input folder not found: {path}")
        return read_folder(path)
    if not path.is_file():
        raise SourceError(f"manifest not found: {path}")
    return read_manifest(path)
