"""Media decoded once per process (stages/media.py): what the memo hands out is exactly what
decoding the bytes gives, it is bounded and emptied per block, and cleanup.image stores an
unchanged input as it came."""
import io

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from pipeline.demo import _audio, _image
from stages import media
from stages.base import rows_to_batch
from stages.cleanup.audio import AudioCleaner
from stages.cleanup.image import ImageCleaner
from stages.features.audio import AudioFeatures
from stages.features.image import ImageFeatures
from stages.media import decode_audio, decode_image, encode_flac, encode_image, forget_decoded, recall


@pytest.fixture(autouse=True)
def empty_memo():
    forget_decoded()
    yield
    forget_decoded()


def _jpeg(pixels: np.ndarray, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90, **save)
    return buf.getvalue()


def test_flac_bytes_match_libsndfile_and_the_known_samples_match_a_decode():
    rng = np.random.default_rng(0)
    for scale in (0.05, 0.5, 3.0):   # quiet, loud, clipping
        for dtype in (np.float32, np.float64):
            wave = (rng.normal(0, scale, 8000)).astype(dtype)
            wave[:3] = [1.0, -1.0, 0.5 / 32768]   # the edges and a rounding tie
            data = encode_flac(wave, 16000)
            ref = io.BytesIO()
            sf.write(ref, np.clip(wave, -1.0, 1.0), 16000, format="FLAC", subtype="PCM_16")
            assert data == ref.getvalue()   # the same file as before: stored shards do not change
            known, sr = recall(data)
            forget_decoded()
            decoded, sr2 = decode_audio(data)
            assert sr == sr2 == 16000 and known.dtype == decoded.dtype == np.float32
            assert np.array_equal(known, decoded)


def test_decoded_media_come_back_by_identity_read_only_and_bounded(monkeypatch):
    pixels = np.random.default_rng(1).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    png = encode_image(pixels, "png")
    assert np.array_equal(recall(png), pixels)   # lossless: known without decoding
    assert recall(png[:1] + png[1:]) is None     # an equal but other object is not the same bytes
    assert recall(encode_image(pixels, "jpg")) is None   # lossy: only a decode knows the pixels
    first = decode_image(png)
    assert decode_image(png) is first and not first.flags.writeable
    with pytest.raises(ValueError):
        first[0, 0, 0] = 1
    monkeypatch.setattr(media, "MEMO_BYTES", 3 * pixels.nbytes)
    encoded = [encode_image(np.roll(pixels, k), "png") for k in range(5)]
    assert [recall(e) is not None for e in encoded] == [False, False, True, True, True]   # oldest out
    assert media._memo_size == 3 * pixels.nbytes
    forget_decoded()
    assert recall(encoded[-1]) is None and media._memo_size == 0


def test_cleanup_stores_an_unchanged_image_as_it_came():
    rng = np.random.default_rng(2)
    plain = _image("forest", rng)   # 96x96 RGB JPEG, no metadata
    out = ImageCleaner({"max_side": 256}).clean(plain)
    assert out.value is not None and out.value == plain and out.meta["stored"] == "input"
    assert np.array_equal(recall(out.value), np.asarray(Image.open(io.BytesIO(plain)).convert("RGB")))

    pixels = np.asarray(Image.open(io.BytesIO(plain)))
    exif = Image.Exif()
    exif[0x010F] = "camera maker"   # anything in EXIF (a location, a serial) is stripped by re-encoding
    changed = {
        "with EXIF": (_jpeg(pixels, exif=exif.tobytes()), {}),
        "resized": (plain, {"max_side": 64}),
        "another format": (plain, {"format": "png"}),
        "re-encoding asked for": (plain, {"keep_unchanged": False}),
        "greyscale": (_jpeg(pixels[..., 0]), {}),
    }
    for why, (data, params) in changed.items():
        out = ImageCleaner({"max_side": 256, **params}).clean(data)
        assert out.value != data and out.meta["stored"] == "encoded", why


def test_a_fused_chain_computes_the_same_features_as_separate_stages():
    """cleanup then features in one process (the memo serves decoded media) gives the features of
    the stored bytes decoded afresh (features in another actor, or a later run)."""
    rng = np.random.default_rng(3)
    rows = [{"id": f"r{k}", "image": _image(label, rng), "audio": _audio(label, rng), "text": None}
            for k, label in enumerate(["forest", "ocean", "city", "desert"] * 3)]
    exif = Image.Exif()
    exif[0x010F] = "camera maker"
    rows[0]["image"] = _jpeg(np.asarray(Image.open(io.BytesIO(rows[0]["image"]))), exif=exif.tobytes())   # re-encoded
    batch = rows_to_batch([{**r, "reject_stage": "", "reject_reason": "", "reject_detail": "", "meta": "",
                            "dropped": "", "redo": "image,audio"} for r in rows])
    cleaners = [ImageCleaner({"max_side": 256}), AudioCleaner({"min_duration_s": 0.3})]
    features = [ImageFeatures({"encoder": "hist"}), AudioFeatures({"encoder": "logmel"})]
    for stage in cleaners:
        batch = stage(batch)
    assert all(recall(v) is not None for v in batch["audio"])
    assert ['"image_stored": "encoded"' in m for m in batch["meta"]] == [True] + [False] * 11
    fused = {k: v.copy() for k, v in batch.items()}
    for stage in features:
        fused = stage(fused)
    forget_decoded()
    fresh = {k: np.array([x[:1] + x[1:] if isinstance(x, bytes) else x for x in v], dtype=v.dtype) for k, v in batch.items()}
    for stage in features:
        fresh = stage(fresh)
    for m in ("image", "audio"):
        assert fused[f"has_{m}"].all()
        assert np.array_equal(fused[f"{m}_emb"], fresh[f"{m}_emb"]), m
