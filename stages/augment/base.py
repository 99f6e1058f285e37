"""Shared machinery of the modality augmenters: seeding, op registry, lineage and replay.

An op is a pair of functions. ``draw`` looks at the current value and the random generator and
returns the op's parameters as a JSON-ready dict (or None when the op has nothing to do);
``apply`` turns a value and such a dict into the new value without any randomness. The stage
interleaves the two; ``replay`` runs only ``apply`` over the recorded dicts, which is why a
replay is byte-identical to the stage's output.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import numpy as np
from pydantic import Field

from stages.base import Batch, Stage, StageParams, live_rows

AUG, AUG_PARAMS = "aug", "aug_params"


class OpPolicy(StageParams):
    """Every op's policy has a firing probability; subclasses add magnitudes and ranges."""

    p: float = Field(0.5, ge=0.0, le=1.0)


Draw = Callable[[np.random.Generator, Any, Any, Any], "dict[str, Any] | None"]
Apply = Callable[[Any, dict[str, Any]], Any]


@dataclass(frozen=True)
class Op:
    """One augmentation op: ``draw(rng, policy, value, stage) -> params | None`` and
    ``apply(value, params) -> value`` (deterministic)."""

    draw: Draw
    apply: Apply


def register_op(table: dict[str, Op], name: str, draw: Draw) -> Callable[[Apply], Apply]:
    """Decorator: register the decorated ``apply`` under ``name`` in ``table`` with its ``draw``."""

    def add(apply: Apply) -> Apply:
        if name in table:
            raise ValueError(f"augmentation op {name!r} registered twice")
        table[name] = Op(draw=draw, apply=apply)
        return apply

    return add


def copy_seed(seed: int, row_id: str, aug: int, modality: str) -> int:
    """A stable 64-bit seed for one copy of one row and one modality (sha256, not ``hash()``)."""
    key = json.dumps([int(seed), str(row_id), int(aug), modality]).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little")


def check_ops(ops: list[str], known: dict[str, Op]) -> list[str]:
    """Params validator: every listed op must exist (a typo fails when the plan is built)."""
    unknown = [o for o in ops if o not in known]
    if unknown:
        raise ValueError(f"unknown ops {unknown}; known: {sorted(known)}")
    return ops


def uniform(rng: np.random.Generator, bounds: tuple[float, float], digits: int = 4) -> float:
    """A uniform draw rounded for readable lineage; ``apply`` uses the rounded value."""
    return round(float(rng.uniform(bounds[0], bounds[1])), digits)


def noise_seed(rng: np.random.Generator) -> int:
    """A seed for an op whose draw is a whole noise field (recorded instead of the field)."""
    return int(rng.integers(0, 2**31 - 1))


class ModalityAugmenter(Stage):
    """Role base for ``augment.<modality>``: set ``OPS`` and fill in ``decode`` / ``encode``.

    ``Params`` must carry ``ops: list[str]`` (the order ops are tried in) and one ``OpPolicy``
    field per op, named like the op. Only live rows with ``aug > 0`` that carry the modality change.
    """

    OPS: ClassVar[dict[str, Op]] = {}
    inference = False
    requires = ("augment.copies",)   # only copies are augmented
    runs_after = ("cleanup.", "dedup", "augment.copies")
    reads = ("{modality}", AUG, AUG_PARAMS)
    writes = ("{modality}", AUG_PARAMS)
    reasons = {"augment_failed": "an augmentation op failed on a copy (the copy is dropped, not the original)"}

    @classmethod
    def decode(cls, data: Any, params: Any) -> Any:
        raise NotImplementedError

    @classmethod
    def encode(cls, value: Any, original: Any, params: Any) -> Any:
        raise NotImplementedError

    @classmethod
    def apply_ops(cls, data: Any, ops: list[dict[str, Any]], params: Any) -> Any:
        """Apply recorded ops to an original value (the replay path)."""
        applied = [rec for rec in ops if "skipped" not in rec]
        if not applied:
            return data  # nothing drawn: keep the original bytes (no lossy re-encode)
        value = cls.decode(data, params)
        for rec in applied:
            value = cls.OPS[rec["op"]].apply(value, rec)
        return cls.encode(value, data, params)

    def augment(self, data: Any, rng: np.random.Generator) -> tuple[Any, list[dict[str, Any]]]:
        """Draw and apply the policy to one value; returns (new value, lineage records)."""
        value = self.decode(data, self.params)
        records: list[dict[str, Any]] = []
        for name in self.params.ops:
            policy = getattr(self.params, name)
            if rng.random() >= policy.p:  # drawn for every op, so one op's p never shifts another's draws
                continue
            rec = self.OPS[name].draw(rng, policy, value, self)
            if rec is None:
                continue
            rec = {"op": name, **rec}
            if "skipped" not in rec:
                value = self.OPS[name].apply(value, rec)
            records.append(rec)
        if all("skipped" in rec for rec in records):
            return data, records
        return self.encode(value, data, self.params), records

    def process(self, batch: Batch) -> Batch:
        m = self.modality
        assert m is not None
        values, aug = batch[m], batch[AUG]
        # every present modality of a processed copy, not only those in ``redo``: a copy is
        # rebuilt from its original whenever the row is reprocessed, so all its media must be
        for i in live_rows(batch, m, redo_only=False):
            k = int(aug[i])
            if k <= 0:
                continue  # originals are never augmented
            rng = np.random.default_rng(copy_seed(self.context.seed, batch["id"][i], k, m))
            self.stats.bytes_in += len(values[i]) if isinstance(values[i], (bytes, str)) else 0
            try:
                new, records = self.augment(values[i], rng)
            except Exception as exc:  # one bad value must not sink the job: record it
                self.reject(batch, i, "augment_failed", f"{m}: {type(exc).__name__}: {exc}")
                continue
            values[i] = new
            write_lineage(batch, i, m, records)
        return batch


def write_lineage(batch: Batch, i: int, modality: str, records: list[dict[str, Any]]) -> None:
    """Store the drawn ops under the modality's key of the row's ``aug_params`` JSON."""
    lineage = json.loads(batch[AUG_PARAMS][i] or "{}")
    lineage[modality] = records
    batch[AUG_PARAMS][i] = json.dumps(lineage, sort_keys=True)


def replay(modality: str, value: Any, ops: list[dict[str, Any]], params: dict[str, Any] | None = None) -> Any:
    """Reproduce an augmented value from the original and its recorded ops.

    ``params`` are the stage's params when they affect encoding (``jpeg_quality``, ``device``)."""
    import importlib

    from stages.registry import STAGES

    importlib.import_module(f"stages.augment.{modality}")  # only this module, not every stage's
    cls = STAGES[f"augment.{modality}"]
    assert issubclass(cls, ModalityAugmenter)
    p = cls.Params.model_validate(params or {})
    return cls.apply_ops(value, ops, p)
