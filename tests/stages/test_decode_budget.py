"""The per-sample decode budget: a sample whose cleanup runs past ``decode_timeout_s`` is rejected
(``decode_timeout``) and the worker goes on with the next one; decoded sizes are capped before
decoding (pixels, samples) so a small file cannot balloon into gigabytes."""
from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from stages import base
from stages.base import StageContext
from stages.cleanup.audio import AudioCleaner
from stages.cleanup.image import ImageCleaner
from stages.cleanup.text import TextCleaner
from tests.stages.helpers import Clock, make_batch, reason_of


def noise_png(side: int = 800) -> bytes:
    """Incompressible pixels: a PNG of many 64 KB reads for PIL."""
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def tone_wav(seconds: float, sr: int = 48_000, channels: int = 1) -> bytes:
    t = np.arange(int(seconds * sr)) / sr
    wave = 0.5 * np.sin(2 * np.pi * 440 * t)
    buf = io.BytesIO()
    sf.write(buf, np.repeat(wave[:, None], channels, axis=1), sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def rejects(batch: dict) -> dict[str, tuple[str, str]]:
    return {batch["id"][i]: (batch["reject_reason"][i], batch["reject_detail"][i])
            for i in range(len(batch["id"])) if batch["reject_reason"][i]}


def test_a_slow_image_is_stopped_on_a_read_and_the_next_one_is_cleaned(monkeypatch):
    cleaner = ImageCleaner({}, StageContext(decode_timeout_s=10))
    png = noise_png()
    reads = []
    original = base.BudgetedBytes.read
    monkeypatch.setattr(base.BudgetedBytes, "read", lambda self, size=-1: reads.append(size) or original(self, size))
    clock = Clock(step=1.0)   # one second per deadline check: the 11th check is past the budget
    monkeypatch.setattr(base.time, "monotonic", clock)
    batch = cleaner(make_batch(image=[png]))
    reason, detail = rejects(batch)["row0"]
    assert reason == "decode_timeout" and "decode_timeout_s 10" in detail
    assert len(png) > 20 * 65536 and len(reads) < 12   # stopped mid-file, not after decoding it all

    monkeypatch.setattr(base.time, "monotonic", Clock(step=1e-4))
    batch = cleaner(make_batch(image=[png, png]))
    assert rejects(batch) == {} and all(isinstance(v, bytes) for v in batch["image"])


def test_a_long_clip_is_stopped_between_reads(monkeypatch):
    cleaner = AudioCleaner({"max_duration_s": 120}, StageContext(decode_timeout_s=5))
    clip = tone_wav(30.0)            # 1.44 M frames: six reads of 2**18
    clock = Clock(step=1.0)
    monkeypatch.setattr(base.time, "monotonic", clock)
    batch = cleaner(make_batch(audio=[clip]))
    assert rejects(batch)["row0"][0] == "decode_timeout"
    assert clock.readings <= 7       # the start, then one check per read until past the budget


def test_a_sample_that_finishes_late_is_rejected_too(monkeypatch):
    """Text cleaning has no reads to check between: the budget is checked when it returns."""
    monkeypatch.setattr(base.time, "monotonic", Clock(step=100.0))
    batch = TextCleaner({}, StageContext(decode_timeout_s=30))(make_batch(text=["<p>a fine sentence about pines</p>"]))
    assert rejects(batch)["row0"][0] == "decode_timeout"


def test_decoded_size_is_capped_before_decoding():
    clip = tone_wav(2.0, sr=48_000, channels=4)       # 384 000 samples
    cleaner = AudioCleaner({"max_samples": 200_000})
    assert reason_of(cleaner, clip) == "audio_too_large_samples"
    assert reason_of(ImageCleaner({"max_pixels": 100_000}), noise_png(400)) == "image_too_large_pixels"
    assert AudioCleaner({"max_samples": 400_000}).clean(clip).meta["src_channels"] == 4


def test_a_header_that_understates_the_length_is_capped_while_reading(monkeypatch):
    """Streams of unknown length (and lying headers) are bounded by the read itself."""
    clip = tone_wav(2.0, sr=48_000, channels=2)
    real_info = sf.info

    def unknown_length(f):
        info = real_info(f)
        info.frames = 0
        return info

    monkeypatch.setattr(sf, "info", unknown_length)
    assert reason_of(AudioCleaner({"max_samples": 100_000}), clip) == "audio_too_large_samples"


def test_the_budget_comes_from_the_config(tmp_path):
    from core.config import load_config
    from pipeline.orchestration import Pipeline

    cfg = load_config(None, ["execution.decode_timeout_s=2.5", f"store={tmp_path / 'store'}"])
    assert Pipeline.build(cfg, "run-x").context.decode_timeout_s == 2.5
    with pytest.raises(Exception, match="decode_timeout_s"):
        load_config(None, ["execution.decode_timeout_s=0"])
