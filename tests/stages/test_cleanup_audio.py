"""cleanup.audio: decoding, resampling, trimming, silence, duration bounds, normalisation, FLAC out."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import soundfile as sf

from stages.base import Reject
from stages.cleanup import audio as audio_mod
from stages.cleanup.audio import AudioCleaner, rms_dbfs
from stages.registry import STAGES
from tests.stages.helpers import make_batch, reason_of


def speech(sr: int, seconds: float = 1.5, pad: float = 0.5, level: float = 0.3, seed: int = 0) -> np.ndarray:
    """Speech-like audio: syllable-rate bursts of a harmonic tone plus breath noise, silence padded."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(sr * seconds)) / sr
    envelope = np.clip(np.sin(2 * np.pi * 4 * t), 0, None) ** 0.5
    voice = sum(np.sin(2 * np.pi * f0 * t) / k for k, f0 in enumerate((180, 360, 540, 720), start=1))
    burst = level * envelope * (voice / 2 + 0.1 * rng.standard_normal(t.size))
    silence = np.zeros(int(sr * pad))
    return np.concatenate([silence, burst, silence]).astype(np.float32)


def encode(wave: np.ndarray, sr: int, fmt: str = "WAV", subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave, sr, format=fmt, subtype=subtype)
    return buf.getvalue()



@pytest.fixture(scope="module")
def cleaner() -> AudioCleaner:
    return AudioCleaner()


def test_registered():
    assert STAGES["cleanup.audio"] is AudioCleaner


@pytest.mark.parametrize(("fmt", "subtype", "sr"), [
    ("WAV", "PCM_16", 44_100), ("WAV", "FLOAT", 48_000), ("FLAC", None, 16_000),
    ("OGG", "VORBIS", 22_050), ("MP3", "MPEG_LAYER_III", 22_050),
])
def test_decodes_resamples_and_writes_flac(cleaner, fmt, subtype, sr):
    out = cleaner.clean(encode(speech(sr), sr, fmt, subtype))
    info = sf.info(io.BytesIO(out.value))
    assert (info.format, info.samplerate, info.channels) == ("FLAC", 16_000, 1)
    assert out.meta["src_sample_rate"] == sr and out.meta["sample_rate"] == 16_000
    assert out.meta["duration_s"] == pytest.approx(1.5, abs=0.2)      # padding trimmed
    assert out.meta["trimmed_s"] > 0.7


def test_configured_rate_and_flac_round_trip():
    c = AudioCleaner({"sample_rate": 8000, "normalize": "none", "trim_top_db": None})
    wave = speech(8000, pad=0.0)
    out = c.clean(encode(wave, 8000, "FLAC"))
    back, sr = sf.read(io.BytesIO(out.value), dtype="float32")
    assert sr == 8000 and back.shape == wave.shape
    assert np.abs(back - wave).max() < 1e-3                        # 16-bit FLAC: lossless up to quantisation
    assert c.clean(out.value).value == out.value                   # cleaning cleaned audio changes nothing


def test_resampled_tone_keeps_its_pitch():
    sr = 44_100
    t = np.arange(sr) / sr
    tone = (0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
    out = AudioCleaner({"trim_top_db": None}).clean(encode(tone, sr))
    back, rate = sf.read(io.BytesIO(out.value))
    spectrum = np.abs(np.fft.rfft(back))
    assert rate == 16_000 and len(back) == 16_000
    assert np.fft.rfftfreq(len(back), 1 / rate)[spectrum.argmax()] == pytest.approx(1000, abs=2)


def test_stereo_is_mixed_to_mono(cleaner):
    left = speech(16_000)
    out = cleaner.clean(encode(np.stack([left, left], axis=1), 16_000))
    assert sf.info(io.BytesIO(out.value)).channels == 1 and out.meta["src_channels"] == 2


def test_silent_and_near_silent(cleaner):
    rng = np.random.default_rng(0)
    assert reason_of(cleaner, encode(np.zeros(32_000, np.float32), 16_000)) == "audio_silent"
    hiss = (1e-4 * rng.standard_normal(32_000)).astype(np.float32)
    assert reason_of(cleaner, encode(hiss, 16_000)) == "audio_silent"
    assert reason_of(cleaner, encode(speech(16_000, level=1e-4), 16_000)) == "audio_silent"


def test_too_short_after_trimming(cleaner):
    assert reason_of(cleaner, encode(speech(16_000, seconds=0.2, pad=1.0), 16_000)) == "audio_too_short"
    assert AudioCleaner({"min_duration_s": 0.1}).clean(encode(speech(16_000, seconds=0.2), 16_000))


def test_too_long_is_rejected_from_the_header_without_decoding(monkeypatch, cleaner):
    def no_decode(*args, **kwargs):
        raise AssertionError("decoded samples of an over-long file")

    data = encode(speech(8000, seconds=61, pad=0), 8000)
    monkeypatch.setattr(audio_mod.sf, "read", no_decode)
    assert reason_of(cleaner, data) == "audio_too_long"
    assert reason_of(AudioCleaner({"max_duration_s": 1.0}), encode(speech(8000, seconds=2), 8000)) == "audio_too_long"


def test_zero_length_garbage_truncated_and_nan(cleaner):
    flac = encode(speech(16_000), 16_000, "FLAC")
    assert reason_of(cleaner, b"") == "audio_corrupt"
    assert reason_of(cleaner, None) == "audio_corrupt"
    assert reason_of(cleaner, np.random.default_rng(2).bytes(8000)) == "audio_corrupt"
    assert reason_of(cleaner, flac[: len(flac) // 2]) == "audio_corrupt"
    assert reason_of(cleaner, flac[:30]) == "audio_corrupt"
    assert reason_of(cleaner, encode(np.zeros(0, np.float32), 16_000)) == "audio_corrupt"
    nan = speech(16_000)
    nan[100] = np.nan
    assert reason_of(cleaner, encode(nan, 16_000, "WAV", "FLOAT")) == "audio_corrupt"
    huge = speech(16_000)
    huge[100] = 1e30                                   # a flipped exponent bit in float data
    assert reason_of(cleaner, encode(huge, 16_000, "WAV", "FLOAT")) == "audio_corrupt"


def test_raw_size_cap():
    data = encode(speech(16_000), 16_000)
    assert reason_of(AudioCleaner({"max_raw_bytes": len(data) - 1}), data) == "audio_too_large_bytes"


def test_detail_has_no_object_address(cleaner):
    with pytest.raises(Reject) as info:
        cleaner.clean(b"RIFF" + bytes(100))
    assert "0x" not in info.value.detail


def test_peak_and_rms_normalisation():
    data = encode(speech(16_000, level=0.05), 16_000)
    peak = sf.read(io.BytesIO(AudioCleaner({"normalize": "peak", "peak_dbfs": -1.0}).clean(data).value))[0]
    assert 20 * np.log10(np.abs(peak).max()) == pytest.approx(-1.0, abs=0.1)
    rms = sf.read(io.BytesIO(AudioCleaner({"normalize": "rms", "rms_dbfs": -20.0}).clean(data).value))[0]
    assert rms_dbfs(rms) == pytest.approx(-20.0, abs=0.5)
    assert np.abs(rms).max() <= 10 ** (-1.0 / 20) + 1e-3           # the peak ceiling holds
    loud = AudioCleaner({"normalize": "rms", "rms_dbfs": -3.0}).clean(data).value
    assert np.abs(sf.read(io.BytesIO(loud))[0]).max() <= 10 ** (-1.0 / 20) + 1e-3


def test_process_batch(cleaner):
    values = [encode(speech(22_050), 22_050), b"", None, encode(np.zeros(16_000, np.float32), 16_000)]
    out = cleaner(make_batch(audio=values))
    assert sf.info(io.BytesIO(out["audio"][0])).format == "FLAC"
    meta = json.loads(out["meta"][0])
    assert meta["audio_sample_rate"] == 16_000 and meta["audio_src_sample_rate"] == 22_050
    assert [out["reject_reason"][i] for i in range(4)] == ["", "audio_corrupt", "", "audio_silent"]
