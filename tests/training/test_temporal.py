"""Sequence features and temporal branches: a class that lives only in the order of two sounds is
invisible to pooled statistics and plain to a GRU over the stored log-mel frames."""
from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.dataset as pads
import pytest
import soundfile as sf
import torch

from pipeline.cli import predict_records
from pipeline.runner import run
from tests.pipeline.helpers import config
from training.data import pack_sequences
from training.fusion import BRANCHES, build_fusion
from training.train import train

SR = 16000
TONES = (500.0, 1500.0)


def two_sounds(first: int, rng: np.random.Generator) -> bytes:
    """Half a second of one tone, then half a second of the other: the same sounds in either order."""
    t = np.arange(SR // 2) / SR
    a, b = (np.sin(2 * np.pi * f * rng.uniform(0.97, 1.03) * t) for f in (TONES[first], TONES[1 - first]))
    wave = 0.3 * np.concatenate([a, b]) + rng.normal(0, 0.02, SR)
    buf = io.BytesIO()
    sf.write(buf, wave.astype(np.float32), SR, format="WAV")
    return buf.getvalue()


@pytest.fixture(scope="module")
def ordered_store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("order")
    (folder / "media").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for k in range(120):
        label = ("low-high", "high-low")[k % 2]
        (folder / "media" / f"{k}.wav").write_bytes(two_sounds(k % 2, rng))
        rows.append({"id": f"a{k}", "label": label, "audio": f"media/{k}.wav",
                     "split": "test" if k % 5 == 0 else "val" if k % 5 == 1 else "train"})
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    store = folder / "store"
    cfg = config(folder, manifest, store, {
        "execution": {"local_max_rows": 1000},
        "stages": {"cleanup": {"audio": {"params": {"min_duration_s": 0.2, "trim_top_db": None}}},
                   "features": {"audio": {"encoder": "logmel", "params": {"sequence": 8}}}},
        "training": {"engine": "local", "epochs": 40, "patience": 40, "lr": 3e-3, "modality_dropout": 0.0}})
    run(cfg, log=lambda s: None)
    return cfg, store


def test_the_sequence_is_stored_next_to_the_pooled_vector(ordered_store):
    cfg, store = ordered_store
    table = pads.dataset(list((store / "features").glob("*.parquet"))).to_table(
        columns=["audio_emb", "audio_seq", "audio_seq_len", "image_seq"])
    seq = np.array(table["audio_seq"].to_pylist())
    assert seq.shape == (120, 8, 64 + 20) and set(table["audio_seq_len"].to_pylist()) == {8}
    assert len(table["audio_emb"][0]) == 180 and table["image_seq"].null_count == 120   # no image sequences
    packed = pack_sequences(table["audio_seq"], table["audio_seq_len"], 8, 84)
    np.testing.assert_array_equal(packed[:, :-1].reshape(-1, 8, 84), seq)
    assert (packed[:, -1] == 8).all()


def test_a_gru_over_the_frames_hears_the_order_that_pooling_loses(ordered_store):
    cfg, store = ordered_store
    pooled = train(cfg, str(store), fusion="concat", name="pooled").metrics
    gru_cfg = cfg.model_copy(update={"training": cfg.training.model_copy(update={"branches": {"audio": "gru"}})})
    temporal = train(gru_cfg, str(store), fusion="concat", name="gru").metrics
    assert temporal["accuracy"] >= 0.9 and pooled["accuracy"] <= 0.75, (temporal["accuracy"], pooled["accuracy"])
    # predict feeds a new record's frames to the branch as training did
    queries = store.parent / "queries.jsonl"
    rng = np.random.default_rng(9)
    for k in range(6):
        (store.parent / "media" / f"q{k}.wav").write_bytes(two_sounds(k % 2, rng))
    queries.write_text("".join(json.dumps({"id": f"q{k}", "audio": f"media/q{k}.wav"}) + "\n" for k in range(6)))
    out = store.parent / "pred.jsonl"
    query_cfg = gru_cfg.model_copy(update={"source": gru_cfg.source.model_copy(update={"path": str(queries)})})
    predict_records(query_cfg, store / "models" / "gru", out)
    preds = [json.loads(line)["prediction"] for line in out.read_text().splitlines()]
    assert preds == ["low-high", "high-low"] * 3


def test_compare_sets_each_temporal_branch_against_its_pooled_vector(ordered_store):
    from training.compare import compare, comparison_runs

    cfg, store = ordered_store
    tc = cfg.training.model_copy(update={"branches": {"audio": "gru"}, "fusion": "concat", "epochs": 2})
    gru_cfg = cfg.model_copy(update={"training": tc})
    runs = comparison_runs(gru_cfg, str(store), ["concat", "late"])
    assert [(r.fusion, r.modalities, r.label) for r in runs] == [
        ("concat", ["audio"], "audio:gru"), ("late", ["audio"], "audio:gru"), ("concat", ["audio"], "pooled")]
    path = compare(gru_cfg, str(store), ["late"])
    rows = {r["name"]: r for r in json.loads((path.parent / "compare.json").read_text())}
    assert set(rows) == {"compare-late-audio-audio.gru", "compare-concat-audio"}
    assert rows["compare-late-audio-audio.gru"]["branches"] == {"audio": "gru"} and rows["compare-concat-audio"]["branches"] == {}
    saved = json.loads((path.parent / "compare-late-audio-audio.gru" / "metrics.json").read_text())
    assert saved["training"]["branches"] == {"audio": "gru"}
    text = path.read_text()
    assert "| late | audio | audio:gru | " in text and "| concat | audio | pooled | " in text


@pytest.mark.parametrize("fusion", ["concat", "late", "attention", "gated", "transformer"])
@pytest.mark.parametrize("kind", BRANCHES)
def test_every_branch_works_with_every_fusion_and_masks_by_length(fusion, kind):
    torch.manual_seed(0)
    model = build_fusion(fusion, {"audio": 6 * 4 + 1, "text": 5}, 3, branches={"audio": kind},
                         sequences={"audio": [6, 4]}, hidden=16).eval()
    x = torch.randn(2, 25)
    x[:, -1] = 3                                     # three real frames
    padded = x.clone()
    padded[:, 12:24] = torch.randn(2, 12)            # other values in the padding frames
    embs = {"text": torch.randn(2, 5)}
    mask = torch.ones(2, 2)
    out = model({**embs, "audio": x}, mask)
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    torch.testing.assert_close(model({**embs, "audio": padded}, mask), out)   # padding is never read


def test_hashed_text_sequences_keep_word_order_with_a_fixed_vector_per_word():
    from stages.features.text import HashedTextEncoder

    enc = HashedTextEncoder({"sequence": 4, "token_dim": 16})
    seq, lengths = enc.sequences(["dog bites man", "man bites dog", ""])
    assert seq.shape == (3, 4, 16) and lengths.tolist() == [3, 3, 0]
    np.testing.assert_array_equal(seq[0, 0], seq[1, 2])                  # "dog": one vector wherever it stands
    assert not np.array_equal(seq[0], seq[1]) and not seq[2].any()       # the order is kept; padding is zeros
    assert np.allclose(np.abs(seq[0, :3]), 0.25)                         # +-1 / sqrt(16)
