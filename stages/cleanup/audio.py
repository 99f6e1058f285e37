"""``cleanup.audio``: crawled audio bytes -> mono FLAC at one sample rate, trimmed and normalised."""
from __future__ import annotations

import io
import re
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Literal

import numpy as np
import soundfile as sf
import soxr
from pydantic import Field

from stages import dsp
from stages.base import Cleaned, ModalityCleaner, Reject, StageParams, check_deadline
from stages.media import encode_flac
from stages.registry import register_stage

# What libsndfile / soxr raise on damaged or hostile input (LibsndfileError is a RuntimeError).
DECODE_ERRORS = (RuntimeError, ValueError, TypeError, EOFError, OSError)
_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-f]+>")
UNKNOWN_LENGTH = 2**62          # libsndfile reports SF_COUNT_MAX frames for streams of unknown length
READ_FRAMES = 1 << 18               # frames per read: the deadline is checked between reads
PLAUSIBLE_RATES = (1000, 768_000)   # outside: a damaged header, not a recording
MAX_FLOAT_PEAK = 16.0               # float files may clip above 1.0, never by 24 dB: damaged data


class AudioParams(StageParams):
    sample_rate: int = Field(16_000, ge=1000, le=192_000)   # output rate (soxr resampling)
    max_raw_bytes: int = Field(100 * 1024 * 1024, gt=0)     # audio_too_large_bytes, before opening
    min_duration_s: float = Field(0.5, ge=0.0)             # after trimming: audio_too_short
    max_duration_s: float = Field(60.0, gt=0.0)            # header, then after trimming: audio_too_long
    max_channels: int = Field(16, ge=1)
    # Decoded samples (frames x channels) at most: header first, then while reading (headers lie).
    max_samples: int = Field(32_000_000, gt=0)             # audio_too_large_samples (128 MB of float32)
    trim_top_db: float | None = Field(40.0, gt=0.0)        # as librosa.effects.trim (stages/dsp.py); None = keep edges
    silence_dbfs: float = -50.0                            # RMS of the kept clip below this: audio_silent
    normalize: Literal["peak", "rms", "none"] = "peak"
    peak_dbfs: float = Field(-1.0, le=0.0)                 # peak target, and the ceiling for "rms"
    rms_dbfs: float = Field(-20.0, le=0.0)                 # target RMS for "rms" (a loudness proxy)
    resample_quality: Literal["VHQ", "HQ", "MQ", "LQ", "QQ"] = "HQ"


@dataclass
class Decoded:
    wave: np.ndarray          # mono float32
    sample_rate: int
    channels: int
    src_format: str


def db_to_amp(db: float) -> float:
    return float(10.0 ** (db / 20.0))


def rms_dbfs(wave: np.ndarray) -> float:
    """RMS level in dB relative to full scale (-inf for digital silence)."""
    if wave.size == 0:
        return float("-inf")
    rms = float(np.sqrt(np.mean(np.square(wave, dtype=np.float64))))
    return float(20.0 * np.log10(rms)) if rms > 0 else float("-inf")


def _peak(wave: np.ndarray, p: AudioParams) -> np.ndarray:
    peak = float(np.max(np.abs(wave)))
    return wave * (db_to_amp(p.peak_dbfs) / peak) if peak > 0 else wave


def _rms(wave: np.ndarray, p: AudioParams) -> np.ndarray:
    level = rms_dbfs(wave)
    if not np.isfinite(level):
        return wave
    out = wave * db_to_amp(p.rms_dbfs - level)
    ceiling, peak = db_to_amp(p.peak_dbfs), float(np.max(np.abs(out)))
    return out * (ceiling / peak) if peak > ceiling else out


NORMALISERS: dict[str, Callable[[np.ndarray, AudioParams], np.ndarray]] = {
    "none": lambda wave, p: wave,
    "peak": _peak,
    "rms": _rms,
}


def _why(exc: Exception) -> str:
    """Error text without the object address libsndfile puts in it (details should be stable)."""
    return f"{type(exc).__name__}: {_OBJECT_REPR.sub('<bytes>', str(exc))}"


def read_frames(f: sf.SoundFile, limit: int) -> np.ndarray:
    """At most ``limit`` frames of an open file as float32 (frames x channels), READ_FRAMES at a
    time, checking the sample's deadline between reads."""
    parts = []
    while limit > 0:
        want = min(READ_FRAMES, limit)
        part = f.read(want, dtype="float32", always_2d=True)
        if part.shape[0]:
            parts.append(part)
        limit -= part.shape[0]
        check_deadline()
        if part.shape[0] < want:   # the end of the stream
            break
    return parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else np.zeros((0, 1), np.float32)


def check_header(sr: int, channels: int, frames: int, p: AudioParams) -> None:
    """Reject a header that cannot be a recording, or says the clip is too long or too large."""
    if not PLAUSIBLE_RATES[0] <= sr <= PLAUSIBLE_RATES[1] or not 1 <= channels <= p.max_channels:
        raise Reject("audio_corrupt", f"implausible header: {sr} Hz, {channels} channels")
    if 0 < frames < UNKNOWN_LENGTH and frames / sr > p.max_duration_s:
        raise Reject("audio_too_long", f"header duration {frames / sr:.1f} s > max_duration_s {p.max_duration_s}")
    if 0 < frames < UNKNOWN_LENGTH and frames * channels > p.max_samples:
        raise Reject("audio_too_large_samples", f"header: {frames} frames x {channels} channels "
                                                f"> max_samples {p.max_samples}")


def decode(data: bytes, p: AudioParams) -> Decoded:
    """Open the bytes once: check the header (duration, rate, channels), then decode at most
    max_duration_s from the same handle."""
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            sr, channels, src_format = int(f.samplerate), int(f.channels), str(f.format)
            check_header(sr, channels, int(f.frames), p)
            # Headers can lie (mp3, damaged wav): bound the read by duration and decoded size anyway.
            limit = min(int(p.max_duration_s * sr) + 1, p.max_samples // channels + 1)
            wave = read_frames(f, limit)
    except DECODE_ERRORS as exc:
        raise Reject("audio_corrupt", _why(exc)) from None
    if wave.shape[0] >= limit and wave.shape[0] * channels > p.max_samples:
        raise Reject("audio_too_large_samples", f"more than max_samples {p.max_samples} decoded samples")
    if wave.shape[0] == 0:
        raise Reject("audio_corrupt", "no samples")
    if not np.isfinite(wave).all():
        raise Reject("audio_corrupt", "non-finite samples")
    if float(np.max(np.abs(wave))) > MAX_FLOAT_PEAK:
        raise Reject("audio_corrupt", f"samples beyond {MAX_FLOAT_PEAK}x full scale (damaged float data)")
    if wave.shape[0] >= limit:
        raise Reject("audio_too_long", f"more than max_duration_s {p.max_duration_s} s of samples")
    return Decoded(wave.mean(axis=1), sr, channels, src_format)


@register_stage
class AudioCleaner(ModalityCleaner):
    """Crawled audio bytes -> mono, resampled, trimmed, normalised FLAC; rejects silent or bad clips."""

    name = "cleanup.audio"
    version = 1
    modality = "audio"
    Params = AudioParams
    runs_after = ("cleanup.video",)   # which may give a row its clip's audio track to clean
    reasons: ClassVar[dict[str, str]] = {
        "audio_corrupt": "empty, garbage, truncated, undecodable, implausible header, non-finite or wild samples",
        "audio_too_large_bytes": "raw bytes longer than max_raw_bytes; checked before opening",
        "audio_too_long": "header duration (or decoded / trimmed duration) above max_duration_s",
        "audio_too_large_samples": "frames x channels above max_samples (header, or while decoding)",
        "audio_too_short": "duration after silence trimming below min_duration_s",
        "audio_silent": "RMS of the trimmed clip below silence_dbfs",
    }

    def clean(self, value: Any) -> Cleaned:
        p: AudioParams = self.params
        if not isinstance(value, (bytes, bytearray, memoryview)) or len(value) == 0:
            raise Reject("audio_corrupt", "empty or not bytes")
        if len(value) > p.max_raw_bytes:
            raise Reject("audio_too_large_bytes", f"{len(value)} bytes > max_raw_bytes {p.max_raw_bytes}")
        dec = decode(bytes(value), p)
        wave = dec.wave
        if dec.sample_rate != p.sample_rate:
            wave = soxr.resample(wave, dec.sample_rate, p.sample_rate, quality=p.resample_quality).astype(np.float32)
        raw_s = wave.size / p.sample_rate
        if p.trim_top_db is not None and np.any(wave):
            wave = dsp.trim(wave, top_db=p.trim_top_db)   # librosa.effects.trim's result, without its imports
        level = rms_dbfs(wave)
        if not np.isfinite(level) or level < p.silence_dbfs:   # digital silence always counts
            raise Reject("audio_silent", f"RMS {level:.1f} dBFS < silence_dbfs {p.silence_dbfs}")
        duration = wave.size / p.sample_rate
        if duration < p.min_duration_s:
            raise Reject("audio_too_short", f"{duration:.2f} s after trimming < min_duration_s {p.min_duration_s}")
        if duration > p.max_duration_s:
            raise Reject("audio_too_long", f"{duration:.2f} s > max_duration_s {p.max_duration_s}")
        wave = NORMALISERS[p.normalize](wave, p)
        meta = {
            "duration_s": round(duration, 3), "sample_rate": p.sample_rate, "src_sample_rate": dec.sample_rate,
            "src_channels": dec.channels, "src_format": dec.src_format, "rms_dbfs": round(level, 2),
            "trimmed_s": round(raw_s - duration, 3),
        }
        return Cleaned(encode_flac(wave, p.sample_rate), meta)
