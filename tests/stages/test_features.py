"""Weight-free encoders, the feature stages and the plan helpers (no model weights needed)."""
from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from stages.base import object_column
from stages.features import ENCODERS, feature_dim, get_encoder, plan_feature_stages
from stages.media import encode_flac, encode_image
from stages.registry import get_stage

SR = 16000


def make_batch(**media: list) -> dict[str, np.ndarray]:
    """A batch as cleanup leaves it: every row live and redoing every modality it carries."""
    n = len(next(iter(media.values())))
    batch = {m: object_column(media.get(m, [None] * n)) for m in ("image", "text", "audio")}
    batch["id"] = np.array([f"r{i}" for i in range(n)], dtype=object)
    batch["redo"] = np.array(["image,text,audio"] * n, dtype=object)
    for col in ("reject_stage", "reject_reason", "reject_detail"):
        batch[col] = np.array([""] * n, dtype=object)
    batch["meta"] = np.array(["{}"] * n, dtype=object)
    return batch


def stripes(colour: tuple[int, int, int], vertical: bool, rng: np.random.Generator, size: int = 48) -> bytes:
    img = np.zeros((size, size, 3), np.uint8)
    period = int(rng.integers(4, 9))
    band = (np.arange(size) // period) % 2 == 0
    if vertical:
        img[:, band] = colour
    else:
        img[band, :] = colour
    noise = rng.integers(-20, 20, img.shape)
    return encode_image(np.clip(img.astype(int) + noise, 0, 255).astype(np.uint8), "png")


def tone(rng: np.random.Generator, seconds: float = 0.5) -> bytes:
    t = np.arange(int(SR * seconds)) / SR
    return encode_flac(0.5 * np.sin(2 * np.pi * rng.uniform(300, 2000) * t).astype(np.float32), SR)


def noise(rng: np.random.Generator, seconds: float = 0.5) -> bytes:
    return encode_flac(rng.uniform(-0.4, 0.4, int(SR * seconds)).astype(np.float32), SR)


TOPICS = {
    "sport": "goal match team player score league coach referee stadium season win".split(),
    "food": "recipe oven flour butter sugar bake dinner spice sauce garlic cook".split(),
}


def sentence(topic: str, rng: np.random.Generator) -> str:
    filler = "the a of and with on today really very".split()
    words = list(rng.choice(TOPICS[topic], 5)) + list(rng.choice(filler, 4))
    return " ".join(rng.permutation(words))


def centroid_accuracy(x: np.ndarray, y: np.ndarray) -> float:
    """Nearest centroid fitted on every other row of each class, scored on the rest."""
    rank = np.array([(y[:i] == y[i]).sum() for i in range(len(y))])
    train = rank % 2 == 0
    classes = np.unique(y)
    centroids = np.stack([x[train & (y == c)].mean(axis=0) for c in classes])
    nearest = np.linalg.norm(x[~train, None, :] - centroids[None], axis=2).argmin(axis=1)
    return float((classes[nearest] == y[~train]).mean())


def encode_all(modality: str, name: str, values: list, **options) -> np.ndarray:
    enc = get_encoder(modality, name)(options)
    return enc.embed(enc.preprocess(values))


def test_registries_and_stages_are_registered():
    assert {"hist", "torchvision", "hf_vision"} <= set(ENCODERS["image"])
    assert {"hashed", "hf_text"} <= set(ENCODERS["text"])
    assert {"logmel", "hf_audio"} <= set(ENCODERS["audio"])
    for m in ("image", "text", "audio"):
        assert get_stage(f"features.{m}").modality == m
        assert get_stage(f"features.{m}.prep").modality == m


@pytest.mark.parametrize("modality,name,options,dim", [
    ("image", "hist", {}, 4 * 9 + 8 * 3 * 3),
    ("image", "hist", {"grid": 3, "orientation_bins": 8, "hsv_bins": [4, 2, 2]}, 9 * 8 + 16),
    ("text", "hashed", {}, 1024),
    ("text", "hashed", {"word_features": 100, "char_features": 0}, 100),
    ("audio", "logmel", {}, 2 * (64 + 20 + 6)),
    ("audio", "logmel", {"n_mels": 32, "n_mfcc": 13}, 2 * (32 + 13 + 6)),
])
def test_weight_free_dims(modality, name, options, dim):
    assert feature_dim(modality, name, options) == dim
    assert get_encoder(modality, name)(options).dim == dim


def test_image_hist_separates_colour_and_orientation():
    rng = np.random.default_rng(0)
    classes = [((200, 30, 30), True), ((30, 30, 200), True), ((200, 30, 30), False)]
    values, labels = [], []
    for k in range(24):
        colour, vertical = classes[k % 3]
        values.append(stripes(colour, vertical, rng))
        labels.append(k % 3)
    x = encode_all("image", "hist", values)
    assert x.dtype == np.float32 and x.shape == (24, feature_dim("image", "hist", {}))
    assert centroid_accuracy(x, np.array(labels)) == 1.0
    np.testing.assert_array_equal(x, encode_all("image", "hist", values))   # deterministic


def test_text_hashed_separates_topics():
    rng = np.random.default_rng(1)
    topics = ["sport", "food"] * 20
    values = [sentence(t, rng) for t in topics]
    x = encode_all("text", "hashed", values)
    assert x.shape == (40, 1024)
    assert centroid_accuracy(x, np.array(topics)) == 1.0
    np.testing.assert_array_equal(x, encode_all("text", "hashed", values))
    np.testing.assert_array_equal(encode_all("text", "hashed", [""]), np.zeros((1, 1024), np.float32))


@pytest.mark.parametrize("params", [{}, {"word_ngrams": (1, 1), "char_ngrams": (3, 5), "lowercase": False},
                                    {"word_ngrams": (2, 3), "word_features": 64, "char_features": 32}])
def test_text_hashed_counts_equal_scikit_learns_hashing_vectorizer(params):
    """The hand-made analyzers + mmh3 give scikit-learn's counts, cell for cell (short words,
    runs of whitespace, accents, CJK, punctuation, repeated words, one-word and empty texts)."""
    from sklearn.feature_extraction.text import HashingVectorizer

    rng = np.random.default_rng(4)
    texts = [sentence(t, rng) for t in ("sport", "food") * 5] + [
        "", "a", "ab", "I  am\t\n a   test", "Café DÉJÀ vu -- naïve!!", "the the the cat", "日本語のテキスト です",
        "x" * 7, "  leading and trailing  ", "e-mail: someone@example.com, 3.14 apples; (ok)"]
    enc = get_encoder("text", "hashed")(params)
    p = enc.params
    for (analyzer, n_features), kind, ngrams in zip(enc.analyzers, ("word", "char_wb"),
                                                   (p.word_ngrams, p.char_ngrams)):
        reference = HashingVectorizer(n_features=n_features, analyzer=kind, ngram_range=ngrams, alternate_sign=False,
                                      norm=None, lowercase=p.lowercase, dtype=np.float32).transform(texts).toarray()
        prepared = [t.lower() for t in texts] if p.lowercase else texts
        np.testing.assert_array_equal(enc.counts(prepared, analyzer, n_features), reference)


def test_text_hashed_encoder_does_not_import_scikit_learn():
    """scikit-learn's import costs every actor ~1.8 s of CPU; the hashed encoder must not pull it in."""
    import subprocess
    import sys

    code = ("import sys; from stages.features import get_encoder; "
            "get_encoder('text', 'hashed')({}).embed(['a small test']); print('sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_audio_logmel_separates_tones_from_noise():
    rng = np.random.default_rng(2)
    labels = np.array([0, 1] * 6)
    values = [tone(rng) if y == 0 else noise(rng) for y in labels]
    values[0] = encode_flac(np.zeros(100, np.float32), 8000)   # very short, other rate: still encodes
    x = encode_all("audio", "logmel", values)
    assert x.shape == (12, 180) and np.isfinite(x).all()
    assert centroid_accuracy(x, labels) == 1.0
    np.testing.assert_array_equal(x, encode_all("audio", "logmel", values))


def test_l2_normalize():
    rng = np.random.default_rng(3)
    x = encode_all("image", "hist", [stripes((90, 200, 10), True, rng) for _ in range(3)], l2_normalize=True)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)


def test_feature_stage_writes_embeddings_only_for_live_rows():
    rng = np.random.default_rng(4)
    images = [stripes((200, 0, 0), True, rng) for _ in range(5)]
    images[1] = None                                     # modality absent
    batch = make_batch(image=images, text=["x"] * 5)
    batch["reject_reason"][2] = "too_small"              # rejected earlier
    batch["redo"][3] = "text"                            # image unchanged: not recomputed
    stage = get_stage("features.image")({"encoder": "hist"})
    out = stage(batch)
    emb, has = out["image_emb"], out["has_image"]
    assert emb.dtype == np.float32 and emb.shape == (5, stage.encoder.dim)
    assert has.tolist() == [True, False, False, False, True]
    assert not emb[~has].any() and (np.abs(emb[has]).sum(axis=1) > 0).all()


def test_row_alone_equals_row_in_batch():
    rng = np.random.default_rng(5)
    texts = [sentence("sport", rng) * (k + 1) for k in range(7)]
    stage = get_stage("features.text")({"encoder": "hashed", "options": {"batch_size": 3}})
    together = stage(make_batch(text=texts))["text_emb"]
    for i, t in enumerate(texts):
        np.testing.assert_array_equal(stage(make_batch(text=[t]))["text_emb"][0], together[i])


def test_prep_then_features_equals_features_alone():
    rng = np.random.default_rng(6)
    clips = [tone(rng), None, noise(rng)]
    params = {"encoder": "logmel", "options": {"n_mels": 32}}
    direct = get_stage("features.audio")(params)(make_batch(audio=clips))
    prepped = get_stage("features.audio.prep")(params)(make_batch(audio=clips))
    assert prepped["audio_prep"][1] is None and isinstance(prepped["audio_prep"][0], np.ndarray)
    split = get_stage("features.audio")(params)(prepped)
    assert "audio_prep" not in split
    np.testing.assert_array_equal(split["audio_emb"], direct["audio_emb"])
    np.testing.assert_array_equal(split["has_audio"], direct["has_audio"])


def test_undecodable_row_is_rejected_and_the_rest_encoded():
    rng = np.random.default_rng(7)
    batch = make_batch(image=[stripes((0, 200, 0), False, rng), b"not an image", stripes((0, 0, 200), True, rng)])
    out = get_stage("features.image")({"encoder": "hist"})(batch)
    assert out["reject_reason"].tolist() == ["", "image_preprocess_error", ""]
    assert out["reject_stage"][1] == "features.image"
    assert out["has_image"].tolist() == [True, False, True]


def test_fingerprint_tracks_encoder_options_but_not_batch_size():
    stage = get_stage("features.text")
    base = stage.fingerprint({"encoder": "hashed"})
    assert stage.fingerprint({"encoder": "hashed", "options": {"batch_size": 7}}) == base
    assert stage.fingerprint({"encoder": "hashed", "options": {"word_features": 256}}) != base
    assert get_stage("features.text.prep").fingerprint({"encoder": "hashed"}) != base
    with pytest.raises(ValidationError):
        stage.fingerprint({"encoder": "hashed", "options": {"no_such_option": 1}})
    with pytest.raises(KeyError, match="unknown text encoder"):
        stage.fingerprint({"encoder": "nope"})


def test_plan_feature_stages():
    assert plan_feature_stages("image", "hist", {"grid": 3}) == [("features.image", {"encoder": "hist", "options": {"grid": 3}})]
    params = {"encoder": "hf_text", "options": {"model": "/models/bert"}}
    assert plan_feature_stages("text", "hf_text", {"model": "/models/bert"}) == [
        ("features.text.prep", params), ("features.text", params)]
    [(name, params)] = plan_feature_stages("audio", "logmel", {"n_mels": "many"})
    with pytest.raises(ValidationError):
        get_stage(name).fingerprint(params)
