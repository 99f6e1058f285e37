"""Plan a run: resolve every stage (validating its parameters) and decide, per input id, what
must be (re)computed given what the store already holds (incremental reprocessing)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import Config, ConfigError, Resources, StageConfig
from stages.base import MODALITIES
from stages.registry import get_stage


@dataclass(frozen=True)
class StageSpec:
    name: str
    params: dict[str, Any]
    resources: Resources
    fingerprint: str
    modality: str | None


def _h(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _spec(name: str, params: dict, resources: Resources) -> StageSpec:
    try:
        cls = get_stage(name)
        fp = cls.fingerprint(params)
    except KeyError as exc:
        raise ConfigError(str(exc.args[0])) from None
    except ValueError as exc:   # pydantic ValidationError is a ValueError
        first = str(exc).splitlines()
        detail = " ".join(first[1:3]).strip() if len(first) > 1 else first[0]
        raise ConfigError(f"bad parameters for stage {name}: {detail}") from None
    return StageSpec(name, params, resources, fp, cls.modality)


def build_stages(cfg: Config, num_cpus: int = 1) -> list[StageSpec]:
    """Every stage of the processing pass, in order, parameters validated (fail before data moves).
    Imports only the stage modules the config names (``get_stage``): a run that uses no torch
    stage never imports torch."""
    ex = cfg.execution
    default = Resources(num_cpus=1, num_gpus=0, concurrency=ex.concurrency or max(1, num_cpus), batch_size=ex.batch_size)
    specs = [_spec("ingest", {}, default)]

    def add(name: str, sc: StageConfig | None) -> None:
        sc = sc or StageConfig()
        if sc.enabled:
            specs.append(_spec(name, sc.params, sc.resources or default))

    st = cfg.stages
    for section in st.cleanup:
        if section not in MODALITIES:
            raise ConfigError(f"unknown config key 'stages.cleanup.{section}'")
    for section in st.augment:
        if section not in (*MODALITIES, "copies"):
            raise ConfigError(f"unknown config key 'stages.augment.{section}'")
    for m in ("text", "image", "audio"):
        add(f"cleanup.{m}", st.cleanup.get(m))
    add("dedup", st.dedup)
    copies = st.augment.get("copies")
    if copies is not None and copies.enabled and copies.params.get("copies", 0) > 0:
        add("augment.copies", copies)
        for m in MODALITIES:
            if m in st.augment:
                add(f"augment.{m}", st.augment[m])
    for m, enc in st.features.items():
        if m not in MODALITIES:
            raise ConfigError(f"unknown config key 'stages.features.{m}'")
        if not enc.enabled:
            continue
        from stages.features import plan_feature_stages

        try:
            planned = plan_feature_stages(m, enc.encoder, enc.params)
        except KeyError as exc:
            raise ConfigError(str(exc.args[0])) from None
        for k, (name, params) in enumerate(planned):
            last = k == len(planned) - 1
            specs.append(_spec(name, params, (enc.resources or default) if last else default))
    return specs


def fingerprints(cfg: Config, specs: list[StageSpec]) -> dict[str, str]:
    """Lineage fingerprints: ``sample`` (stages touching every modality, split, policy, seed) and
    one per modality (its cleanup, augmentation and feature stages)."""
    shared = [s.fingerprint for s in specs if s.modality is None]
    fps = {"sample": _h(shared, cfg.split.model_dump(), cfg.bad_modality, cfg.seed)}
    for m in MODALITIES:
        fps[m] = _h([s.fingerprint for s in specs if s.modality == m])
    fps["all"] = _h(fps["sample"], *(fps[m] for m in MODALITIES))
    return fps


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


def _assign_ids(scanned: list[dict], cfg: Config) -> None:
    for r in scanned:
        r["sha_sample"] = _h(r["sha_image"] or r.get("image_ref") or "", r["sha_text"],
                             r["sha_audio"] or r.get("audio_ref") or "", r["label"])
        if not r["id"]:
            r["id"] = r["sha_sample"]
        if not r["split"]:
            r["split"] = stable_split(r["id"], cfg.split.train, cfg.split.val)
        elif r["split"] not in ("train", "val", "test"):
            r.update(reject_stage="ingest", reject_reason="bad_split",
                     reject_detail=f"split must be train, val or test, not {r['split']!r}")


def make_plan(scanned: list[dict], lineage: Lineage, fps: dict[str, str], cfg: Config, dedup: bool = True) -> Plan:
    scanned = sorted(scanned, key=lambda r: r["row"])
    _assign_ids(scanned, cfg)
    seen: dict[str, dict] = {}
    by_content: dict[str, str] = {}   # exact whole-sample duplicates: the first in input order is kept
    rows, rejects, unchanged, partial = [], [], set(), set()
    for r in scanned:
        kept = by_content.setdefault(r["sha_sample"], r["id"]) if dedup and not r["reject_reason"] else r["id"]
        if kept != r["id"]:
            r.update(reject_stage="ingest", reject_reason="duplicate", reject_detail=kept)
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
        # redo: modalities whose features are computed now; keep: taken from the stored row.
        r["redo"] = ",".join(m for m in MODALITIES if m in changed and r[f"sha_{m}"])
        r["keep"] = ",".join(m for m in MODALITIES if m not in changed)
        rows.append(r)
    input_ids = [r["id"] for r in scanned]
    live = set(input_ids)
    removed = (set(lineage.features) | set(lineage.rejects)) - live
    # A duplicate whose kept row changes or disappears must be looked at again.
    redo_ids = {r["id"] for r in rows} | removed
    for r in scanned:
        if r["id"] in unchanged:
            old = lineage.rejects.get(r["id"])
            if old and old["reason"] == "duplicate" and old["detail"] in redo_ids:
                unchanged.discard(r["id"])
                if r["reject_reason"]:
                    rejects.append(r)
                else:
                    r["redo"] = ",".join(m for m in MODALITIES if r[f"sha_{m}"])
                    r["keep"] = ""
                    rows.append(r)
    return Plan(rows, rejects, unchanged, removed, partial, input_ids)


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
    return {m for m in MODALITIES if old[f"sha_{m}"] != r[f"sha_{m}"] or old[f"fp_{m}"] != fps[m]}
