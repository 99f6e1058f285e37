"""``augment.copies``: k copies of every live training original, numbered aug = 1..k."""
from __future__ import annotations

import numpy as np
from pydantic import Field

from stages.augment.base import AUG
from stages.base import REJECT_REASON, Batch, Stage, StageParams, num_rows
from stages.registry import register_stage


@register_stage
class AugmentCopies(Stage):
    """Appends ``copies`` rows after each live ``train`` row with ``aug == 0`` (every column
    copied, id unchanged). Val/test rows, copies and rejected rows pass through. The row count
    changes, so the runner must run this stage with ``udf_modifying_row_count``."""

    name = "augment.copies"
    version = 1
    modality = None

    inference = False
    runs_after = ("cleanup.", "dedup")   # copies of cleaned, deduplicated originals
    reads = ("split", "aug")
    writes = ("aug",)

    class Params(StageParams):
        copies: int = Field(0, ge=0)

    @classmethod
    def active(cls, params: dict) -> bool:
        return cls.Params.model_validate(params).copies > 0

    def process(self, batch: Batch) -> Batch:
        k = self.params.copies
        n = num_rows(batch)
        if k == 0 or n == 0:
            return batch
        eligible = (batch[REJECT_REASON] == "") & (batch["split"] == "train") & (batch[AUG] == 0)
        reps = np.where(eligible, k + 1, 1)
        idx = np.repeat(np.arange(n), reps)
        out = {name: col[idx] for name, col in batch.items()}
        # position of each output row inside its group: 0 for the original, 1..k for its copies
        within = np.arange(len(idx)) - np.repeat(np.cumsum(reps) - reps, reps)
        out[AUG] = np.where(eligible[idx], within, batch[AUG][idx]).astype(batch[AUG].dtype)
        return out
