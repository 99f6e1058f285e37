"""The few spectral computations the default audio stages need, in numpy (librosa's definitions).

Why not librosa here: its first STFT or trim call in a process loads scipy.signal, numba and
scikit-learn, about 2.5 s on the 2-core machines this runs on, paid again by every Ray actor and
every `mmpipe run`; the weight-free `logmel` encoder and `cleanup.audio` need ten numpy lines of
it. tests/stages/test_dsp.py checks each function against librosa. Augmentation (phase vocoder
time stretch, pitch shift) still uses librosa.
"""
from __future__ import annotations

import functools

import numpy as np


def frame(wave: np.ndarray, frame_length: int, hop_length: int, center: bool = True,
          pad_mode: str = "constant") -> np.ndarray:
    """(n_frames, frame_length) strided view; ``center`` pads ``frame_length // 2`` each side."""
    if center:
        wave = np.pad(wave, frame_length // 2, mode=pad_mode)
    if len(wave) < frame_length:
        wave = np.pad(wave, (0, frame_length - len(wave)))
    return np.lib.stride_tricks.sliding_window_view(wave, frame_length)[::hop_length]


@functools.cache
def hann(n: int) -> np.ndarray:
    """Periodic Hann window, as for spectral analysis (scipy's ``get_window('hann', n)``)."""
    return (0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)).astype(np.float32)


def magnitude(wave: np.ndarray, n_fft: int, hop_length: int) -> np.ndarray:
    """|STFT|: shape (1 + n_fft // 2, n_frames) (a transposed view); centred frames with zero
    padding, Hann window. scipy's FFT in float32: 5-7x numpy's on short frames."""
    import scipy.fft   # here: the driver imports this module but never computes a spectrum

    frames = frame(np.asarray(wave, dtype=np.float32), n_fft, hop_length) * hann(n_fft)
    return np.abs(scipy.fft.rfft(frames, axis=1)).T


def fft_frequencies(sample_rate: int, n_fft: int) -> np.ndarray:
    return np.linspace(0, sample_rate / 2, 1 + n_fft // 2)


_F_SP, _MIN_LOG_HZ, _MIN_LOG_MEL, _LOGSTEP = 200.0 / 3, 1000.0, 15.0, np.log(6.4) / 27.0


def hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz, logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    log = _MIN_LOG_MEL + np.log(np.maximum(hz, 1e-10) / _MIN_LOG_HZ) / _LOGSTEP
    return np.where(hz >= _MIN_LOG_HZ, log, hz / _F_SP)


def mel_to_hz(mel: np.ndarray | float) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    return np.where(mel >= _MIN_LOG_MEL, _MIN_LOG_HZ * np.exp(_LOGSTEP * (mel - _MIN_LOG_MEL)), mel * _F_SP)


@functools.cache
def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """(n_mels, 1 + n_fft // 2) triangular filters from 0 Hz to Nyquist, Slaney area-normalised."""
    mel_hz = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(sample_rate / 2), n_mels + 2))
    widths = np.diff(mel_hz)
    ramps = mel_hz[:, None] - fft_frequencies(sample_rate, n_fft)[None, :]
    weights = np.maximum(0.0, np.minimum(-ramps[:-2] / widths[:-1, None], ramps[2:] / widths[1:, None]))
    weights *= (2.0 / (mel_hz[2:] - mel_hz[:-2]))[:, None]
    return weights.astype(np.float32)


def power_to_db(power: np.ndarray, top_db: float | None = 80.0, amin: float = 1e-10) -> np.ndarray:
    """10 log10(power) relative to 1, floored at ``top_db`` below the maximum."""
    db = 10.0 * np.log10(np.maximum(amin, power))
    if top_db is not None and db.size:
        db = np.maximum(db, db.max() - top_db)
    return db


def mfcc(mel_db: np.ndarray, n_mfcc: int) -> np.ndarray:
    """DCT-II (orthonormal) of log-mel bands over the band axis, first ``n_mfcc`` coefficients."""
    import scipy.fft

    return scipy.fft.dct(mel_db, axis=0, type=2, norm="ortho")[:n_mfcc]


@functools.cache
def _frequency_moments(sample_rate: int, n_fft: int) -> np.ndarray:
    """(2, 1 + n_fft // 2): each bin's frequency and its square, for a spectrum's first two moments."""
    freqs = fft_frequencies(sample_rate, n_fft)
    return np.stack([freqs, freqs * freqs])


def spectral_stats(mag: np.ndarray, wave: np.ndarray, sample_rate: int, n_fft: int,
                   hop_length: int, power: np.ndarray | None = None) -> np.ndarray:
    """(6, n_frames): centroid, bandwidth and 85 % roll-off (Hz), flatness, zero-crossing rate, RMS.
    ``power``: ``mag ** 2`` where the caller has it. Centroid and bandwidth come from the spectrum's
    first two moments (one small matrix product), not from a weights array per frame."""
    total = mag.sum(axis=0, dtype=np.float64)
    scale = np.where(total > np.finfo(np.float32).tiny, total, 1.0)
    centroid, second = (_frequency_moments(sample_rate, n_fft) @ mag.astype(np.float64)) / scale
    share = total / scale   # the weights' sum: 1, or a silent frame's (tiny) magnitude
    bandwidth = np.sqrt(np.maximum(second - centroid * centroid * (2.0 - share), 0.0))   # sum w (f - c)^2
    energy = np.cumsum(mag.T, axis=1)   # bins along rows: contiguous for magnitude()'s transposed view
    rolloff = fft_frequencies(sample_rate, n_fft)[np.argmax(energy >= 0.85 * energy[:, -1:], axis=1)]   # lowest bin reaching 85 %
    power = np.maximum(mag * mag if power is None else power, np.float32(1e-10))
    flatness = np.exp(np.mean(np.log(power), axis=0)) / np.mean(power, axis=0)
    return np.vstack([centroid, bandwidth, rolloff, flatness,
                      zero_crossing_rate(wave, n_fft, hop_length), rms_from_magnitude(mag, n_fft)])


def zero_crossing_rate(wave: np.ndarray, frame_length: int, hop_length: int) -> np.ndarray:
    """Sign changes per sample in each centred frame (edge padding; |x| <= 1e-10 counts as 0, positive).
    The changes are found once over the padded wave and counted per frame from their running sum."""
    negative = np.pad(np.asarray(wave) < -1e-10, frame_length // 2, mode="edge")
    if len(negative) < frame_length:
        negative = np.pad(negative, (0, frame_length - len(negative)))
    changes = np.concatenate([[0], np.cumsum(negative[1:] != negative[:-1], dtype=np.int32)])
    starts = np.arange(0, len(negative) - frame_length + 1, hop_length)
    return (changes[starts + frame_length - 1] - changes[starts]) / frame_length


def rms_from_magnitude(mag: np.ndarray, frame_length: int) -> np.ndarray:
    """Frame RMS from an STFT magnitude (Parseval; DC and Nyquist bins counted once)."""
    power = mag.astype(np.float64) ** 2
    power[0] *= 0.5
    if frame_length % 2 == 0:
        power[-1] *= 0.5
    return np.sqrt(2.0 * power.sum(axis=0) / frame_length ** 2)


def trim(wave: np.ndarray, top_db: float, frame_length: int = 2048, hop_length: int = 512) -> np.ndarray:
    """``wave`` without the leading and trailing frames more than ``top_db`` quieter than its
    loudest frame (frame RMS over centred frames); empty when every frame is silent."""
    rms = np.sqrt(np.mean(np.abs(frame(wave, frame_length, hop_length)) ** 2, axis=1))
    db = power_to_db(rms ** 2, top_db=None)
    loud = np.flatnonzero(db > db.max() - top_db) if db.size else db
    if loud.size == 0:
        return wave[:0]
    return wave[int(loud[0]) * hop_length:min(len(wave), (int(loud[-1]) + 1) * hop_length)]
