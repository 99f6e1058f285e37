"""stages/dsp.py against librosa, whose definitions it follows (librosa stays installed for
augmentation, so the comparison runs in the default test run)."""
import librosa
import numpy as np
import pytest

from stages import dsp

SR, N_FFT, HOP = 16000, 512, 160


def _waves():
    rng = np.random.default_rng(0)
    t = np.arange(SR) / SR
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    burst = np.concatenate([np.zeros(4000), 0.3 * rng.standard_normal(6000), np.zeros(5000)]).astype(np.float32)
    return {"tone": tone, "noise": (0.1 * rng.standard_normal(SR)).astype(np.float32), "burst": burst,
            "short": tone[:300], "silent": np.zeros(8000, np.float32)}


@pytest.mark.parametrize("name", list(_waves()))
def test_spectral_features_match_librosa(name):
    wave = _waves()[name]
    mag = dsp.magnitude(wave, N_FFT, HOP)
    ref_mag = np.abs(librosa.stft(wave, n_fft=N_FFT, hop_length=HOP))
    np.testing.assert_allclose(mag, ref_mag, rtol=1e-4, atol=1e-4)

    mel = dsp.mel_filterbank(SR, N_FFT, 64) @ mag ** 2
    ref_mel = librosa.feature.melspectrogram(S=ref_mag ** 2, sr=SR, n_mels=64)
    np.testing.assert_allclose(mel, ref_mel, rtol=1e-3, atol=1e-6)
    mel_db = dsp.power_to_db(mel)
    ref_db = librosa.power_to_db(ref_mel, ref=1.0, top_db=80.0)
    np.testing.assert_allclose(mel_db, ref_db, atol=1e-2)
    np.testing.assert_allclose(dsp.mfcc(mel_db, 20), librosa.feature.mfcc(S=ref_db, n_mfcc=20), atol=5e-2)

    stats = dsp.spectral_stats(mag, wave, SR, N_FFT, HOP)
    ref = np.vstack([
        librosa.feature.spectral_centroid(S=ref_mag, sr=SR),
        librosa.feature.spectral_bandwidth(S=ref_mag, sr=SR),
        librosa.feature.spectral_rolloff(S=ref_mag, sr=SR),
        librosa.feature.spectral_flatness(S=ref_mag),
        librosa.feature.zero_crossing_rate(wave, frame_length=N_FFT, hop_length=HOP),
        librosa.feature.rms(S=ref_mag, frame_length=N_FFT, hop_length=HOP),
    ])
    # Both FFTs run in float32 (librosa's on float32 input too) but are different implementations:
    # a pure tone's bandwidth sums the near-zero bins where they differ most (0.3 % here).
    np.testing.assert_allclose(stats[1], ref[1], rtol=5e-3, atol=1e-3)
    np.testing.assert_allclose(np.delete(stats, 1, axis=0), np.delete(ref, 1, axis=0), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", list(_waves()))
@pytest.mark.parametrize("top_db", [20.0, 40.0, 60.0])
def test_trim_matches_librosa(name, top_db):
    wave = _waves()[name]
    ours = dsp.trim(wave, top_db)
    theirs, _ = librosa.effects.trim(wave, top_db=top_db)
    assert len(ours) == len(theirs)
    np.testing.assert_array_equal(ours, theirs)
