"""augment.copies and the modality augmenters over whole batches: expansion, determinism,
lineage and replay."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from stages.augment import copy_seed, replay
from stages.augment.audio import AudioAugmenter
from stages.augment.copies import AugmentCopies
from stages.augment.image import ImageAugmenter
from stages.augment.text import TextAugmenter, tokenize
from stages.base import StageContext, object_column
from stages.media import decode_image, encode_flac, encode_image
from stages.registry import STAGES

TEXT = "The quick brown fox jumped over the lazy dog while the happy children watched from the old bridge."
ALWAYS = {  # every op fires, so any two different draws give different outputs
    "image": {"resized_crop": {"p": 1.0}, "rotate": {"p": 1.0}, "color_jitter": {"p": 1.0},
              "gaussian_noise": {"p": 1.0}, "hflip": {"p": 1.0}, "gaussian_blur": {"p": 1.0}},
    "text": {"synonym": {"p": 1.0}, "insert": {"p": 1.0}, "swap": {"p": 1.0}, "delete": {"p": 1.0, "p_word": 0.2}},
    "audio": {"shift": {"p": 1.0}, "gain": {"p": 1.0}, "noise": {"p": 1.0}, "stretch": {"p": 1.0}, "pitch": {"p": 1.0}},
}
AUGMENTERS = {"image": ImageAugmenter, "text": TextAugmenter, "audio": AudioAugmenter}


def media() -> dict[str, object]:
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    sr = 8000
    t = np.arange(sr) / sr
    wave = (0.4 * np.sin(2 * np.pi * 330 * t) * np.hanning(sr)).astype(np.float32)
    return {"image": encode_image(pixels, "png"), "text": TEXT, "audio": encode_flac(wave, sr)}


def make_batch(splits: list[str], rejected: tuple[int, ...] = ()) -> dict[str, np.ndarray]:
    n, m = len(splits), media()
    col = lambda v: object_column([v] * n)  # noqa: E731
    batch = {
        "id": object_column([f"row{i}" for i in range(n)]), "split": object_column(splits),
        "label": col("cat"), "aug": np.zeros(n, dtype=np.int32), "aug_params": col("{}"),
        "redo": col("image,text,audio"), "meta": col("{}"),
        "reject_stage": col(""), "reject_reason": col(""), "reject_detail": col(""),
        **{k: col(v) for k, v in m.items()},
    }
    for i in rejected:
        batch["reject_stage"][i], batch["reject_reason"][i] = "cleanup.text", "too_short"
    return batch


@pytest.fixture(scope="module")
def stages_always():
    ctx = StageContext(seed=3)
    return [AUGMENTERS[m](ALWAYS[m], ctx) for m in ("image", "text", "audio")]


def run_chain(batch, stages, copies=2, seed=3):
    out = AugmentCopies({"copies": copies}, StageContext(seed=seed))(batch)
    for stage in stages:
        out = stage(out)
    return out


# -- copies -----------------------------------------------------------------------------------
def test_copies_expand_only_live_train_originals():
    batch = make_batch(["train", "val", "train", "test", "train"], rejected=(2,))
    batch["aug"][4] = 1  # an existing copy is never copied again
    out = AugmentCopies({"copies": 3})(batch)

    assert list(out["id"]) == ["row0"] * 4 + ["row1", "row2", "row3", "row4"]
    assert list(out["aug"]) == [0, 1, 2, 3, 0, 0, 0, 1]
    assert out["aug"].dtype == np.int32
    assert out["reject_reason"][5] == "too_short"           # rejected row passes through
    for name in batch:                                      # every column copied
        if name != "aug":
            assert all(out[name][k] == batch[name][0] for k in range(4)), name


def test_zero_copies_leave_batch_alone():
    batch = make_batch(["train", "train"])
    assert AugmentCopies({})(batch) is batch


# -- modality stages --------------------------------------------------------------------------
def test_originals_and_eval_rows_untouched(stages_always):
    batch = make_batch(["train", "val", "test"])
    m = media()
    out = run_chain(batch, stages_always)
    assert len(out["id"]) == 5
    for i in np.flatnonzero(out["aug"] == 0):
        assert out["aug_params"][i] == "{}"
        assert all(out[k][i] == m[k] for k in m)
    assert set(out["split"][out["aug"] > 0]) == {"train"}
    for i in np.flatnonzero(out["aug"] > 0):
        assert all(out[k][i] != m[k] for k in m)


def test_same_seed_gives_identical_bytes(stages_always):
    a = run_chain(make_batch(["train", "train"]), stages_always)
    b = run_chain(make_batch(["train", "train"]), [type(s)(ALWAYS[s.modality], StageContext(seed=3))
                                                   for s in stages_always])
    for name in ("image", "text", "audio", "aug_params"):
        assert list(a[name]) == list(b[name]), name


def test_copy_index_row_and_seed_change_the_output(stages_always):
    out = run_chain(make_batch(["train", "train"]), stages_always)
    other_seed = run_chain(make_batch(["train", "train"]),
                           [type(s)(ALWAYS[s.modality], StageContext(seed=4)) for s in stages_always])
    for name in ("image", "text", "audio"):
        copies = [out[name][i] for i in np.flatnonzero(out["aug"] > 0)]
        assert len(set(copies)) == len(copies), f"{name}: copies of rows/indices collide"
        assert out[name][1] != other_seed[name][1], name
    assert copy_seed(0, "a", 1, "image") != copy_seed(0, "a", 2, "image")
    assert copy_seed(0, "a", 1, "image") != copy_seed(0, "a", 1, "audio")
    assert copy_seed(0, "a", 1, "image") == 5597618747905350699  # stable across processes/versions


def test_lineage_replays_byte_identical():
    m = media()
    ctx = StageContext(seed=11)
    chain = [cls({}, ctx) for cls in AUGMENTERS.values()]   # default policies: some ops fire, some not
    out = run_chain(make_batch(["train"] * 3), chain, copies=4, seed=11)
    fired = {k: 0 for k in m}
    for i in np.flatnonzero(out["aug"] > 0):
        lineage = json.loads(out["aug_params"][i])
        assert set(lineage) == set(m)
        for name, ops in lineage.items():
            fired[name] += len(ops)
            assert all(isinstance(rec["op"], str) for rec in ops)
            assert replay(name, m[name], ops) == out[name][i]
    assert all(fired.values()), fired


def test_rejected_rows_and_absent_media_are_skipped(stages_always):
    batch = AugmentCopies({"copies": 1})(make_batch(["train", "train", "train"]))
    batch["redo"][1] = "text"         # row0's copy: still augmented (a copy is rebuilt whole)
    batch["image"][3] = None          # row1's copy has no image
    batch["reject_stage"][5], batch["reject_reason"][5] = "dedup", "duplicate"   # row2's copy
    out = stages_always[0](batch)
    assert out["image"][1] != media()["image"] and "image" in json.loads(out["aug_params"][1])
    assert out["image"][3] is None and out["aug_params"][3] == "{}"
    assert out["image"][5] == media()["image"] and out["aug_params"][5] == "{}"


def test_unknown_op_is_a_config_error():
    with pytest.raises(ValidationError, match="unknown ops"):
        ImageAugmenter({"ops": ["hflip", "vflip"]})
    with pytest.raises(ValidationError):
        AudioAugmenter({"gain": {"p": 1.5}})


def test_stages_are_registered():
    assert {"augment.copies", "augment.image", "augment.text", "augment.audio"} <= set(STAGES)


def test_a_driver_validating_augment_params_imports_neither_torch_nor_nltk():
    """``resolve_stages`` imports every stage's module to validate its params, and runs none of them.
    torch and torchvision (~3 s) and NLTK and scikit-learn (~1.5 s) come in with the first
    augmented row instead: a no-op rerun of an augmenting config paid ~4.5 s for them."""
    demo = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
    code = ("import sys; from core.config import load_config; from pipeline.plan import resolve_stages; "
            f"names = [s.name for s in resolve_stages(load_config({str(demo)!r}), 1)]; "
            "print([m for m in ('torch', 'torchvision', 'nltk', 'sklearn') if m in sys.modules]); print(names)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded, names = out.stdout.strip().splitlines()
    assert loaded == "[]", out.stderr
    assert "'augment.image'" in names and "'augment.text'" in names


# -- WordNet ----------------------------------------------------------------------------------
def test_without_wordnet_other_text_ops_still_run(tmp_path, caplog):
    params = {**ALWAYS["text"], "wordnet_dir": str(tmp_path)}
    with caplog.at_level(logging.WARNING, logger="stages.augment.wordnet"):
        stage = TextAugmenter(params)
        TextAugmenter(params)
    assert sum("WordNet not found" in r.message for r in caplog.records) == 1   # warned once
    out = run_chain(make_batch(["train"]), [stage], copies=1)
    ops = json.loads(out["aug_params"][1])["text"]
    assert ops[0] == {"op": "synonym", "skipped": f"wordnet not found at {tmp_path}"}
    assert [o["op"] for o in ops[1:]] == ["insert", "swap", "delete"]
    assert ops[1]["source"] == "copy"
    assert out["text"][1] != TEXT
    assert replay("text", TEXT, ops) == out["text"][1]


def test_synonyms_come_from_debian_wordnet():
    stage = TextAugmenter({"ops": ["synonym"], "synonym": {"p": 1.0, "alpha": 0.5}})
    if stage.wordnet is None:
        pytest.skip("Debian wordnet-base is not installed at /usr/share/wordnet")
    assert "speedy" in stage.synonyms("quick")
    new, ops = stage.augment(TEXT, np.random.default_rng(0))
    (rec,) = ops
    tokens = tokenize(TEXT)
    for i, word in rec["replacements"]:
        assert word.lower() in stage.synonyms(tokens[i])
    assert new != TEXT


def test_image_stage_keeps_format_and_shape(stages_always):
    batch = AugmentCopies({"copies": 1})(make_batch(["train"]))
    batch["image"][:] = encode_image(np.full((30, 20, 3), 120, np.uint8), "jpg")
    out = stages_always[0](batch)
    assert out["image"][1][:3] == b"\xff\xd8\xff"
    assert decode_image(out["image"][1]).shape == (30, 20, 3)
