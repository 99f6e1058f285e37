"""Fuzz: randomly damaged crawl data through the three cleaners, on batches built as the runner does.

Every row must end either cleaned (a valid value of the output kind) or rejected with a documented
reason code; none may end as ``<modality>_error`` (an exception our cleaners did not anticipate).
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from core.schema import MEDIA_COLUMNS
from stages.base import ModalityCleaner, StageContext
from stages.cleanup.audio import AudioCleaner
from stages.cleanup.image import ImageCleaner
from stages.cleanup.text import TextCleaner
from stages.media import decode_image
from tests.stages.helpers import make_batch

N_PER_MODALITY = 300
Rng = np.random.Generator


# -- valid seeds ------------------------------------------------------------------------------
def image_seeds() -> list[bytes]:
    rng = np.random.default_rng(0)
    pixels = np.full((72, 96, 3), 180, np.uint8)
    for _ in range(12):
        y, x = rng.integers(0, 60), rng.integers(0, 80)
        pixels[y:y + 12, x:x + 16] = rng.integers(0, 255, 3)
    seeds = []
    for fmt, mode in (("PNG", "RGB"), ("JPEG", "RGB"), ("GIF", "P"), ("WEBP", "RGB"), ("BMP", "RGB"),
                      ("TIFF", "RGB"), ("PNG", "RGBA"), ("JPEG", "CMYK"), ("PNG", "L")):
        buf = io.BytesIO()
        Image.fromarray(pixels).convert(mode).save(buf, fmt)
        seeds.append(buf.getvalue())
    return seeds


def audio_seeds() -> list[bytes]:
    sr = 16_000
    t = np.arange(sr) / sr
    wave = (0.4 * np.sin(2 * np.pi * 220 * t) * (np.sin(2 * np.pi * 3 * t) > 0)).astype(np.float32)
    seeds = []
    for fmt, subtype, rate in (("WAV", "PCM_16", sr), ("WAV", "FLOAT", sr), ("FLAC", None, sr),
                               ("OGG", "VORBIS", sr), ("MP3", "MPEG_LAYER_III", sr), ("WAV", "PCM_U8", 8000)):
        buf = io.BytesIO()
        sf.write(buf, wave if rate == sr else wave[::2], rate, format=fmt, subtype=subtype)
        seeds.append(buf.getvalue())
    return seeds


TEXT_SEEDS = [
    "<!DOCTYPE html><html><head><title>T</title><style>p{}</style><script>var s='x';</script></head><body>"
    "<nav><a href='/'>Home</a></nav><article><h1>Heading</h1><p>First paragraph with enough words to keep.</p>"
    "<p>Second paragraph &amp; entities &#8212; here.</p></article><footer>foot</footer></body></html>",
    "<p>Fragment <b>bold</b> <i>italic</i> &lt;escaped&gt;</p><ul><li>one</li><li>two</li></ul>",
    "Plain text, with punctuation! And a second sentence? Yes.",
    "Ünïcödé ｆｕｌｌｗｉｄｔｈ ﬁ ligature \u200b zero width \u202e bidi \U0001F600 emoji",
]


# -- mutations ----------------------------------------------------------------------------------
def _truncate(data: bytes, rng: Rng, seeds: list[bytes]) -> bytes:
    return data[: int(rng.integers(0, len(data)))]


def _flip_bytes(data: bytes, rng: Rng, seeds: list[bytes]) -> bytes:
    out = bytearray(data)
    for pos in rng.integers(0, len(out), int(rng.integers(1, 24))):
        out[pos] = int(rng.integers(0, 256))
    return bytes(out)


def _flip_header(data: bytes, rng: Rng, seeds: list[bytes]) -> bytes:
    out = bytearray(data)
    for pos in rng.integers(0, min(len(out), 64), int(rng.integers(1, 4))):
        out[pos] ^= 1 << int(rng.integers(0, 8))
    return bytes(out)


def _noise(data: bytes, rng: Rng, seeds: list[bytes]) -> bytes:
    return rng.bytes(int(rng.integers(0, 4096)))


def _splice(data: bytes, rng: Rng, seeds: list[bytes]) -> bytes:
    other = seeds[int(rng.integers(0, len(seeds)))]
    cut = int(rng.integers(1, min(len(other), 256)))
    return other[:cut] + data[cut:]


def _zero_block(data: bytes, rng: Rng, seeds: list[bytes]) -> bytes:
    start = int(rng.integers(0, len(data)))
    size = int(rng.integers(1, 512))
    return data[:start] + bytes(min(size, len(data) - start)) + data[start + size:]


def _repeat_chunk(data: bytes, rng: Rng, seeds: list[bytes]) -> bytes:
    start = int(rng.integers(0, len(data)))
    chunk = data[start:start + int(rng.integers(1, 2048))]
    return data[:start] + chunk * int(rng.integers(2, 5)) + data[start:]


BYTE_MUTATIONS: list[Callable[[bytes, Rng, list[bytes]], bytes]] = [
    _truncate, _flip_bytes, _flip_header, _noise, _splice, _zero_block, _repeat_chunk,
]


def corrupt_bytes(seeds: list[bytes], n: int, seed: int, foreign: list[bytes]) -> list[bytes]:
    """n damaged files: one to three mutations each; some spliced with another modality's header."""
    rng = np.random.default_rng(seed)
    out = [b"", *seeds]
    while len(out) < n:
        data = seeds[int(rng.integers(0, len(seeds)))]
        pool = foreign if rng.random() < 0.15 else seeds
        for _ in range(int(rng.integers(1, 4))):
            data = BYTE_MUTATIONS[int(rng.integers(0, len(BYTE_MUTATIONS)))](data, rng, pool) if data else data
        out.append(data)
    return out


def corrupt_texts(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    specials = ["\x00", "\ud800", "\udfff", "\ufeff", "\u202e", "\u0301", "<", ">", "&", "&#", "&#x110000;",
                "<!--", "-->", "<script>", "</script>", "<![CDATA[", "<?xml version='1.0' encoding='utf-8'?>",
                "<html>", "<body>", "\r", "\x0b", "\u2028", "&nbsp;", "<div>" * 300, "</p>" * 50]
    out = ["", " ", *TEXT_SEEDS]
    while len(out) < n:
        text = TEXT_SEEDS[int(rng.integers(0, len(TEXT_SEEDS)))]
        for _ in range(int(rng.integers(1, 5))):
            kind = int(rng.integers(0, 4))
            pos = int(rng.integers(0, len(text) + 1))
            if kind == 0:
                text = text[:pos]
            elif kind == 1:
                text = text[:pos] + specials[int(rng.integers(0, len(specials)))] + text[pos:]
            elif kind == 2:
                text = text[:pos] + rng.bytes(int(rng.integers(1, 300))).decode("latin-1") + text[pos:]
            else:
                text = text[:pos] + "".join(chr(int(c)) for c in rng.integers(0, 0x110000, 40)) + text[pos:]
        out.append(text)
    return out


# -- checks -------------------------------------------------------------------------------------
def valid_image(value: object, params) -> bool:
    pixels = decode_image(value)
    return pixels.ndim == 3 and pixels.shape[2] == 3 and max(pixels.shape[:2]) <= params.max_side


def valid_audio(value: object, params) -> bool:
    info = sf.info(io.BytesIO(value))
    return info.format == "FLAC" and info.samplerate == params.sample_rate and info.channels == 1


def valid_text(value: object, params) -> bool:
    return isinstance(value, str) and value.strip() == value and value != "" and "\x00" not in value


VALID: dict[str, Callable[[object, object], bool]] = {"image": valid_image, "audio": valid_audio, "text": valid_text}


def assert_accounted(batch: dict, cleaner: ModalityCleaner, originals: list) -> None:
    m = cleaner.modality
    for i, original in enumerate(originals):
        reason = batch["reject_reason"][i]
        if reason:
            assert reason in cleaner.reasons, f"row {i}: undocumented reason {reason!r}: {batch['reject_detail'][i]}"
            assert batch["reject_stage"][i] == cleaner.name and batch["reject_detail"][i]
        else:
            assert VALID[m](batch[m][i], cleaner.params), f"row {i}: accepted an invalid {m}"


@pytest.fixture(scope="module")
def seeds() -> dict[str, list[bytes]]:
    return {"image": image_seeds(), "audio": audio_seeds()}


# max_pixels is lowered only so that a flipped size field cannot make one row decode 40 MP here.
@pytest.mark.parametrize(("cleaner_cls", "params"), [(ImageCleaner, {"max_pixels": 2_000_000}), (AudioCleaner, {})])
def test_corrupted_media_end_cleaned_or_rejected(seeds, cleaner_cls, params):
    cleaner = cleaner_cls(params)
    m = cleaner.modality
    foreign = [s for k, v in seeds.items() if k != m for s in v]
    values = corrupt_bytes(seeds[m], N_PER_MODALITY, seed={"image": 101, "audio": 202}[m], foreign=foreign)
    batch = cleaner(make_batch(**{m: list(values)}))
    assert_accounted(batch, cleaner, values)
    reasons = set(batch["reject_reason"]) - {""}
    assert f"{m}_corrupt" in reasons and (batch["reject_reason"] == "").sum() >= len(seeds[m])


def test_corrupted_text_ends_cleaned_or_rejected():
    cleaner = TextCleaner({"min_chars": 1})
    values = corrupt_texts(N_PER_MODALITY, seed=7)
    batch = cleaner(make_batch(text=list(values)))
    assert_accounted(batch, cleaner, values)
    assert "text_empty" in set(batch["reject_reason"])


def test_all_three_cleaners_on_one_batch_under_drop_modality(seeds):
    rng = np.random.default_rng(11)
    n = 120
    images = corrupt_bytes(seeds["image"], n, seed=1, foreign=seeds["audio"])
    audios = corrupt_bytes(seeds["audio"], n, seed=2, foreign=seeds["image"])
    texts = corrupt_texts(n, seed=3)
    media = {m: [v if rng.random() < 0.8 else None for v in values]
             for m, values in (("image", images), ("audio", audios), ("text", texts))}
    for i in range(n):   # ingest never emits a row without any modality
        if all(media[m][i] is None for m in media):
            media["text"][i] = texts[i]
    context = StageContext(bad_modality="drop_modality")
    cleaners = [TextCleaner({}, context), ImageCleaner({"max_pixels": 2_000_000}, context), AudioCleaner({}, context)]
    batch = make_batch(**{m: list(v) for m, v in media.items()})
    for cleaner in cleaners:   # the runner's order
        batch = cleaner(batch)
    known = set().union(*(c.reasons for c in cleaners))
    for i in range(n):
        dropped = json.loads(batch["dropped"][i])
        assert set(dropped.values()) <= known, dropped
        if batch["reject_reason"][i]:
            assert batch["reject_reason"][i] == "no_modality"
            continue
        for cleaner in cleaners:
            m = cleaner.modality
            if media[m][i] is None or m in dropped:
                assert batch[m][i] is None
            else:
                assert VALID[m](batch[m][i], cleaner.params)
        assert any(batch[m][i] is not None for m in MEDIA_COLUMNS)


def test_every_reason_is_documented():
    doc = (Path(__file__).resolve().parents[2] / "docs" / "reject_reasons_cleanup.md").read_text()
    for cls in (TextCleaner, ImageCleaner, AudioCleaner):
        for reason in cls.reasons:
            assert f"| `{reason}` | `{cls.name}` |" in doc, reason
