"""Stored sequences added to a synthetic features table (``tests.training.conftest.make_features``)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa


def with_audio_sequences(table: pa.Table, frames: int = 4, dim: int = 3, seed: int = 1) -> pa.Table:
    """``audio_seq`` / ``audio_seq_len`` as an encoder's ``sequence`` option stores them: frames near
    the row's audio embedding, zero-padded after 2 to ``frames`` real ones; null on rows without audio."""
    rng = np.random.default_rng(seed)
    has = table["has_audio"].to_numpy(zero_copy_only=False)
    emb = np.array(table["audio_emb"].to_pylist(), np.float32)
    base = np.zeros((len(has), dim), np.float32)
    base[:, : min(dim, emb.shape[1])] = emb[:, :dim]
    lengths = rng.integers(2, frames + 1, len(has))
    seq = base[:, None, :] + rng.normal(0, 0.5, (len(has), frames, dim)).astype(np.float32)
    seq[np.arange(frames)[None, :] >= lengths[:, None]] = 0
    seqs = pa.array([s.tolist() if h else None for s, h in zip(seq, has)], pa.list_(pa.list_(pa.float32())))
    lens = pa.array([int(n) if h else None for n, h in zip(lengths, has)], pa.int32())
    table = table.set_column(table.schema.get_field_index("audio_seq"), "audio_seq", seqs)
    return table.set_column(table.schema.get_field_index("audio_seq_len"), "audio_seq_len", lens)
