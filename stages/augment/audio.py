"""``augment.audio``: time stretch, pitch shift (librosa.effects), time shift, gain and additive
noise at a target SNR. The sample rate never changes and samples stay within [-1, 1]."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import librosa
import numpy as np
from pydantic import Field, field_validator

from stages.augment.base import ModalityAugmenter, Op, OpPolicy, check_ops, noise_seed, register_op, uniform
from stages.base import StageParams
from stages.media import decode_audio, encode_flac
from stages.registry import register_stage

Range = tuple[float, float]
OPS: dict[str, Op] = {}
op = partial(register_op, OPS)
MIN_STFT_SAMPLES = 2048   # librosa's default n_fft: shorter clips are not stretched or shifted in pitch


@dataclass
class Clip:
    wave: np.ndarray   # mono float32
    sr: int


def _clip(wave: np.ndarray) -> np.ndarray:
    return np.clip(wave, -1.0, 1.0).astype(np.float32)


# -- time stretch -----------------------------------------------------------------------------
class StretchPolicy(OpPolicy):
    p: float = Field(0.3, ge=0.0, le=1.0)
    rate: Range = (0.9, 1.1)   # >1 faster (shorter), <1 slower (longer)


def _draw_stretch(rng: np.random.Generator, pol: StretchPolicy, clip: Clip, _stage: Any) -> dict | None:
    return {"rate": uniform(rng, pol.rate)} if len(clip.wave) >= MIN_STFT_SAMPLES else None


@op("stretch", _draw_stretch)
def stretch(clip: Clip, r: dict) -> Clip:
    return Clip(_clip(librosa.effects.time_stretch(clip.wave, rate=r["rate"])), clip.sr)


# -- pitch shift ------------------------------------------------------------------------------
class PitchPolicy(OpPolicy):
    p: float = Field(0.3, ge=0.0, le=1.0)
    semitones: Range = (-2.0, 2.0)


def _draw_pitch(rng: np.random.Generator, pol: PitchPolicy, clip: Clip, _stage: Any) -> dict | None:
    return {"n_steps": uniform(rng, pol.semitones, 2)} if len(clip.wave) >= MIN_STFT_SAMPLES else None


@op("pitch", _draw_pitch)
def pitch(clip: Clip, r: dict) -> Clip:
    return Clip(_clip(librosa.effects.pitch_shift(clip.wave, sr=clip.sr, n_steps=r["n_steps"])), clip.sr)


# -- time shift -------------------------------------------------------------------------------
class ShiftPolicy(OpPolicy):
    p: float = Field(0.5, ge=0.0, le=1.0)
    max_fraction: float = Field(0.1, ge=0.0, le=1.0)   # of the clip's length, either direction


def _draw_shift(rng: np.random.Generator, pol: ShiftPolicy, clip: Clip, _stage: Any) -> dict | None:
    limit = int(pol.max_fraction * len(clip.wave))
    return {"samples": int(rng.integers(-limit, limit + 1))} if limit > 0 else None


@op("shift", _draw_shift)
def shift(clip: Clip, r: dict) -> Clip:
    """Delay (positive) or advance (negative) by ``samples``, filling with silence."""
    k, wave = r["samples"], clip.wave
    out = np.zeros_like(wave)
    if k >= 0:
        out[k:] = wave[: len(wave) - k]
    else:
        out[:k] = wave[-k:]
    return Clip(out, clip.sr)


# -- gain -------------------------------------------------------------------------------------
class GainPolicy(OpPolicy):
    p: float = Field(0.5, ge=0.0, le=1.0)
    db: Range = (-6.0, 6.0)


@op("gain", lambda rng, pol, clip, stage: {"db": uniform(rng, pol.db, 2)})
def gain(clip: Clip, r: dict) -> Clip:
    return Clip(_clip(clip.wave * np.float32(10.0 ** (r["db"] / 20.0))), clip.sr)


# -- additive noise ---------------------------------------------------------------------------
class NoisePolicy(OpPolicy):
    p: float = Field(0.5, ge=0.0, le=1.0)
    snr_db: Range = (10.0, 30.0)


@op("noise", lambda rng, pol, clip, stage: {"snr_db": uniform(rng, pol.snr_db, 2), "seed": noise_seed(rng)})
def noise(clip: Clip, r: dict) -> Clip:
    """White noise scaled so that signal power / noise power = 10^(snr_db / 10)."""
    power = float(np.mean(clip.wave.astype(np.float64) ** 2)) if len(clip.wave) else 0.0
    scale = np.float32(np.sqrt(power / 10.0 ** (r["snr_db"] / 10.0)))
    field = np.random.default_rng(r["seed"]).standard_normal(len(clip.wave), dtype=np.float32)
    return Clip(_clip(clip.wave + scale * field), clip.sr)


# -- the stage --------------------------------------------------------------------------------
class AudioAugParams(StageParams):
    ops: list[str] = Field(default_factory=lambda: list(OPS))
    stretch: StretchPolicy = StretchPolicy()
    pitch: PitchPolicy = PitchPolicy()
    shift: ShiftPolicy = ShiftPolicy()
    gain: GainPolicy = GainPolicy()
    noise: NoisePolicy = NoisePolicy()

    @field_validator("ops")
    @classmethod
    def _known(cls, ops: list[str]) -> list[str]:
        return check_ops(ops, OPS)


@register_stage
class AudioAugmenter(ModalityAugmenter):
    """Waveform augmentation on augmented copies; output is FLAC at the input's sample rate."""

    name = "augment.audio"
    version = 1
    modality = "audio"
    Params = AudioAugParams
    OPS = OPS

    @classmethod
    def decode(cls, data: bytes, params: AudioAugParams) -> Clip:
        wave, sr = decode_audio(data)
        return Clip(wave, sr)

    @classmethod
    def encode(cls, clip: Clip, original: bytes, params: AudioAugParams) -> bytes:
        return encode_flac(_clip(clip.wave), clip.sr)
