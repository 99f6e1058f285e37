"""Batches laid out as the runner builds them, and reject checks, for stage unit tests."""
from __future__ import annotations

import pytest

from core.schema import BATCH_STR_COLUMNS, MEDIA_COLUMNS
from stages.base import ModalityCleaner, Reject, object_column


def make_batch(**media: list) -> dict:
    """A batch laid out as the runner builds it: string columns, JSON columns, redo, media."""
    n = len(next(iter(media.values())))
    batch = {c: object_column([""] * n) for c in BATCH_STR_COLUMNS}
    batch["id"] = object_column([f"row{i}" for i in range(n)])
    batch["meta"] = object_column(["{}"] * n)
    batch["dropped"] = object_column(["{}"] * n)
    batch["redo"] = object_column(["image,text,audio"] * n)
    for m in MEDIA_COLUMNS:
        batch[m] = object_column(media.get(m, [None] * n))
    return batch


def reason_of(cleaner: ModalityCleaner, value: object) -> str:
    """The reason ``cleaner`` rejects ``value`` with; it must be one the cleaner declares."""
    with pytest.raises(Reject) as info:
        cleaner.clean(value)
    assert info.value.reason in cleaner.reasons
    return info.value.reason


class Clock:
    """time.monotonic for ``stages.base``: ``step`` seconds pass on every reading."""

    def __init__(self, step: float):
        self.now, self.step, self.readings = 0.0, step, 0

    def __call__(self) -> float:
        self.now += self.step
        self.readings += 1
        return self.now
