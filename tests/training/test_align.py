"""``mmpipe align``: contrastive projection heads over stored features. Synthetic data where every
modality carries its class and a per-sample signal: after alignment, cross-modal retrieval finds the
sample's own other modality and its class far above chance, and far above the same search through
untrained heads."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from core.config import Config, ConfigError
from core.schema import FEATURES_SCHEMA
from tests.training.conftest import write_store
from training.align import AlignSpec, PairRows, align, embed_rows, load_aligner, retrieval_metrics

DIMS = {"image": 24, "text": 32, "audio": 16}
CLASSES = ["c0", "c1", "c2", "c3"]


def paired_features(n: int = 600, seed: int = 0) -> pa.Table:
    """Modality m of sample i: its class centre + a projection of the sample's own latent + noise,
    each modality in its own space (random centres and projections); 15 % of modalities missing."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    latent = rng.normal(size=(n, 6))
    split = rng.choice(["train", "val", "test"], n, p=[0.6, 0.15, 0.25])
    has = rng.random((n, 3)) >= 0.15
    has[has.sum(axis=1) == 0, 0] = True
    cols = {"id": pa.array([f"s{i:05d}" for i in range(n)]), "label": pa.array([CLASSES[k] for k in y]),
            "split": pa.array(split.tolist()), "aug": pa.array(np.zeros(n, np.int32))}
    for j, (m, d) in enumerate(DIMS.items()):
        centres, proj = rng.normal(size=(4, d)) * 1.5, rng.normal(size=(6, d))
        e = centres[y] + latent @ proj + rng.normal(0, 0.5, (n, d))
        e = (e * rng.uniform(0.1, 10)).astype(np.float32) * has[:, j : j + 1]   # each modality its own scale
        cols[f"has_{m}"] = pa.array(has[:, j])
        cols[f"{m}_emb"] = pa.array(list(e), pa.list_(pa.float32()))
    for f in FEATURES_SCHEMA:
        if f.name not in cols:
            cols[f.name] = pa.nulls(n, f.type)
    return pa.table(cols, schema=FEATURES_SCHEMA)


def align_config(**align) -> Config:
    return Config.model_validate({"training": {"engine": "local", "num_workers": 2, "cpus_per_worker": 0.5},
                                  "align": {"epochs": 25, "batch_size": 64, "dim": 32, "hidden": 64, "patience": 6,
                                            **align}})


@pytest.fixture(scope="module")
def aligned(tmp_path_factory):
    store = write_store(tmp_path_factory.mktemp("align"), paired_features())
    return store, align(align_config(), store)


def test_alignment_makes_cross_modal_retrieval_work(aligned):
    store, result = aligned
    pairs = result.metrics["retrieval"]
    assert set(pairs) == {f"{a}->{b}" for a in DIMS for b in DIMS}
    for name, p in pairs.items():
        a, b = name.split("->")
        assert p["label_precision@1"] > (0.8 if a != b else 0.6) > 2 * p["label_chance@1"], (name, p)
        if a != b:
            chance = 1 / p["candidates"]
            assert p["recall@10"] > 0.3 and p["recall@1"] > 20 * chance and p["median_rank"] < p["candidates"] / 10, (name, p)
            assert p["recall@1"] <= p["recall@5"] <= p["recall@10"]
    for f in ("align.pt", "metrics.json", "recall.png"):
        assert (result.model_dir / f).stat().st_size > 0
    saved = json.loads((result.model_dir / "metrics.json").read_text())
    assert saved["eval_split"] == "test" and saved["best_epoch"] >= 0 and saved["history"]


def test_untrained_heads_do_not_retrieve(aligned):
    """The same search through randomly initialised heads: cross-modal results are near chance."""
    store, result = aligned
    trained, saved = load_aligner(result.model_dir)
    untrained = AlignSpec(**saved["spec"]).build().eval()
    from training.stream import open_snapshot

    rows = PairRows("test", trained.spec.dims, CLASSES)
    snap = open_snapshot(store)
    for model, better in ((trained, True), (untrained, False)):
        p = retrieval_metrics(embed_rows(model, rows.stream(snap), 5000), "image", "text")
        assert (p["recall@10"] > 0.3) is better and (p["label_precision@1"] > 0.8) is better, p


def test_align_needs_two_modalities_together(tmp_path):
    table = paired_features(60)
    only_image = table.set_column(table.schema.get_field_index("has_text"), "has_text", pa.array([False] * 60)) \
                      .set_column(table.schema.get_field_index("has_audio"), "has_audio", pa.array([False] * 60))
    store = write_store(tmp_path, only_image)
    with pytest.raises(ConfigError, match="at least two of image, text"):
        align(align_config(), store, modalities=["image", "text"])
    with pytest.raises(ConfigError, match="two modalities or more"):
        align(align_config(), store, modalities=["image"])
    with pytest.raises(ConfigError, match="no alignment model"):
        load_aligner(tmp_path / "models" / "nothing")

