"""The local engine's in-memory cap is a byte budget over the rows' width: a table of few but wide
rows (a long stored sequence on a temporal branch) is refused, in one line, where its row count
alone would pass; the same rows read pooled fit."""
from __future__ import annotations

import pytest

from core.config import ConfigError
from tests.training.conftest import make_features, small_config, write_store
from tests.training.sequences import with_audio_sequences
from training.stream import open_snapshot, summarize
from training.train import local_data, local_row_bytes, train

FRAMES, DIM = 64, 32   # a sequence of 2048 floats per row, against 6 for the pooled audio vector


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> str:
    table = with_audio_sequences(make_features(n=120, aug_copies=0), frames=FRAMES, dim=DIM)
    return write_store(tmp_path_factory.mktemp("wide"), table)


def test_row_width_counts_the_packed_sequence():
    assert local_row_bytes({"image": 8, "text": 12}) == 4 * (9 + 13) + 8
    assert local_row_bytes({"audio": FRAMES * DIM + 1}) == 4 * (FRAMES * DIM + 2) + 8


def test_wide_rows_fail_the_byte_budget_that_pooled_rows_pass(wide, monkeypatch):
    cfg = small_config(epochs=1, branches={"audio": "gru"})
    snapshot = open_snapshot(wide)
    pooled = summarize(snapshot, ["image", "text", "audio"])
    temporal = summarize(snapshot, ["image", "text", "audio"], branches=cfg.training.branches)
    rows = pooled.n_train + pooled.n_val
    assert temporal.dims["audio"] == FRAMES * DIM + 1 and rows < 200   # the old 200 000-row cap passes them
    budget = rows * local_row_bytes(pooled.dims) * 4                   # pooled rows fit four times over
    monkeypatch.setattr("training.train.LOCAL_MAX_BYTES", budget)
    assert len(local_data(pooled, cfg.training).train["label_idx"]) == pooled.n_train
    with pytest.raises(ConfigError) as err:
        local_data(temporal, cfg.training)
    message = str(err.value)
    assert "\n" not in message and message.startswith("training.engine=local holds the train and val splits in memory")
    assert f"({rows} rows x {local_row_bytes(temporal.dims) / 1024:.1f} KiB = " in message
    assert message.endswith("use training.engine=ray, which streams them")
    with pytest.raises(ConfigError, match=r"= [\d.]+ KiB, at most [\d.]+ KiB\); use training\.engine=ray"):   # via train
        train(cfg, wide, name="too-wide")


def test_align_uses_the_same_budget(wide, monkeypatch):
    from training.align import align

    monkeypatch.setattr("training.train.LOCAL_MAX_BYTES", 1024)
    pairs = r"holds the train and val pairs in memory \(\d+ rows x 124 bytes = [\d.]+ KiB, at most 1\.0 KiB\)"
    with pytest.raises(ConfigError, match=pairs):
        align(small_config(epochs=1), wide)
