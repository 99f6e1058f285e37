"""Audio encoders ("logmel": weight-free; "hf_audio": a transformers model) and the audio feature stages."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import soxr
from pydantic import Field

from stages import dsp
from stages.features.base import Encoder, EncoderParams, SequenceParams, register_encoder
from stages.features.hf import HFEncoder, HFSequenceParams, load_companion
from stages.features.stage import FeaturePrepStage, FeatureStage
from stages.features.torch_encoder import equal_length_groups, masked_mean, pad_stack
from stages.media import decode_audio
from stages.registry import register_stage

if TYPE_CHECKING:
    import torch

SPECTRAL_STATS = 6   # centroid, bandwidth, rolloff, flatness, zero-crossing rate, rms: mean and std of each


def load_wave(data: bytes, sample_rate: int, max_seconds: float, min_samples: int = 0) -> np.ndarray:
    """Encoded audio -> mono float32 at ``sample_rate``, cut to ``max_seconds``, zero-padded to ``min_samples``."""
    wave, sr = decode_audio(data)
    if sr != sample_rate:
        wave = soxr.resample(wave, sr, sample_rate, quality="HQ")
    wave = wave[: int(max_seconds * sample_rate)]
    if len(wave) < min_samples:
        wave = np.pad(wave, (0, min_samples - len(wave)))
    return np.ascontiguousarray(wave, dtype=np.float32)


class LogMelParams(SequenceParams):
    sample_rate: int = Field(16000, ge=1000)
    n_mels: int = Field(64, ge=8)
    n_mfcc: int = Field(20, ge=1)
    n_fft: int = Field(512, ge=64)
    hop_length: int = Field(160, ge=1)
    max_seconds: float = Field(30.0, gt=0)


@register_encoder
class LogMelAudioEncoder(Encoder):
    """Mean and std over time of log-mel bands and MFCCs, plus a few spectral statistics
    (librosa's definitions, computed by stages/dsp.py)."""

    name = "logmel"
    version = 2   # 2: float32 FFT (scipy): values within float32 rounding of version 1
    modality = "audio"
    Params: ClassVar[type[EncoderParams]] = LogMelParams

    def __init__(self, params: EncoderParams | dict | None = None, *, inference: bool = True):
        super().__init__(params, inference=inference)
        import scipy.fft  # noqa: F401 (stages/dsp.py's FFTs: loaded with the encoder, not on its first clip)

    @classmethod
    def dim_for(cls, params: EncoderParams) -> int:
        return 2 * (params.n_mels + params.n_mfcc + SPECTRAL_STATS)

    def preprocess(self, values: list[Any]) -> list[Any]:
        p = self.params
        return [load_wave(v, p.sample_rate, p.max_seconds, min_samples=p.n_fft) for v in values]

    @classmethod
    def sequence_dim(cls, params: EncoderParams) -> int:
        return params.n_mels + params.n_mfcc   # a frame: its log-mel bands and MFCCs (dB / 10)

    def encode(self, prepped: list[Any]) -> np.ndarray:
        self._frames = {}
        return np.stack([self._stats(w) for w in prepped])

    def encode_sequence(self, prepped: list[Any]) -> list[np.ndarray]:
        """Log-mel + MFCC frames averaged into ``sequence`` equal stretches of the clip (a clip with
        fewer STFT frames keeps its own); the frames ``encode`` just computed are reused."""
        out = []
        for wave in prepped:
            frames = self._frames.get(id(wave)) if hasattr(self, "_frames") else None
            frames = frames if frames is not None else np.concatenate(self._blocks(wave)[:2]).T
            stretches = np.array_split(frames, min(len(frames), self.params.sequence))
            out.append(np.stack([s.mean(axis=0) for s in stretches]))
        return out

    def _blocks(self, wave: np.ndarray) -> list[np.ndarray]:
        p = self.params
        mag = dsp.magnitude(wave, p.n_fft, p.hop_length)
        power = mag * mag
        mel_db = dsp.power_to_db(dsp.mel_filterbank(p.sample_rate, p.n_fft, p.n_mels) @ power, top_db=80.0)
        mfcc = dsp.mfcc(mel_db, p.n_mfcc)
        spectral = dsp.spectral_stats(mag, wave, p.sample_rate, p.n_fft, p.hop_length, power)
        spectral[:3] /= p.sample_rate / 2   # centroid, bandwidth, roll-off as fractions of Nyquist
        # dB / 10 keeps the mel and MFCC blocks in a range comparable to the spectral ratios.
        return [mel_db / 10.0, mfcc / 10.0, spectral]

    def _stats(self, wave: np.ndarray) -> np.ndarray:
        blocks = self._blocks(wave)
        if self.params.sequence:
            self._frames[id(wave)] = np.concatenate(blocks[:2]).T
        return np.concatenate([np.concatenate([b.mean(axis=1), b.std(axis=1)]) for b in blocks]).astype(np.float32)


class HFAudioParams(HFSequenceParams):
    max_seconds: float = Field(30.0, gt=0)


@register_encoder
class HFAudioEncoder(HFEncoder):
    """wav2vec2 / HuBERT / AST / CLAP audio via AutoModel + AutoFeatureExtractor; masked mean pooling.
    ``sequence: N`` also stores the clip's last hidden states averaged into N equal stretches."""

    name = "hf_audio"
    modality = "audio"
    Params: ClassVar[type[EncoderParams]] = HFAudioParams
    # Stretches, as logmel's sequence: N frames then span the whole clip at any length, where the
    # first N (about 50 a second) would cover its first instants.
    pool_frames = True

    def load_companions(self) -> None:
        from transformers import AutoFeatureExtractor

        fe = load_companion(AutoFeatureExtractor.from_pretrained, self.model_dir, "feature extractor", "audio")
        self.extractor = fe
        self.input_name = fe.model_input_names[0]
        # Models trained without attention masks (wav2vec2-base: group norm over time) see padding.
        self.use_mask = bool(getattr(fe, "return_attention_mask", False))

    def preprocess(self, values: list[Any]) -> list[Any]:
        """Per clip, so normalisation never sees another clip or padding."""
        sr = self.extractor.sampling_rate
        out = []
        for v in values:
            wave = load_wave(v, sr, self.params.max_seconds, min_samples=sr // 10)
            out.append(self.extractor(wave, sampling_rate=sr, return_tensors="np")[self.input_name][0].astype(np.float32))
        return out

    def forward(self, prepped: list[Any]) -> torch.Tensor:
        if prepped[0].ndim > 1 or self.use_mask:   # fixed-size features, or a model that honours the mask
            return self._pooled(prepped)
        import torch

        out = torch.empty((len(prepped), self.dim), device=self.device)
        for idx in equal_length_groups([len(p) for p in prepped]):   # unpadded batches: same result as alone
            out[idx] = self._pooled([prepped[i] for i in idx]).float()
        return out

    def _pooled(self, prepped: list[np.ndarray]) -> torch.Tensor:
        mask = None
        if prepped[0].ndim == 1:
            values, mask = pad_stack(prepped)
        else:
            values = np.stack(prepped)
        inputs = {self.input_name: self.to_device(values)}
        if mask is not None and self.use_mask:
            inputs["attention_mask"] = self.to_device(mask)
        if self.dual:
            return self.tower_features(**inputs)
        hidden = self.model(**inputs).last_hidden_state
        frames = None
        if "attention_mask" in inputs and hasattr(self.model, "_get_feature_vector_attention_mask"):
            frames = self.model._get_feature_vector_attention_mask(hidden.shape[1], inputs["attention_mask"])
        self.keep_frames(prepped, hidden, frames)
        return masked_mean(hidden, frames)


@register_stage
class AudioFeaturesPrep(FeaturePrepStage):
    name = "features.audio.prep"
    modality = "audio"


@register_stage
class AudioFeatures(FeatureStage):
    name = "features.audio"
    modality = "audio"
