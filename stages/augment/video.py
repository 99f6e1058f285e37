"""``augment.video``: temporal crop and frame-rate jitter, then augment.image's ops on every frame
with one drawn parameter set per clip.

Values are (T, 3, H, W) uint8 tensors at the clip's frame rate. A changed copy is re-encoded as
mp4 (``stages.video.encode_mp4``) and its ``video_frames`` re-sampled from that mp4, so the frames
are always those of the row's clip and a replay of ``video`` reproduces them too.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field, field_validator

from stages.augment import image
from stages.augment.base import AUG, AUG_PARAMS, ModalityAugmenter, Op, OpPolicy, check_ops, register_op, uniform
from stages.base import META, Batch, Reject, StageParams, live_rows, update_meta
from stages.registry import register_stage
from stages.video import FRAMES, decode_clip, encode_mp4, frames_from_bytes, frames_to_bytes, probe

if TYPE_CHECKING:
    import torch

Range = tuple[float, float]
OPS: dict[str, Op] = {}
op = partial(register_op, OPS)
MAX_FRAMES = 1 << 20   # no cap of our own: cleanup already bounded the clip's length


@dataclass(frozen=True)
class TensorClip:
    frames: torch.Tensor   # (T, 3, H, W) uint8
    fps: float


def _take(clip: TensorClip, indices: np.ndarray) -> TensorClip:
    import torch

    index = torch.as_tensor(indices, dtype=torch.long, device=clip.frames.device)
    return replace(clip, frames=clip.frames.index_select(0, index))


# -- temporal crop ----------------------------------------------------------------------------
class TemporalCropPolicy(OpPolicy):
    p: float = Field(0.5, ge=0.0, le=1.0)
    share: Range = (0.6, 1.0)   # fraction of the clip's duration kept, one contiguous stretch


def _draw_temporal_crop(rng: np.random.Generator, pol: TemporalCropPolicy, clip: TensorClip, _: Any) -> dict | None:
    n = len(clip.frames)
    if n < 2:
        return None
    length = min(n, max(1, round(uniform(rng, pol.share) * n)))
    return {"start": int(rng.integers(0, n - length + 1)), "length": length}


@op("temporal_crop", _draw_temporal_crop)
def temporal_crop(clip: TensorClip, r: dict) -> TensorClip:
    return _take(clip, np.arange(r["start"], r["start"] + r["length"]))


# -- frame-rate jitter ------------------------------------------------------------------------
class FrameRatePolicy(OpPolicy):
    p: float = Field(0.3, ge=0.0, le=1.0)
    factor: Range = (0.8, 1.25)   # playback speed: >1 drops frames (faster), <1 repeats them


def _draw_frame_rate(rng: np.random.Generator, pol: FrameRatePolicy, clip: TensorClip, _: Any) -> dict | None:
    return {"factor": uniform(rng, pol.factor)} if len(clip.frames) >= 2 else None


@op("frame_rate", _draw_frame_rate)
def frame_rate(clip: TensorClip, r: dict) -> TensorClip:
    """Frame k of the output shows source frame floor(k * factor); the clip's fps stays as it was."""
    n = len(clip.frames)
    count = max(1, round(n / r["factor"]))
    return _take(clip, np.minimum(np.floor(np.arange(count) * r["factor"]).astype(np.int64), n - 1))


# -- augment.image's ops, one parameter set for all frames ------------------------------------
def _per_frame(image_op: Op) -> Op:
    """torchvision's v2 ops take (..., C, H, W): one call applies the same parameters to every frame."""
    return Op(draw=lambda rng, pol, clip, stage: image_op.draw(rng, pol, clip.frames, stage),
              apply=lambda clip, r: replace(clip, frames=image_op.apply(clip.frames, r)))


OPS.update({name: _per_frame(image_op) for name, image_op in image.OPS.items()})


# -- the stage --------------------------------------------------------------------------------
class VideoAugParams(StageParams):
    ops: list[str] = Field(default_factory=lambda: [
        "temporal_crop", "frame_rate", "resized_crop", "hflip", "rotate", "color_jitter", "gaussian_blur",
        "gaussian_noise"])
    temporal_crop: TemporalCropPolicy = TemporalCropPolicy()
    frame_rate: FrameRatePolicy = FrameRatePolicy()
    resized_crop: image.ResizedCropPolicy = image.ResizedCropPolicy()
    hflip: OpPolicy = OpPolicy(p=0.5)
    rotate: image.RotatePolicy = image.RotatePolicy()
    color_jitter: image.ColorJitterPolicy = image.ColorJitterPolicy()
    gaussian_noise: image.NoisePolicy = image.NoisePolicy()
    gaussian_blur: image.BlurPolicy = image.BlurPolicy()
    # CPU by default: the clips are tiny, and a replay then needs no GPU to give the same bytes
    device: Literal["auto", "cpu", "cuda"] = "cpu"
    crf: int = Field(28, ge=0, le=51)   # x264 quality of the re-encoded copy

    @field_validator("ops")
    @classmethod
    def _known(cls, ops: list[str]) -> list[str]:
        return check_ops(ops, OPS)


def decode_frames(data: bytes) -> tuple[np.ndarray, float]:
    """Every frame of a cleaned (constant frame rate) clip at its own rate and size: (T, H, W, 3), fps."""
    info = probe(data)
    if info.fps <= 0:
        raise ValueError("the clip's header has no frame rate")   # augment_failed, as any failed op
    clip = decode_clip(data, fps=info.fps, max_side=max(info.width, info.height), max_frames=MAX_FRAMES,
                       max_duration_s=float("inf"))
    return clip.frames, info.fps


def resample(data: bytes, k: int) -> tuple[np.ndarray, float]:
    """The clip's ``video_frames``: ``k`` evenly spaced frames (repeated when it has fewer, as
    cleanup.video does), and its duration in seconds."""
    frames, fps = decode_frames(data)
    return frames[np.linspace(0, len(frames) - 1, k).round().astype(np.int64)], len(frames) / fps


@register_stage
class VideoAugmenter(ModalityAugmenter):
    """Temporal crop, frame-rate jitter and augment.image's ops on augmented copies; mp4 out."""

    name = "augment.video"
    version = 1
    modality = "video"
    Params = VideoAugParams
    OPS = OPS
    reads = ("{modality}", FRAMES, AUG, AUG_PARAMS)
    writes = ("{modality}", FRAMES, AUG_PARAMS, META)

    @classmethod
    def decode(cls, data: bytes, params: VideoAugParams) -> TensorClip:
        import torch

        frames, fps = decode_frames(data)
        tensor = torch.from_numpy(frames).permute(0, 3, 1, 2).to(image.resolve_device(params.device))
        return TensorClip(tensor, fps)

    @classmethod
    def encode(cls, clip: TensorClip, original: bytes, params: VideoAugParams) -> bytes:
        pixels = clip.frames.permute(0, 2, 3, 1).contiguous().cpu().numpy()
        return encode_mp4(pixels, clip.fps, crf=params.crf, reproducible=True)   # replay compares bytes

    def process(self, batch: Batch) -> Batch:
        m = self.modality
        before = batch[m].copy()
        batch = super().process(batch)
        videos, frames = batch[m], batch[FRAMES]
        for i in live_rows(batch, m, redo_only=False):
            if videos[i] is before[i] or frames[i] is None:
                continue   # an original, or a copy no op fired on: its frames are still its clip's
            try:
                picked, duration = resample(videos[i], len(frames_from_bytes(frames[i])))
            except (Reject, ValueError) as exc:
                self.reject(batch, i, "augment_failed", f"{m}: re-sampling frames: {type(exc).__name__}: {exc}")
                continue
            frames[i] = frames_to_bytes(picked)
            update_meta(batch, i, video_duration_s=round(duration, 3))   # temporal ops change it
        return batch
