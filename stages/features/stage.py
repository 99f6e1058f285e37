"""The feature stages: ``features.<m>.prep`` (CPU preprocessing) and ``features.<m>`` (the model).

``features.<m>`` writes ``<m>_emb`` (n_rows, dim) float32, zeros where the row is not encoded, and
``has_<m>``. When ``<m>_prep`` is in the batch (a ``features.<m>.prep`` actor ran before it), it
encodes those payloads and drops the column; otherwise it preprocesses itself.
"""
from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from pydantic import Field

from stages.base import Batch, Stage, StageContext, StageParams, fingerprint_of, live_rows, num_rows, object_column
from stages.features.base import Encoder, get_encoder


class FeatureParams(StageParams):
    encoder: str
    options: dict[str, Any] = Field(default_factory=dict)   # validated by the encoder's own Params


def prep_column(modality: str) -> str:
    return f"{modality}_prep"


class EncoderStage(Stage):
    """Shared by both feature stages: resolves the encoder and preprocesses rows one failure at a time."""

    Params: ClassVar[type[StageParams]] = FeatureParams
    loads_model: ClassVar[bool] = True    # False: preprocessing only, the model is not loaded
    config_keys = ("encoder",)
    runs_after = ("cleanup.", "dedup", "augment.")   # every copy's features from its final media
    reads = ("{modality}",)
    reasons = {"{modality}_preprocess_error": "the encoder's preprocessing failed on the value"}

    @classmethod
    def from_config(cls, params: dict[str, Any], encoder: str | None = None, **keys: Any) -> dict[str, Any]:
        if not encoder:
            raise ValueError(f"stages.{cls.name} needs an encoder")
        return {"encoder": encoder, "options": dict(params)}

    @classmethod
    def expand(cls, params: dict[str, Any]) -> list[tuple[str, dict[str, Any], bool]]:
        """A pretrained encoder: a CPU ``.prep`` stage, then the model stage with the entry's resources
        (preprocessing overlaps inference on separate actor pools)."""
        pretrained = get_encoder(cls.modality, params["encoder"]).pretrained
        return ([(f"{cls.name}.prep", params, False)] if pretrained else []) + [(cls.name, params, True)]

    def __init__(self, params: StageParams | dict | None = None, context: StageContext | None = None):
        super().__init__(params, context)
        self.encoder: Encoder = get_encoder(self.modality, self.params.encoder)(
            self.params.options, inference=self.loads_model)

    @classmethod
    def fingerprint(cls, params: StageParams | dict | None = None) -> str:
        """Name, version and options of the encoder. Computing it validates the options and checks
        that a pretrained model's files are there (``dim_for``), so a plan fails before data moves."""
        p = params if isinstance(params, cls.Params) else cls.Params.model_validate(params or {})
        enc = get_encoder(cls.modality, p.encoder)
        options = enc.Params.model_validate(p.options)
        enc.dim_for(options)   # raises MissingWeights (a ValueError) naming the path looked at
        return fingerprint_of(cls.name, cls.version, enc.fingerprint_params(options))

    def prepare(self, batch: Batch, rows: list[int]) -> dict[int, Any]:
        """Row index -> payload. A row whose value cannot be preprocessed is rejected, not fatal."""
        values = batch[self.modality]
        try:
            return dict(zip(rows, self.encoder.preprocess([values[i] for i in rows]), strict=True))
        except Exception:  # one bad value fails the whole call: go row by row to find and reject it
            return self._prepare_each(batch, rows)

    def _prepare_each(self, batch: Batch, rows: list[int]) -> dict[int, Any]:
        out: dict[int, Any] = {}
        for i in rows:
            try:
                out[i] = self.encoder.preprocess([batch[self.modality][i]])[0]
            except Exception as exc:  # a decoder error on one row must not sink the job: record it
                self.reject(batch, i, f"{self.modality}_preprocess_error", f"{type(exc).__name__}: {exc}")
        return out


class FeaturePrepStage(EncoderStage):
    """``features.<m>.prep``: runs ``encoder.preprocess`` and stores payloads in ``<m>_prep``."""

    loads_model: ClassVar[bool] = False
    writes = ("{modality}_prep",)

    def process(self, batch: Batch) -> Batch:
        column = object_column([None] * num_rows(batch))
        for i, payload in self.prepare(batch, list(live_rows(batch, self.modality))).items():
            column[i] = payload
        batch[prep_column(self.modality)] = column
        return batch


class FeatureStage(EncoderStage):
    """``features.<m>``: encodes live rows in sub-batches of ``options.batch_size``."""

    writes = ("{modality}_emb", "has_{modality}", "{modality}_seq", "{modality}_seq_len")   # _seq: with ``sequence``

    def process(self, batch: Batch) -> Batch:
        m = self.modality
        n = num_rows(batch)
        rows = [int(i) for i in live_rows(batch, m)]
        stored = batch.pop(prep_column(m), None)
        payloads = {i: stored[i] for i in rows if stored is not None and stored[i] is not None}
        payloads.update(self.prepare(batch, [i for i in rows if i not in payloads]))
        # Similar sizes together: less padding per sub-batch (results do not depend on it).
        order = sorted(payloads, key=lambda i: _size(payloads[i]))
        emb = np.zeros((n, self.encoder.dim), dtype=np.float32)
        has = np.zeros(n, dtype=bool)
        frames = getattr(self.encoder.params, "sequence", 0)
        seq_dim = self.encoder.sequence_dim(self.encoder.params) if frames else 0
        if seq_dim:
            seq, lengths = np.zeros((n, frames, seq_dim), np.float32), np.zeros(n, np.int32)
        step = self.encoder.params.batch_size
        for start in range(0, len(order), step):
            chunk = order[start:start + step]
            prepped = [payloads[i] for i in chunk]
            emb[chunk] = self.encoder.embed(prepped)
            if seq_dim:
                seq[chunk], lengths[chunk] = self.encoder.sequences(prepped)
            has[chunk] = True
        batch[f"{m}_emb"] = emb
        batch[f"has_{m}"] = has
        if seq_dim:
            batch[f"{m}_seq"], batch[f"{m}_seq_len"] = seq, lengths
        return batch


def _size(payload: Any) -> int:
    return int(np.size(payload)) if isinstance(payload, np.ndarray) else len(payload) if hasattr(payload, "__len__") else 0
