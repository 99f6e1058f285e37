"""Video encoders ("framestats": weight-free; "torchvision_video", "hf_video": pretrained) and the
video feature stages. Every encoder reads the row's sampled frames (``video_frames``), not its mp4."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import cv2
import numpy as np
from pydantic import Field, field_validator, model_validator

from stages.base import Batch
from stages.features.base import Encoder, EncoderParams, SequenceParams, register_encoder
from stages.features.hf import HFEncoder, HFParams, load_companion
from stages.features.image import HistImageEncoder, HistParams, TorchvisionImageEncoder, TorchvisionParams
from stages.features.stage import FeaturePrepStage, FeatureStage
from stages.registry import register_stage
from stages.video import FRAMES, frames_from_bytes, gray_differences, gray_small

if TYPE_CHECKING:
    import torch

MOTION_STATS = 7   # frame change mean / std / max; spread of the change along x / y; of its path along x / y


def load_frames(data: bytes) -> np.ndarray:
    """A ``video_frames`` cell -> (K, H, W, 3) uint8, K >= 1."""
    frames = frames_from_bytes(data)
    if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0 or frames.dtype != np.uint8:
        raise ValueError(f"video_frames holds a {frames.dtype} array of shape {frames.shape}, not (K>0, H, W, 3) uint8")
    return frames


def clip_indices(n: int, length: int) -> np.ndarray:
    """``length`` evenly spaced indices into ``n`` frames, repeating frames when ``n < length``."""
    return np.linspace(0, n - 1, length).round().astype(np.int64)


# -- weight-free: per-frame histograms pooled over time, plus motion ---------------------------
class FrameStatsParams(HistParams, SequenceParams):
    motion_size: int = Field(32, ge=8)       # motion is measured on a luminance grid this many cells wide
    direction_bins: int = Field(4, ge=2)     # motion orientation histogram over 0..180 degrees
    motion_grid: int = Field(4, ge=1)        # grid x grid cells of motion energy


def motion_dim(params: FrameStatsParams) -> int:
    return MOTION_STATS + params.direction_bins + params.motion_grid ** 2


def hellinger(hist: np.ndarray) -> np.ndarray:
    """Square roots of the proportions (unit L2 norm), zeros for an empty histogram."""
    total = hist.sum()
    return np.sqrt(hist / total) if total > 0 else np.zeros_like(hist)


def _centroids(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted mean x and y (0..1) of each (s, s) map in ``weights`` (n, s, s); rows sum to > 0."""
    ys, xs = np.linspace(0.0, 1.0, weights.shape[1]), np.linspace(0.0, 1.0, weights.shape[2])
    total = weights.sum(axis=(1, 2))
    return (weights.sum(axis=1) @ xs) / total, (weights.sum(axis=2) @ ys) / total


def change_moments(change: np.ndarray) -> np.ndarray:
    """How spread out the changing region is along x and y, and how far it travels along x and y."""
    change = change[change.sum(axis=(1, 2)) > 0]
    if not len(change):
        return np.zeros(4)
    cx, cy = _centroids(change)
    xs, ys = np.linspace(0.0, 1.0, change.shape[2]), np.linspace(0.0, 1.0, change.shape[1])
    total = change.sum(axis=(1, 2))
    spread_x = np.sqrt((change.sum(axis=1) * (xs[None] - cx[:, None]) ** 2).sum(axis=1) / total)
    spread_y = np.sqrt((change.sum(axis=2) * (ys[None] - cy[:, None]) ** 2).sum(axis=1) / total)
    return np.array([spread_x.mean(), spread_y.mean(), cx.std(), cy.std()])


def direction_histogram(signed: np.ndarray, bins: int) -> np.ndarray:
    """Orientation (0..180 degrees) of each pair's motion, weighted by its length: from where the
    picture darkened to where it brightened (an object's old and new place, whatever its size or
    speed; the polarity of its contrast flips the sign, hence orientation, not direction)."""
    gain, loss = np.maximum(signed, 0.0), np.maximum(-signed, 0.0)
    both = (gain.sum(axis=(1, 2)) > 0) & (loss.sum(axis=(1, 2)) > 0)
    hist = np.zeros(bins)
    if not both.any():
        return hist
    (gx, gy), (lx, ly) = _centroids(gain[both]), _centroids(loss[both])
    dx, dy = gx - lx, gy - ly
    angle = np.mod(np.arctan2(dy, dx), np.pi)
    index = np.floor(angle * bins / np.pi + 0.5).astype(np.int64) % bins   # bins centred on k * 180 / bins
    np.add.at(hist, index, np.hypot(dx, dy))
    return hellinger(hist)


def energy_grid(change: np.ndarray, grid: int) -> np.ndarray:
    """Where in the frame the change happens: its share per grid cell, over the whole clip."""
    s_y, s_x = change.shape[1:]
    cells = (np.arange(s_y)[:, None] * grid // s_y) * grid + (np.arange(s_x)[None, :] * grid // s_x)
    return hellinger(np.bincount(cells.ravel(), weights=change.sum(axis=0).ravel(), minlength=grid * grid))


@register_encoder
class FrameStatsVideoEncoder(Encoder):
    """The "hist" image descriptor of every frame, its mean and std over time, then motion: how much
    the frames change, how spread out and how far the changing region moves, the orientation of that
    motion (unit-norm histogram, like the appearance blocks) and where in the frame it happens."""

    name = "framestats"
    modality = "video"
    Params: ClassVar[type[EncoderParams]] = FrameStatsParams

    def __init__(self, params: EncoderParams | dict | None = None, *, inference: bool = True):
        super().__init__(params, inference=inference)
        own = set(FrameStatsParams.model_fields) - set(HistParams.model_fields)
        self.frame_encoder = HistImageEncoder(self.params.model_dump(exclude=own))

    @classmethod
    def dim_for(cls, params: EncoderParams) -> int:
        return 2 * HistImageEncoder.dim_for(params) + motion_dim(params)

    def preprocess(self, values: list[Any]) -> list[Any]:
        size = (self.params.size, self.params.size)
        return [np.stack([cv2.resize(f, size, interpolation=cv2.INTER_AREA) for f in load_frames(v)]) for v in values]

    def encode(self, prepped: list[Any]) -> np.ndarray:
        return np.stack([self._clip(frames) for frames in prepped])

    @classmethod
    def sequence_dim(cls, params: EncoderParams) -> int:
        return HistImageEncoder.dim_for(params)   # a frame: its hist descriptor, in order

    def encode_sequence(self, prepped: list[Any]) -> list[np.ndarray]:
        return [self.frame_encoder.encode(list(frames)) for frames in prepped]

    def _clip(self, frames: np.ndarray) -> np.ndarray:
        per_frame = self.frame_encoder.encode(list(frames))
        return np.concatenate([per_frame.mean(axis=0), per_frame.std(axis=0), self._motion(frames)]).astype(np.float32)

    def _motion(self, frames: np.ndarray) -> np.ndarray:
        p = self.params
        if len(frames) < 2:
            return np.zeros(motion_dim(p))   # one frame: no motion to measure
        gray = gray_small(frames, p.motion_size)
        per_pair = gray_differences(gray)
        signed = np.diff(gray, axis=0)   # (T-1, s, s) luminance change
        change = np.abs(signed)
        # Where and how the picture moves: only change well above each pair's typical (noise, compression) one.
        moving = change > 3.0 * np.median(change, axis=(1, 2), keepdims=True)
        signed, change = signed * moving, change * moving
        return np.concatenate([[per_pair.mean(), per_pair.std(), per_pair.max()], change_moments(change),
                               direction_histogram(signed, p.direction_bins), energy_grid(change, p.motion_grid)])


# -- torchvision video classifiers --------------------------------------------------------------
def video_archs() -> list[str]:
    """torchvision's video classifiers whose head is a Linear layer (s3d's is a convolution)."""
    import torchvision

    return [a for a in torchvision.models.list_models(module=torchvision.models.video) if a != "s3d"]


@dataclass(frozen=True)
class InputSpec:
    resize_size: int                 # short side before the centre crop
    crop_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class TorchvisionVideoParams(TorchvisionParams):
    arch: str = "r3d_18"
    resize_size: int | None = Field(None, ge=8)   # None: the arch's Kinetics recipe (r3d_18: 128, mvit: 256)
    crop_size: int | None = Field(None, ge=8)     # None: the recipe's (r3d_18: 112, mvit: 224)
    clip_len: int = Field(16, ge=1)               # frames the model sees; video_frames are resampled to it

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, arch: str) -> str:
        known = video_archs()
        if arch not in known:
            raise ValueError(f"unknown torchvision video model {arch!r}; known: {', '.join(known)}")
        return arch

    @model_validator(mode="after")
    def _fits_the_arch(self) -> "TorchvisionVideoParams":
        import torchvision

        meta = torchvision.models.get_model_weights(self.arch).DEFAULT.meta
        crop = input_spec(self).crop_size
        if crop < meta["min_size"][0] or self.clip_len < meta.get("min_temporal_size", 1):
            raise ValueError(f"{self.arch} needs crop_size >= {meta['min_size'][0]} and clip_len >= "
                             f"{meta.get('min_temporal_size', 1)}; got {crop} and {self.clip_len}")
        return self


def input_spec(params: TorchvisionVideoParams) -> InputSpec:
    """The arch's own preprocessing (its weights' transforms, no download), with the params' overrides."""
    import torchvision

    recipe = torchvision.models.get_model_weights(params.arch).DEFAULT.transforms()
    return InputSpec(resize_size=params.resize_size or recipe.resize_size[0],
                     crop_size=params.crop_size or recipe.crop_size[0],
                     mean=tuple(recipe.mean), std=tuple(recipe.std))


@register_encoder
class TorchvisionVideoEncoder(TorchvisionImageEncoder):
    """A torchvision video classifier (r3d_18, r2plus1d_18, mc3_18, mvit_v2_s, ...); the pooled
    features its classifier took (512 for the ResNet3D family). Weights load as for "torchvision"."""

    name = "torchvision_video"
    modality = "video"
    Params: ClassVar[type[EncoderParams]] = TorchvisionVideoParams

    def __init__(self, params: EncoderParams | dict | None = None, *, inference: bool = True):
        super().__init__(params, inference=inference)
        self.spec = input_spec(self.params)
        if inference:
            import torch

            shape = (1, 1, 3, 1, 1)   # (clip, time, channel, height, width)
            self.mean = torch.tensor(self.spec.mean, device=self.device).view(shape)
            self.std = torch.tensor(self.spec.std, device=self.device).view(shape)

    def preprocess(self, values: list[Any]) -> list[Any]:
        """``clip_len`` frames, resized and centre-cropped, kept as uint8 (T, 3, H, W)."""
        import torch
        from torchvision.transforms.v2 import functional as F

        out = []
        for v in values:
            frames = load_frames(v)
            clip = torch.from_numpy(frames[clip_indices(len(frames), self.params.clip_len)]).permute(0, 3, 1, 2)
            clip = F.center_crop(F.resize(clip, [self.spec.resize_size], antialias=True), [self.spec.crop_size])
            out.append(clip.numpy())
        return out

    def forward(self, prepped: list[Any]) -> torch.Tensor:
        x = self.to_device(np.stack(prepped)).float().div_(255.0)
        return self.model(((x - self.mean) / self.std).permute(0, 2, 1, 3, 4))   # models take (N, C, T, H, W)


# -- transformers video models ------------------------------------------------------------------
class HFVideoParams(HFParams):
    pooling: Literal["auto", "mean", "cls"] = "auto"   # auto: the model's pooler output, else the token mean
    num_frames: int | None = Field(None, ge=1)         # None: the model config's num_frames


def model_frames(config: Any) -> int | None:
    """How many frames a video model's config says it takes (VideoMAE; X-CLIP's vision tower)."""
    for cfg in (config, getattr(config, "vision_config", None)):
        if getattr(cfg, "num_frames", None):
            return int(cfg.num_frames)
    return None


@register_encoder
class HFVideoEncoder(HFEncoder):
    """VideoMAE / TimeSformer / ViViT (pooled hidden state) or X-CLIP (``get_video_features``) via
    AutoModel + AutoVideoProcessor from a local directory."""

    name = "hf_video"
    modality = "video"
    Params: ClassVar[type[EncoderParams]] = HFVideoParams

    def load_companions(self) -> None:
        from transformers import AutoVideoProcessor

        self.processor = load_companion(AutoVideoProcessor.from_pretrained, self.model_dir, "video processor", "video")
        frames = self.params.num_frames or model_frames(self.config)
        if frames is None:
            raise ValueError(f"{self.model_dir} does not say how many frames the model takes; set num_frames")
        self.clip_len = frames

    def preprocess(self, values: list[Any]) -> list[Any]:
        clips = [f[clip_indices(len(f), self.clip_len)] for f in map(load_frames, values)]
        return list(self.processor(videos=clips, return_tensors="pt")["pixel_values"].float().numpy())

    def forward(self, prepped: list[Any]) -> torch.Tensor:
        pixels = self.to_device(np.stack(prepped))
        if self.dual:
            return self.tower_features(pixel_values=pixels)
        out = self.model(pixel_values=pixels)
        pooling = self.params.pooling
        if pooling == "cls":
            return out.last_hidden_state[:, 0]
        if pooling == "auto" and getattr(out, "pooler_output", None) is not None:
            return out.pooler_output
        return out.last_hidden_state.mean(dim=1)


# -- the stages ---------------------------------------------------------------------------------
class ReadsFrames:
    """Mixed into the video feature stages: the encoders take ``video_frames``, not the mp4."""

    reads = ("{modality}", FRAMES)

    def prepare(self, batch: Batch, rows: list[int]) -> dict[int, Any]:
        # the same arrays under the modality's name: rejects land in the caller's batch
        return super().prepare({**batch, self.modality: batch[FRAMES]}, rows)


@register_stage
class VideoFeaturesPrep(ReadsFrames, FeaturePrepStage):
    name = "features.video.prep"
    modality = "video"


@register_stage
class VideoFeatures(ReadsFrames, FeatureStage):
    name = "features.video"
    modality = "video"
