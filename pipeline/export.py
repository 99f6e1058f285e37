"""``mmpipe export``: one features-table version's accepted samples as a self-describing artefact
that other tools open directly: Parquet (Hugging Face ``Image`` / ``Audio`` columns, the text,
labels, splits, embeddings) or WebDataset shards, each with a dataset card (README.md) and
Croissant metadata (croissant.json).

Ray Data does the work: the snapshot's rows are read in parallel, grouped by the store shard that
holds their media, joined with those media one shard at a time and written by the workers. The
driver streams only labels and splits (for the card) and never holds rows or media."""
from __future__ import annotations

import hashlib
import json
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from core.config import ConfigError
from core.scan import TableScan, ray_read
from core.store import Store, filesystem_of, snapshot_dataset
from pipeline.sinks import TarSampleWriter, richness, sample_key
from stages.modalities import INLINE, MEDIA, MODALITIES, REGISTRY, modality_of_suffix

FORMATS = ("parquet", "webdataset")
HF_SPLIT = {"val": "validation"}   # mmpipe split -> the name Hugging Face gives it (and the export's folder)
PARQUET_GROUP_ROWS = 128   # rows per Parquet row group: media rows are large, and readers stream by row group
READ_COLUMNS = ["id", "label", "split", "aug", "meta", "shard", *(f"{m}_emb" for m in MODALITIES)]
READ_BLOCK_BYTES = 32 << 20   # stored bytes per Ray Data read task


@dataclass
class ExportPlan:
    """What the driver learned from the snapshot before any media move: counts for the card, and
    the run that made the version (its config, fingerprints and the rejects of that time)."""
    store: Store
    version: int
    scan: TableScan                         # the version's live rows
    splits: list[str]                       # exported, in order
    augmented: bool
    rows: Counter = field(default_factory=Counter)                  # split -> rows
    classes: dict[str, Counter] = field(default_factory=dict)        # split -> label -> rows
    modalities: Counter = field(default_factory=Counter)             # modality -> rows that have it
    run: dict[str, Any] = field(default_factory=dict)
    rejects: Counter = field(default_factory=Counter)                # reason -> ids

    @property
    def total(self) -> int:
        return sum(self.rows.values())

    def label_counts(self) -> Counter:
        return sum(self.classes.values(), Counter())


def hf_split(split: str) -> str:
    return HF_SPLIT.get(split, split)


def plan_export(store: Store, version: Optional[int], splits: list[str], augmented: bool) -> ExportPlan:
    """Resolve the version and splits and count what will be exported; a user error is a ConfigError."""
    dt = store.table(store.features_uri)
    if dt is None:
        raise ConfigError(f"store {store.uri} has no features table: nothing to export (run `mmpipe run` first)")
    latest = dt.version()
    if version is None:
        version = latest
    elif not 0 <= version <= latest:
        raise ConfigError(f"features table of {store.uri} has no version {version} (versions 0..{latest})")
    if version != latest:
        dt.load_as_version(version)
    plan = ExportPlan(store, version, snapshot_dataset(dt, store.fs), [], augmented)
    rows = pc.field("aug") == 0 if not augmented else None
    present: Counter = Counter()
    for batch in plan.scan.to_batches(
            columns=["split", "label", *(f"has_{m}" for m in MODALITIES)], filter=rows,
            batch_size=65536, batch_readahead=2, fragment_readahead=1):
        for split, label, n in _pairs(batch):
            present[split] += n
            if not splits or split in splits:
                plan.classes.setdefault(split, Counter())[label] += n
                plan.rows[split] += n
        keep = pc.is_in(batch.column("split"), pa.array(splits, pa.string())) if splits else None
        for m in MODALITIES:
            has = batch.column(f"has_{m}")
            plan.modalities[m] += pc.sum(has if keep is None else pc.and_(keep, has)).as_py() or 0
    if not present:
        raise ConfigError(f"store {store.uri} has no accepted samples at features version {version}: nothing to export")
    unknown = [s for s in splits if s not in present]
    if unknown:
        raise ConfigError(f"no split {', '.join(unknown)} at features version {version} "
                          f"(splits: {', '.join(sorted(present))})")
    plan.splits = sorted(plan.rows, key=lambda s: (s != "train", s))
    plan.run, rejects_version = _run_of(store, version)
    plan.rejects = _reject_counts(store, rejects_version)
    return plan


def _pairs(batch: pa.RecordBatch) -> list[tuple[str, str, int]]:
    """(split, label, rows) of a batch, counted by Arrow."""
    table = pa.Table.from_batches([batch]).select(["split", "label"])
    counts = table.group_by(["split", "label"]).aggregate([([], "count_all")])
    return list(zip(counts["split"].to_pylist(), counts["label"].to_pylist(), counts["count_all"].to_pylist()))


def _run_of(store: Store, version: int) -> tuple[dict, Optional[int]]:
    """The run record that committed features ``version``, and the rejects-table version current
    until the next features commit."""
    made, rejects = {}, None
    for record in store.runs():
        v = (record.get("versions") or {}).get("features")
        if v is not None and v > version:
            break
        if v is not None:
            made = record
        rv = (record.get("versions") or {}).get("rejects")
        rejects = rv if rv is not None else rejects
    return made, rejects


def _reject_counts(store: Store, version: Optional[int]) -> Counter:
    counts: Counter = Counter()
    if version is None:
        return counts
    ds = store.dataset("rejects", version)
    if ds is None:
        return counts
    for batch in ds.to_batches(columns=["reason"], batch_size=65536, batch_readahead=2, fragment_readahead=1):
        for item in pc.value_counts(batch.column(0)).to_pylist():
            counts[item["values"]] += item["counts"]
    return counts


# -- the Parquet layout ---------------------------------------------------------------------------
def hf_features() -> dict[str, Any]:
    """The export's columns as Hugging Face ``Features.to_dict()``, for the Parquet schema metadata."""
    value = lambda dtype: {"dtype": dtype, "_type": "Value"}  # noqa: E731
    out = {"id": value("string"), "label": value("string"), "split": value("string"), "aug": value("int32")}
    for m in MODALITIES:
        out[m] = value("string") if REGISTRY[m].inline else {"_type": REGISTRY[m].hf_feature}
    for m in MODALITIES:
        out[f"{m}_emb"] = {"feature": value("float32"), "_type": "List"}
    out["meta"] = value("string")
    return out


def parquet_schema() -> pa.Schema:
    media = pa.struct([("bytes", pa.binary()), ("path", pa.string())])   # datasets.Image / Audio storage
    fields = [("id", pa.string()), ("label", pa.string()), ("split", pa.string()), ("aug", pa.int32())]
    fields += [(m, pa.string() if REGISTRY[m].inline else media) for m in MODALITIES]
    fields += [(f"{m}_emb", pa.list_(pa.float32())) for m in MODALITIES]
    fields += [("meta", pa.string())]
    return pa.schema(fields, metadata={"huggingface": json.dumps({"info": {"features": hf_features()}})})


def shard_members(store: Store, shard: str, keys: set[str]) -> dict[str, dict[str, bytes]]:
    """The members of samples ``keys`` in one store shard (streamed): key -> {extension: bytes}."""
    out: dict[str, dict[str, bytes]] = {}
    if not shard:
        return out
    with store.fs.open_input_stream(store.path_of(shard)) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            if key in keys and member.isfile():
                out.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return out


def _media_of(members: dict[str, bytes], key: str) -> dict[str, Any]:
    """A sample's members as export values: None where a modality is absent (or its member is empty)."""
    out: dict[str, Any] = {m: None for m in MODALITIES}
    for ext, data in members.items():
        m = modality_of_suffix(ext)
        if m in out and data:
            out[m] = data.decode("utf-8") if REGISTRY[m].inline else {"bytes": data, "path": f"{key}.{ext}"}
    return out


def group_members(group: pa.Table, store_uri: str) -> tuple[list[str], dict[str, dict[str, bytes]]]:
    """The sample keys of a group of rows from one store shard, and their members read from it."""
    keys = [sample_key(i, a) for i, a in zip(group["id"].to_pylist(), group["aug"].to_pylist())]
    shard = group["shard"][0].as_py()
    members = shard_members(Store(store_uri), shard, set(keys))
    missing = [k for k in keys if k not in members]
    if missing:
        raise RuntimeError(f"store shard {shard!r} lacks samples its features rows name: {missing[:5]}")
    return keys, members


def with_media(group: pa.Table, store_uri: str) -> pa.Table:
    """The rows of one store shard joined with their media, in the export's Parquet schema."""
    keys, members = group_members(group, store_uri)
    media = [_media_of(members[k], k) for k in keys]
    schema = parquet_schema()
    columns = {name: group[name] for name in ("id", "label", "split", "aug", "meta", *(f"{m}_emb" for m in MODALITIES))}
    for m in MODALITIES:
        columns[m] = pa.array([row[m] for row in media], schema.field(m).type)
    return pa.table({f.name: columns[f.name] for f in schema}).cast(schema)


# -- the WebDataset layout ------------------------------------------------------------------------
def _normalize_sample(key: str, members: dict[str, bytes]) -> dict[str, bytes]:
    """A store sample in the current shard layout: a ``.txt`` in every sample, the ``.json`` with
    the same keys and types in every sample (shards written before that layout lacked both)."""
    sample: dict[str, Any] = {"__key__": key, "txt": b"", **{k: v for k, v in members.items() if v or k == "txt"}}
    meta = json.loads(members.get("json") or b"{}")
    for name in ("aug_params", "dropped", "meta"):
        if not isinstance(meta.get(name, ""), str):
            meta[name] = json.dumps(meta[name], sort_keys=True)
    for m in MODALITIES:
        meta.setdefault(f"has_{m}", any(modality_of_suffix(ext) == m and v for ext, v in members.items()))
    sample["json"] = json.dumps(meta, sort_keys=True).encode()
    return sample


FILE_EXT = {"parquet": "parquet", "webdataset": "tar"}


def split_dir(fmt: str, split: str) -> str:
    """Where a split's files go in the export, relative to it (named as Hugging Face names splits)."""
    return f"data/{hf_split(split)}" if fmt == "parquet" else hf_split(split)


def write_group(group: pa.Table, store_uri: str, out: str, fmt: str) -> pa.Table:
    """Ray ``map_groups``: the rows of one split in one store shard, joined with their media and
    written by the worker as one export file, named from both (a retried task rewrites it).
    Returns (path, rows)."""
    import pyarrow.parquet as pq

    fs, root = filesystem_of(out)
    split, shard = group["split"][0].as_py(), group["shard"][0].as_py()
    path = f"{root}/{split_dir(fmt, split)}/{hashlib.sha1(f'{split}:{shard}'.encode()).hexdigest()[:16]}.{FILE_EXT[fmt]}"
    if fmt == "parquet":
        table = with_media(group, store_uri)
        with fs.open_output_stream(path) as stream:
            pq.write_table(table, stream, row_group_size=PARQUET_GROUP_ROWS, compression="snappy")
        return pa.table({"path": [path], "rows": [table.num_rows]})
    keys, members = group_members(group, store_uri)
    writer = TarSampleWriter(fs.open_output_stream(path), int(time.time()))
    for sample in sorted((_normalize_sample(k, members[k]) for k in keys), key=richness):
        writer.write(sample)
    writer.close()
    return pa.table({"path": [path], "rows": [len(keys)]})


# -- the run --------------------------------------------------------------------------------------
@dataclass
class ExportResult:
    out: str
    format: str
    rows: int
    files: int


def _select(batch: pa.Table, splits: list[str], augmented: bool) -> pa.Table:
    keep = pc.is_in(batch["split"], pa.array(splits, pa.string()))
    if not augmented:
        keep = pc.and_(keep, pc.equal(batch["aug"], 0))
    return batch.filter(keep)


def export(plan: ExportPlan, fmt: str, out: str) -> ExportResult:
    """Write the plan's rows as ``fmt`` under ``out`` in one Ray Data pass (rows grouped by split
    and store shard, one file per group, written by the workers), then the card and Croissant."""
    import ray
    from ray.data.context import ShuffleStrategy

    fs, root = filesystem_of(out)
    for split in plan.splits:   # the workers write into them
        fs.create_dir(f"{root}/{split_dir(fmt, split)}", recursive=True)
    ctx = ray.data.DataContext.get_current()
    strategy, ctx.shuffle_strategy = ctx.shuffle_strategy, ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    try:   # the hash shuffle starts aggregator actors: 10-14 s against 1 s for a small store
        ds = ray_read(plan.scan, READ_COLUMNS, READ_BLOCK_BYTES)
        ds = ds.map_batches(_select, fn_kwargs={"splits": plan.splits, "augmented": plan.augmented}, batch_format="pyarrow")
        done = ds.groupby(["split", "shard"]).map_groups(
            write_group, fn_kwargs={"store_uri": plan.store.uri, "out": out, "fmt": fmt}, batch_format="pyarrow")
        stats = done.aggregate(ray.data.aggregate.Sum("rows"), ray.data.aggregate.Count())
    finally:
        ctx.shuffle_strategy = strategy
    written, files = int(stats.get("sum(rows)") or 0), int(stats.get("count()") or 0)
    if written != plan.total:
        raise RuntimeError(f"export wrote {written} rows, the snapshot has {plan.total}")
    _write_text(fs, f"{root}/README.md", dataset_card(plan, fmt))
    _write_text(fs, f"{root}/croissant.json", json.dumps(croissant(plan, fmt), indent=2))
    return ExportResult(out, fmt, written, files)


# -- dataset card and Croissant ------------------------------------------------------------------
def _data_glob(fmt: str, split: str) -> str:
    return f"{split_dir(fmt, split)}/*.{FILE_EXT[fmt]}"


def _md_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def dataset_card(plan: ExportPlan, fmt: str) -> str:
    """README.md: Hugging Face card metadata (one split per folder), counts, classes, splits, the
    pipeline's config and stage fingerprints, and the rejects by reason."""
    import yaml

    name = (plan.run.get("config") or {}).get("name") or "mmpipe-export"
    front = {"pretty_name": name, "tags": ["mmpipe", "multimodal"],
             "configs": [{"config_name": "default", "data_files": [
                 {"split": hf_split(s), "path": _data_glob(fmt, s)} for s in plan.splits]}]}
    labels = sorted(plan.label_counts())
    open_it = ('ds = load_dataset("path/to/this/folder")   # the splits of this card\n'
               + ('ds = load_dataset("parquet", data_dir="path/to/this/folder/data")' if fmt == "parquet"
                  else 'ds = load_dataset("webdataset", data_dir="path/to/this/folder")'))
    parts = [
        "---\n" + yaml.safe_dump(front, sort_keys=False) + "---",
        f"# {name}",
        f"Exported by `mmpipe export` from the store `{plan.store.uri}`: features-table version {plan.version}"
        + (f" (committed by run `{plan.run['run_id']}`)" if plan.run.get("run_id") else "")
        + f", {'original samples and their augmented copies' if plan.augmented else 'original samples (aug = 0)'}, "
          f"as {fmt}, on {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}.",
        "## Splits\n\n" + _md_table(["split (mmpipe)", "split (folder)", "samples"],
                                      [[s, hf_split(s), plan.rows[s]] for s in plan.splits] + [["all", "", plan.total]]),
        "## Classes\n\n" + _md_table(["label", *plan.splits, "all"],
                                       [[lb or "(none)", *(plan.classes[s][lb] for s in plan.splits), plan.label_counts()[lb]]
                                        for lb in labels]),
        "## Modalities\n\n" + _md_table(["modality", "samples with it", "samples without"],
                                          [[m, plan.modalities[m], plan.total - plan.modalities[m]] for m in MODALITIES]),
        "## Columns\n\n" + (_columns_text() if fmt == "parquet" else _members_text()),
        f"## Open it\n\n```python\nfrom datasets import load_dataset\n{open_it}\n```\n\n"
        "Croissant metadata (MLCommons) is in `croissant.json`.",
        "## Rejected samples (not exported)\n\n" + (_md_table(["reason", "samples"], sorted(plan.rejects.items()))
                                                      if plan.rejects else "None."),
        "## Pipeline\n\nStage fingerprints (hash of stage name, version and parameters):\n\n"
        + _md_table(["stage", "fingerprint"], sorted((plan.run.get("fingerprints") or {}).items())),
        "Resolved configuration of that run (secrets redacted):\n\n```yaml\n"
        + yaml.safe_dump(plan.run.get("config") or {}, sort_keys=False) + "```",
    ]
    return "\n\n".join(parts) + "\n"


def _columns_text() -> str:
    rows = [["id, label, split", "string", "sample id, class label, mmpipe split"],
            ["aug", "int32", "0: original; k: k-th augmented copy"],
            [", ".join(MEDIA), f"struct{{bytes, path}} (HF {' / '.join(REGISTRY[m].hf_feature for m in MEDIA)})",
             "cleaned media; null where absent"],
            [", ".join(INLINE), "string", "cleaned text; null where absent"],
            ["<modality>_emb", "list<float32>", "features; zeros where the modality is absent"],
            ["meta", "string (JSON)", "what the pipeline measured"]]
    return _md_table(["column", "type", "meaning"], rows)


def _members_text() -> str:
    media = ", ".join(f"{'/'.join(f'`.{e}`' for e in REGISTRY[m].members)} ({m})" for m in MEDIA)
    extras = ", ".join(f"`.{e}` ({c})" for m in MODALITIES for c, e in REGISTRY[m].extras.items())
    return (f"One sample per key: {media} where the sample has them" + (f", {extras} beside its modality" if extras else "")
            + ", `.txt` in every sample (empty: no text), `.json` metadata (id, label, split, aug, has_<modality>, "
            "hashes; lineage as JSON text).")


CROISSANT_CONTEXT = {
    "@language": "en", "@vocab": "https://schema.org/", "sc": "https://schema.org/",
    "cr": "http://mlcommons.org/croissant/", "dct": "http://purl.org/dc/terms/",
    "citeAs": "cr:citeAs", "column": "cr:column", "conformsTo": "dct:conformsTo",
    "data": {"@id": "cr:data", "@type": "@json"}, "dataType": {"@id": "cr:dataType", "@type": "@vocab"},
    "examples": {"@id": "cr:examples", "@type": "@json"}, "extract": "cr:extract", "field": "cr:field",
    "fileProperty": "cr:fileProperty", "fileObject": "cr:fileObject", "fileSet": "cr:fileSet",
    "format": "cr:format", "includes": "cr:includes", "isLiveDataset": "cr:isLiveDataset",
    "jsonPath": "cr:jsonPath", "key": "cr:key", "md5": "cr:md5", "parentField": "cr:parentField",
    "path": "cr:path", "recordSet": "cr:recordSet", "references": "cr:references", "regex": "cr:regex",
    "repeated": "cr:repeated", "replace": "cr:replace", "separator": "cr:separator", "source": "cr:source",
    "subField": "cr:subField", "transform": "cr:transform",
}


def croissant(plan: ExportPlan, fmt: str) -> dict[str, Any]:
    """Croissant 1.0 JSON-LD: the files (a FileSet of one folder per split; for WebDataset, the
    members in the shards) and one RecordSet of samples."""
    labels = ", ".join(sorted(lb for lb in plan.label_counts() if lb))

    def fld(name: str, dtype: str, source: dict, description: str, **extra) -> dict:
        return {"@type": "cr:Field", "@id": f"samples/{name}", "name": name, "description": description,
                "dataType": dtype, "source": source, **extra}

    splits = "; ".join(f"{s}: {plan.rows[s]} in {split_dir(fmt, s)}/" for s in plan.splits)
    if fmt == "parquet":
        files = [{"@type": "cr:FileSet", "@id": "parquet-files", "name": "parquet-files",
                  "description": f"Parquet files, one folder per split ({splits})",
                  "encodingFormat": "application/x-parquet", "includes": "data/*/*.parquet"}]
        col = lambda c, **t: {"fileSet": {"@id": "parquet-files"}, "extract": {"column": c}, **t}  # noqa: E731
        fields = [fld("id", "sc:Text", col("id"), "sample id"),
                  fld("label", "sc:Text", col("label"), f"class label ({labels})"),
                  fld("split", "sc:Text", col("split"), "mmpipe split (train, val, test)"),
                  fld("aug", "sc:Integer", col("aug"), "0: original; k: k-th augmented copy")]
        for m in MODALITIES:
            source = col(m) if REGISTRY[m].inline else col(m, transform={"jsonPath": "bytes"})
            fields.append(fld(m, REGISTRY[m].croissant, source, f"cleaned {m}; null where the sample has none"))
        for m in MODALITIES:
            fields.append(fld(f"{m}_emb", "sc:Float", col(f"{m}_emb"), f"{m} features; zeros where absent", repeated=True))
    else:
        files = [{"@type": "cr:FileSet", "@id": "shards", "name": "shards",
                  "description": f"WebDataset shards, one folder per split ({splits})",
                  "encodingFormat": "application/x-tar", "includes": "*/*.tar"}]
        members = {**{m: [f"*.{e}" for e in REGISTRY[m].members] for m in MODALITIES}, "json": ["*.json"]}
        for m in (*MODALITIES, "json"):
            files.append({"@type": "cr:FileSet", "@id": f"members-{m}", "name": f"members-{m}", "containedIn": {"@id": "shards"},
                          "encodingFormat": "application/json" if m == "json" else "application/octet-stream",
                          "includes": members[m]})
        content = lambda m: {"fileSet": {"@id": f"members-{m}"}, "extract": {"fileProperty": "content"}}  # noqa: E731
        fields = [fld("key", "sc:Text", {"fileSet": {"@id": "members-json"}, "extract": {"fileProperty": "filename"},
                                         "transform": {"regex": "^([^/.]+)\\.json$"}},
                      "sample key (the common file name of a sample's members)"),
                  fld("metadata", "sc:Text", content("json"), f"JSON: id, label ({labels}), split, aug, has_<modality>")]
        for m in MODALITIES:
            absent = "empty" if REGISTRY[m].inline else "no member"
            fields.append(fld(m, REGISTRY[m].croissant, content(m), f"cleaned {m}; {absent} where the sample has none"))
    name = (plan.run.get("config") or {}).get("name") or "mmpipe-export"
    return {
        "@context": CROISSANT_CONTEXT, "@type": "sc:Dataset", "conformsTo": "http://mlcommons.org/croissant/1.0",
        "name": name, "description": f"{plan.total} accepted samples of an mmpipe store (features-table version "
                                     f"{plan.version}); classes: {labels}; see README.md.",
        "version": f"{plan.version}.0.0", "datePublished": time.strftime("%Y-%m-%d", time.gmtime()),
        "url": "README.md", "isLiveDataset": False,
        "distribution": files,
        "recordSet": [{"@type": "cr:RecordSet", "@id": "samples", "name": "samples",
                       "description": "one record per exported sample", "field": fields}],
    }


def _write_text(fs: pafs.FileSystem, path: str, text: str) -> None:
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def _check_out(out: str) -> None:
    fs, root = filesystem_of(out)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        raise ConfigError(f"--out {out} is a file; give a folder")
    if info.type == pafs.FileType.Directory and fs.get_file_info(pafs.FileSelector(root)):
        raise ConfigError(f"--out {out} is not empty; give a new or empty folder")


def register(app, config_loader: Callable) -> None:
    """Add ``export`` to the ``mmpipe`` app."""
    import typer

    @app.command("export")
    def export_cmd(store: str = typer.Argument(..., help="Store path or URI"),
                   format: str = typer.Option(..., "--format", help="parquet | webdataset"),
                   out: str = typer.Option(..., "--out", help="New (or empty) folder to write"),
                   split: list[str] = typer.Option([], "--split", help="Only this split (repeatable, or a,b); default all"),
                   version: Optional[int] = typer.Option(None, "--version", help="Features-table version (default: the latest)"),
                   augmented: bool = typer.Option(False, "--augmented", help="Also export the augmented copies (aug > 0)"),
                   address: Optional[str] = typer.Option(None, "--address", help="Ray cluster to run on (or RAY_ADDRESS)")) -> None:
        """Export one features-table version's accepted samples (Parquet or WebDataset) with a dataset
        card (README.md) and Croissant metadata (croissant.json)."""
        fmt = format.lower()
        if fmt not in FORMATS:
            raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, not {format!r}")
        if "://" not in store and not Path(store).is_dir():
            raise ConfigError(f"store not found: {store}")
        splits = [s.strip() for item in split for s in item.split(",") if s.strip()]
        _check_out(out)
        plan = plan_export(Store(store), version, splits, augmented)
        from core.config import Config
        from pipeline.execution import init_ray

        init_ray(Config.model_validate({"ray": {"address": address, "dashboard": False}}))
        result = export(plan, fmt, out)
        typer.echo(f"exported {result.rows} samples of features version {plan.version} "
                   f"({', '.join(f'{s}={plan.rows[s]}' for s in plan.splits)}) as {fmt} to {out} "
                   f"({result.files} files, README.md, croissant.json)")
