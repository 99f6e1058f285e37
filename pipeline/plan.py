"""Plan a run: resolve every stage (validating its parameters) and decide, per input id, what
must be (re)computed given what the store already holds (incremental reprocessing)."""
from __future__ import annotations

import hashlib
import json
from json.encoder import encode_basestring_ascii
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import ValidationError

from core.config import Config, ConfigError, Resources, StageConfig
from stages.base import MODALITIES, Stage
from stages.modalities import MEDIA
from stages.registry import resolve_stage


@dataclass(frozen=True)
class StageSpec:
    """One resolved stage: what runs (``ref``: a registered name or ``package.module:Class``), with
    which validated parameters and resources."""

    name: str
    params: dict[str, Any]
    resources: Resources
    fingerprint: str
    modality: str | None
    ref: str = ""
    cls: type[Stage] | None = field(default=None, compare=False, repr=False)

    @property
    def to_actor(self) -> tuple[str, dict[str, Any]]:
        """What an actor needs to build the stage: its reference and parameters."""
        return self.ref or self.name, self.params


def _h(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _spec(ref: str, params: dict, resources: Resources, where: str) -> StageSpec:
    try:
        cls = resolve_stage(ref)
        fp = cls.fingerprint(params)
    except KeyError as exc:
        raise ConfigError(f"{where}: {exc.args[0]}") from None
    except ValueError as exc:   # pydantic ValidationError is a ValueError
        first = str(exc).splitlines()
        detail = " ".join(first[1:3]).strip() if len(first) > 1 else first[0]
        raise ConfigError(f"bad parameters for stage {cls.name} ({where}): {detail}") from None
    return StageSpec(cls.name, params, resources, fp, cls.modality, ref if ":" in ref else cls.name, cls)


COMMON_KEYS = set(StageConfig.model_fields)


def _entries(tree: dict[str, Any], prefix: str = "") -> list[tuple[str, StageConfig]]:
    """The leaves of ``stages`` in order, as (dotted place, entry). A mapping is an entry when it
    has a stage's keys or its place names a stage; otherwise it groups entries."""
    out: list[tuple[str, StageConfig]] = []
    for key, value in tree.items():
        place = f"{prefix}{key}"
        value = {} if value is None else value
        if not isinstance(value, dict):
            raise ConfigError(f"bad config value at 'stages.{place}': expected a mapping")
        if COMMON_KEYS & value.keys() or "encoder" in value or _is_stage(place):
            try:
                out.append((place, StageConfig.model_validate(value)))
            except ValidationError as exc:
                err = exc.errors()[0]
                where = ".".join(str(p) for p in err["loc"])
                raise ConfigError(f"bad config value at 'stages.{place}.{where}': {err['msg']}") from None
        elif value:
            out += _entries(value, place + ".")
        elif prefix:
            raise ConfigError(f"unknown config key 'stages.{place}': no stage is registered as {place!r}")
    return out


def _is_stage(name: str) -> bool:
    try:
        resolve_stage(name, load_all=False)
    except KeyError:
        return False
    return True


def resolve_stages(cfg: Config, num_cpus: int = 1) -> list[StageSpec]:
    """Every stage of the processing pass, in the config's order, resolved through the registry,
    parameters validated and the column chain checked (fail before data moves). Imports only the
    stage modules the config names: a run that uses no torch stage never imports torch."""
    ex = cfg.execution
    default = Resources(num_cpus=1, num_gpus=0, concurrency=ex.concurrency or max(1, num_cpus), batch_size=ex.batch_size)
    specs = [_spec(cfg.source.load_stage, {}, default, "source.load_stage")]
    placed: list[tuple[StageSpec, StageConfig]] = []
    for place, entry in _entries(cfg.stages):
        if entry.enabled:
            placed += _entry_specs(place, entry, default)
    names = {spec.name for spec, _ in placed}
    specs += _ordered([spec for spec, _ in _place(placed) if all(r in names for r in spec.cls.requires)])
    check_columns(cfg, specs)
    return specs


def _entry_specs(place: str, entry: StageConfig, default: Resources) -> list[tuple[StageSpec, StageConfig]]:
    """The stages one config entry runs as (none when its parameters make it a no-op)."""
    ref, where = entry.uses or place, f"stages.{place}"
    try:
        cls = resolve_stage(ref)
    except KeyError as exc:
        raise ConfigError(f"{where}: {exc.args[0]}") from None
    extra = entry.model_extra or {}
    unknown = sorted(set(extra) - set(cls.config_keys))
    if unknown:
        raise ConfigError(f"unknown config key '{where}.{unknown[0]}'")
    try:
        params = cls.from_config(entry.params, **extra)
        steps = cls.expand(params) if cls.active(params) else []
    except KeyError as exc:
        raise ConfigError(f"{where}: {exc.args[0]}") from None
    except ValueError as exc:
        lines = str(exc).splitlines()
        raise ConfigError(f"bad parameters for stage {cls.name} ({where}): {' '.join(lines[1:3]).strip() or lines[0]}") from None
    return [(_spec(ref if name == cls.name else name, step_params, (entry.resources or default) if own else default, where), entry)
            for name, step_params, own in steps]


def _place(placed: list[tuple[StageSpec, StageConfig]]) -> list[tuple[StageSpec, StageConfig]]:
    """Honour ``after`` / ``before``: move those entries next to the stage they name."""
    order = [p for p in placed if not (p[1].after or p[1].before)]
    for item in [p for p in placed if p[1].after or p[1].before]:
        anchor = item[1].after or item[1].before
        at = [k for k, (spec, _) in enumerate(order) if spec.name == anchor or spec.name.startswith(anchor + ".")]
        if not at:
            raise ConfigError(f"stage {item[0].name}: no stage {anchor!r} to place it "
                              f"{'after' if item[1].after else 'before'}")
        order.insert(at[-1] + 1 if item[1].after else at[0], item)
    return order


def _ordered(specs: list[StageSpec]) -> list[StageSpec]:
    """The config's order, except that a stage never runs before one its class ``runs_after``
    names (a stable topological sort: the earliest entry whose predecessors have all run goes next)."""
    def before(spec: StageSpec, other: StageSpec) -> bool:   # must ``other`` run before ``spec``?
        return any(other.name == p or (p.endswith(".") and other.name.startswith(p)) for p in spec.cls.runs_after)

    pending, out = list(specs), []
    while pending:
        ready = next((s for s in pending if not any(before(s, o) for o in pending if o is not s)), None)
        if ready is None:
            raise ConfigError(f"stages {', '.join(s.name for s in pending)} each need another to run first")
        out.append(ready)
        pending.remove(ready)
    return out


def scan_spec(cfg: Config) -> StageSpec:
    """Pass 1's stage, with its parameters from the source section."""
    params = {"roots": cfg.source.roots, "http": cfg.source.http.model_dump()}
    return _spec(cfg.source.scan_stage, params, Resources(), "source.scan_stage")


# What every row carries before any stage: the source record's fields and the planner's.
PLANNER_COLUMNS = {*(f"{m}_ref" for m in MEDIA), "sha_sample", "redo", "keep", "fp_all"}


def check_columns(cfg: Config, specs: list[StageSpec]) -> None:
    """Each stage reads only columns that the source, the scan or an earlier stage writes."""
    from pipeline.sources import SourceRecord

    have = SourceRecord.columns() | PLANNER_COLUMNS | resolve_stage(cfg.source.scan_stage).columns("writes")
    for spec in specs:
        missing = spec.cls.columns("reads") - have
        if missing:
            raise ConfigError(f"stage {spec.name} reads column(s) {', '.join(sorted(missing))} that no stage "
                              "before it writes; put it after the stage that does")
        have |= spec.cls.columns("writes")


def fingerprints(cfg: Config, specs: list[StageSpec]) -> dict[str, str]:
    """Lineage fingerprints: ``sample`` (stages touching every modality, split, policy, seed) and
    one per modality (its cleanup, augmentation and feature stages)."""
    shared = [s.fingerprint for s in specs if s.modality is None]
    fps = {"sample": _h(shared, cfg.split.model_dump(), cfg.bad_modality, cfg.seed)}
    for m in MODALITIES:
        fps[m] = _h([s.fingerprint for s in specs if s.modality == m])
    # A modality added later (video) counts only where the config has stages for it, so the
    # rejects of stores from before it keep their fingerprint.
    fps["all"] = _h(fps["sample"], *(fps[m] for m in MODALITIES
                                     if m in HASHED_ALWAYS or any(s.modality == m for s in specs)))
    return fps


def derived_modalities(specs: list[StageSpec]) -> dict[str, str]:
    """Modalities some stage makes from another (a clip's audio track -> ``audio``): target -> source."""
    out: dict[str, str] = {}
    for spec in specs:
        out.update(spec.cls.derives(spec.params) if spec.cls is not None else {})
    return out


def derive_hashes(rows: list[dict], derived: dict[str, str]) -> None:
    """A row that lacks a derived modality but has its source gets the source's hash (tagged) as
    that modality's: the planner then (re)computes it with its source and keeps it in lineage."""
    for target, source in derived.items():
        for r in rows:
            if not r.get(f"sha_{target}") and r.get(f"sha_{source}"):
                r[f"sha_{target}"] = f"{source}:{r[f'sha_{source}']}"


def stable_split(key: str, train: float, val: float) -> str:
    u = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "train" if u < train else "val" if u < train + val else "test"


@dataclass
class Lineage:
    """What the store holds now: per id, the hashes and fingerprints that made it."""

    features: dict[str, dict[str, str]] = field(default_factory=dict)   # aug=0 rows
    rejects: dict[str, dict[str, str]] = field(default_factory=dict)
    keys: dict[str, list[int]] = field(default_factory=dict)            # id -> aug indices stored


@dataclass
class Plan:
    rows: list[dict]                  # to process (pass 2), with id, split, sha_sample, redo
    rejects: list[dict]               # decided at plan time (scan failures, repeated ids)
    unchanged: set[str]
    removed: set[str]
    partial: set[str]                 # ids recomputing only some modalities
    input_ids: list[str]

    @property
    def processed_ids(self) -> set[str]:
        return {r["id"] for r in self.rows} | {r["id"] for r in self.rejects}


def _h_strings(*parts: str) -> str:
    """``_h`` of strings, without building the JSON through the general encoder (the planner
    hashes every row): the same bytes ``json.dumps`` writes for a list of strings."""
    blob = "[" + ", ".join(map(encode_basestring_ascii, parts)) + "]"
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# The modalities every sample hash and fingerprint names, present or not; one added later enters
# them only where a row has it, so the ids and lineage of stores from before it stay the same.
HASHED_ALWAYS = ("image", "text", "audio")


# A modality's content in the sample hash: its content hash, else its reference, else "".
_ALWAYS_KEYS = tuple((f"sha_{m}", f"{m}_ref") for m in HASHED_ALWAYS)
_LATER_KEYS = tuple((m, f"sha_{m}", f"{m}_ref") for m in MODALITIES if m not in HASHED_ALWAYS)


def assign_ids(scanned: list[dict], cfg: Config, derived: dict[str, str] | None = None) -> None:
    for r in scanned:
        if r.get("sha_sample"):   # assigned already (a streamed plan assigns when rows arrive)
            continue
        parts = (*(r.get(sha) or r.get(ref) or "" for sha, ref in _ALWAYS_KEYS), r["label"],
                 *(f"{m}:{c}" for m, sha, ref in _LATER_KEYS if (c := r.get(sha) or r.get(ref))))
        r["sha_sample"] = _h_strings(*parts) if all(type(p) is str for p in parts) else _h(*parts)
        if not r["id"]:
            r["id"] = r["sha_sample"]
        if not r["split"]:
            r["split"] = stable_split(r["id"], cfg.split.train, cfg.split.val)
        elif r["split"] not in ("train", "val", "test"):
            r.update(reject_stage="ingest", reject_reason="bad_split",
                     reject_detail=f"split must be train, val or test, not {r['split']!r}")
    derive_hashes(scanned, derived or {})


_PLAIN = r"^[\x20\x21\x23-\x5b\x5d-\x7e]*$"   # what json.dumps writes as it is: printable ASCII but quote and backslash


def _sample_hashes(parts: list[pa.Array], later: list[tuple[str, pa.Array]]) -> pa.Array:
    """``_h_strings(*parts, *("m:c" for each later modality present))`` per row. The JSON it hashes
    is built by Arrow for rows of plain strings; others (escapes to write) go through Python."""
    def quoted(value) -> list:
        return ['"', value, '"']

    pieces = ["["] + quoted(parts[0])
    for part in parts[1:]:
        pieces += [", ", *quoted(part)]
    for m, values in later:
        pieces.append(pc.if_else(pc.equal(values, ""), "", pc.binary_join_element_wise(f', "{m}:', values, '"', "")))
    plain = pc.match_substring_regex(parts[0], _PLAIN)
    for part in parts[1:] + [values for _, values in later]:
        plain = pc.and_(plain, pc.match_substring_regex(part, _PLAIN))
    blobs = pc.if_else(plain, pc.binary_join_element_wise(*pieces, "]", ""), None).cast(pa.binary()).to_pylist()
    rows = None if pc.all(plain).as_py() else list(zip(*(p.to_pylist() for p in parts)))
    later_rows = None if rows is None else list(zip(*(v.to_pylist() for _, v in later))) if later else [()] * len(rows)
    out = []
    for k, blob in enumerate(blobs):
        if blob is not None:
            out.append(hashlib.sha256(blob).hexdigest()[:16])
        else:
            extra = (f"{m}:{c}" for (m, _), c in zip(later, later_rows[k]) if c)
            out.append(_h_strings(*rows[k], *extra))
    return pa.array(out, pa.string())


def _stable_splits(ids: pa.Array, train: float, val: float) -> pa.Array:
    """``stable_split`` of every id."""
    head = b"".join(hashlib.sha256(i).digest()[:4] for i in ids.cast(pa.binary()).to_pylist())
    u = np.frombuffer(head, ">u4") / 0xFFFFFFFF
    return pa.array(np.where(u < train, "train", np.where(u < train + val, "val", "test")).astype(object), pa.string())


def assign_ids_table(scanned: pa.Table, cfg: Config, derived: dict[str, str] | None = None) -> pa.Table:
    """``assign_ids`` over the scan's columns: the same sample hash, id, split and ``bad_split``
    rejects, with one Python call per row only for the hashes (the sample's, and the split's
    where the source gave none)."""
    n = scanned.num_rows

    def col(name: str) -> pa.Array:
        if name not in scanned.column_names:
            return pa.array([""] * n, pa.string())
        return pc.fill_null(scanned[name].combine_chunks(), "")

    def first(a: pa.Array, b: pa.Array) -> pa.Array:   # a, else b
        return pc.if_else(pc.not_equal(a, ""), a, b)

    parts = [first(col(sha), col(ref)) for sha, ref in _ALWAYS_KEYS] + [col("label")]
    later = [(m, first(col(sha), col(ref))) for m, sha, ref in _LATER_KEYS]
    sample = _sample_hashes(parts, [(m, c) for m, c in later if pc.any(pc.not_equal(c, "")).as_py()])
    ids = first(col("id"), sample)
    split = col("split")
    if pc.any(pc.equal(split, "")).as_py():
        split = first(split, _stable_splits(ids, cfg.split.train, cfg.split.val))
    bad = pc.invert(pc.is_in(split, value_set=pa.array(["train", "val", "test"])))
    out = {c: scanned[c] for c in scanned.column_names}
    out.update(id=ids, split=split, sha_sample=sample)
    if pc.any(bad).as_py():
        stage, reason, detail = (col(f"reject_{c}") for c in ("stage", "reason", "detail"))
        detail = [f"split must be train, val or test, not {s!r}" if b else d
                  for s, b, d in zip(split.to_pylist(), bad.to_pylist(), detail.to_pylist())]
        out.update(reject_stage=pc.if_else(bad, "ingest", stage), reject_reason=pc.if_else(bad, "bad_split", reason),
                   reject_detail=pa.array(detail, pa.string()))
    for target, source in (derived or {}).items():
        have, src = col(f"sha_{target}"), col(f"sha_{source}")
        tagged = pc.binary_join_element_wise(f"{source}:", src, "")
        out[f"sha_{target}"] = pc.if_else(pc.and_(pc.equal(have, ""), pc.not_equal(src, "")), tagged, have)
    return pa.table(out)


def mark_content_duplicates(rows: list[dict]) -> None:
    """Exact whole-sample duplicates among ``rows`` (in input order, not rejected by the scan):
    the first keeps its place, the others become ``duplicate`` rejects naming its id. The rows
    sharing a content hash must all be here (a streamed plan groups them by hash)."""
    by_content: dict[str, str] = {}
    for r in rows:
        if r["reject_reason"]:
            continue
        kept = by_content.setdefault(r["sha_sample"], r["id"])
        if kept != r["id"]:
            r.update(reject_stage="ingest", reject_reason="duplicate", reject_detail=kept)


def make_plan(scanned: list[dict], lineage: Lineage, fps: dict[str, str], cfg: Config, dedup: bool = True,
              derived: dict[str, str] | None = None) -> Plan:
    """The whole plan of rows held in memory (one bucket of a streamed plan, or a small input)."""
    assign_ids(scanned, cfg, derived)
    plan, candidates = plan_rows(scanned, lineage, fps, cfg, dedup)
    redo_ids = plan.processed_ids | plan.removed
    reexamine(plan, candidates, redo_ids.__contains__)
    return plan


def plan_rows(scanned: list[dict], lineage: Lineage, fps: dict[str, str], cfg: Config,
              dedup: bool = True) -> tuple[Plan, list[dict]]:
    """Decide each row against what the store holds. Returns the plan and the rows it left
    unchanged that are stored duplicates (``reexamine`` looks at them again once every row whose
    change they depend on is known)."""
    scanned = sorted(scanned, key=lambda r: r["row"])
    assign_ids(scanned, cfg)
    if dedup:
        mark_content_duplicates(scanned)
    seen: dict[str, dict] = {}
    rows, rejects, unchanged, partial = [], [], set(), set()
    for r in scanned:
        first = seen.get(r["id"])
        if first is not None:   # a repeated id: keep the first, record the rest under a derived id
            n = sum(1 for k in seen if k.startswith(r["id"] + "~")) + 2
            same = first["sha_sample"] == r["sha_sample"]
            r.update(id=f"{r['id']}~{n}", reject_stage="ingest",
                     reject_reason="duplicate" if same else "duplicate_id",
                     reject_detail=first["id"] if same else f"id {first['id']} repeated in the input")
        seen[r["id"]] = r
        r["fp_all"] = fps["all"]
        if r["reject_reason"]:
            old = lineage.rejects.get(r["id"])
            if old and old["sha_sample"] == r["sha_sample"] and old["fp_all"] == fps["all"] \
                    and old["reason"] == r["reject_reason"] and r["id"] not in lineage.features:
                unchanged.add(r["id"])
            else:
                rejects.append(r)
            continue
        redo = _redo(r, lineage, fps)
        if not redo:
            unchanged.add(r["id"])
            continue
        changed = set(MODALITIES) if redo == "full" else redo
        if redo != "full":
            partial.add(r["id"])
        # redo: modalities whose features are computed now; keep: taken from the stored row (those
        # it has: an absent modality's columns are the same computed or kept, and a row keeping
        # nothing is not read back from the store at commit).
        stored = lineage.features.get(r["id"]) or {}
        r["redo"] = ",".join(m for m in MODALITIES if m in changed and r.get(f"sha_{m}"))
        r["keep"] = ",".join(m for m in MODALITIES if m not in changed and stored.get(f"sha_{m}"))
        rows.append(r)
    input_ids = [r["id"] for r in scanned]
    live = set(input_ids)
    removed = (set(lineage.features) | set(lineage.rejects)) - live
    # A stored duplicate is looked at again when its kept row changes, is rejected now or disappears.
    candidates = [r for r in scanned if r["id"] in unchanged and _stored_duplicate(r["id"], lineage)]
    for r in candidates:
        r["kept_id"] = lineage.rejects[r["id"]]["detail"]
    return Plan(rows, rejects, unchanged, removed, partial, input_ids), candidates


def _stored_duplicate(rid: str, lineage: Lineage) -> bool:
    old = lineage.rejects.get(rid)
    return bool(old) and old["reason"] == "duplicate"


def reexamine(plan: Plan, candidates: list[dict], redone: Callable[[str], bool]) -> list[dict]:
    """Stored duplicates whose kept row is processed, rejected or removed by this run go back into
    the plan (in input order). Returns them."""
    back = []
    for r in candidates:
        if not redone(r.pop("kept_id")):
            continue
        plan.unchanged.discard(r["id"])
        if r["reject_reason"]:
            plan.rejects.append(r)
        else:
            r["redo"] = ",".join(m for m in MODALITIES if r.get(f"sha_{m}"))
            r["keep"] = ""
            plan.rows.append(r)
        back.append(r)
    return back


def _redo(r: dict, lineage: Lineage, fps: dict[str, str]) -> str | set[str]:
    """'full', a set of modalities to recompute, or an empty set when nothing changed."""
    rid = r["id"]
    if rid in lineage.features and rid in lineage.rejects:   # left by an interrupted run
        return "full"
    if rid in lineage.rejects:
        old = lineage.rejects[rid]
        same = old["sha_sample"] == r["sha_sample"] and old["fp_all"] == fps["all"]
        return set() if same else "full"
    old = lineage.features.get(rid)
    if old is None or old["fp_sample"] != fps["sample"] or old["label"] != r["label"] or old["split"] != r["split"]:
        return "full"
    # A row without the modality is rewritten too when its stages change (its zeros take the new
    # width); a stored row from before the modality existed (fingerprint null) is not.
    return {m for m in MODALITIES if (old.get(f"sha_{m}") or "") != (r.get(f"sha_{m}") or "")
            or old.get(f"fp_{m}") not in (None, fps[m])}
