"""``cleanup.video``: crawled video bytes -> an H.264 mp4 at one size and frame rate, its K sampled
frames (``video_frames``) and, for a row without audio, its audio track as the row's ``audio``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator

from stages.base import Batch, Cleaned, ModalityCleaner, Reject, StageParams, object_column, update_meta
from stages.media import encode_flac
from stages.registry import register_stage
from stages.video import (FRAMES, Clip, Probe, decode_clip, encode_mp4, frames_to_bytes, gray_differences, gray_small,
                          sample_indices)

X264_PRESETS = Literal["ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow"]
# Decoded clearly shorter than the header says (by both margins): the file was cut short.
TRUNCATED_SHORTFALL_S, TRUNCATED_SHORTFALL_RATIO = 0.5, 0.1
SILENT_TRACK_PEAK = 2.0 ** -15   # below one 16-bit step: a muted track, not a recording


class VideoParams(StageParams):
    max_raw_bytes: int = Field(256 * 1024 * 1024, gt=0)    # video_too_large_bytes, before opening
    min_duration_s: float = Field(1.0, ge=0.0)             # header, then decoded: video_too_short
    max_duration_s: float = Field(60.0, gt=0.0)            # header, then decoded (decoding stops there)
    min_side: int = Field(32, ge=1)                        # header, then decoded: video_too_small
    max_pixels: int = Field(3840 * 2160, gt=0)             # header width*height: video_too_large_pixels
    max_side: int = Field(256, ge=16)                      # output long side (downscale only, even sizes)
    fps: float = Field(8.0, gt=0.0, le=60.0)               # output frame rate (constant)
    frames: int = Field(8, ge=1, le=256)                   # K frames written to video_frames
    sampling: Literal["uniform", "scene"] = "uniform"
    scene_threshold: float = Field(0.08, gt=0.0, le=1.0)   # mean luminance change that counts as a cut
    blank_luma: float = Field(0.03, ge=0.0, le=1.0)        # mean luminance (0..1) below: video_blank "black"
    frozen_motion: float = Field(0.001, ge=0.0, le=1.0)    # mean frame-to-frame change below: "frozen"
    crf: int = Field(28, ge=0, le=51)
    preset: X264_PRESETS = "veryfast"
    audio_track: bool = True                               # a row without audio takes the clip's track
    audio_rate: int = Field(16_000, ge=8000, le=48_000)

    @model_validator(mode="after")
    def _durations(self) -> VideoParams:
        if self.min_duration_s > self.max_duration_s:
            raise ValueError(f"min_duration_s {self.min_duration_s} > max_duration_s {self.max_duration_s}")
        return self


@dataclass
class CleanClip:
    """One cleaned clip: the values of the ``video`` and ``video_frames`` columns, and the track."""

    video: bytes
    frames: bytes
    audio: np.ndarray | None = None    # mono float32 at ``sample_rate``; None: no (audible) track
    sample_rate: int = 0


def check_header(head: Probe, p: VideoParams) -> None:
    """Size and duration as the header states them, before a frame is decoded."""
    w, h = head.width, head.height
    if w <= 0 or h <= 0:
        raise Reject("video_corrupt", f"header size {w}x{h}")
    if w * h > p.max_pixels:
        raise Reject("video_too_large_pixels", f"{w}x{h} = {w * h} pixels > max_pixels {p.max_pixels}")
    if min(w, h) < p.min_side:
        raise Reject("video_too_small", f"header {w}x{h}: shorter side < min_side {p.min_side}")
    if head.duration_s > p.max_duration_s:
        raise Reject("video_too_long", f"header duration {head.duration_s:.1f} s > max_duration_s {p.max_duration_s}")
    if 0 < head.duration_s < p.min_duration_s:
        raise Reject("video_too_short", f"header duration {head.duration_s:.2f} s < min_duration_s {p.min_duration_s}")


def check_decoded(clip: Clip, head: Probe, p: VideoParams) -> float:
    """Truncation, size and duration of what decoded; returns the decoded duration."""
    if clip.meta.get("truncated"):
        raise Reject("video_corrupt", f"truncated: decoding failed after {len(clip.frames)} frames")
    n, h, w = clip.frames.shape[:3]
    duration = n / p.fps
    shortfall = head.duration_s - duration
    if shortfall > TRUNCATED_SHORTFALL_S and shortfall > TRUNCATED_SHORTFALL_RATIO * head.duration_s:
        raise Reject("video_corrupt", f"truncated: {duration:.2f} s decoded of the header's {head.duration_s:.2f} s")
    # Frames are only ever scaled down: an output short side under min_side that was not scaled
    # down (long side below max_side) is the decoded size (less one pixel of even rounding).
    if min(h, w) < p.min_side - 1 and max(h, w) < p.max_side:
        raise Reject("video_too_small", f"decoded {w}x{h}: shorter side < min_side {p.min_side}")
    if duration > p.max_duration_s + 1e-6:   # decoding went past it (it stops one tick after)
        raise Reject("video_too_long", f"more than max_duration_s {p.max_duration_s} s of frames")
    if duration < p.min_duration_s:
        raise Reject("video_too_short", f"{duration:.2f} s decoded < min_duration_s {p.min_duration_s}")
    return duration


def pick_frames(frames: np.ndarray, differences: np.ndarray, p: VideoParams) -> np.ndarray:
    """Exactly ``p.frames`` frames: ``sample_indices``, frames repeated evenly when the clip has fewer."""
    idx = sample_indices(len(frames), p.frames, p.sampling, differences, p.scene_threshold)
    if len(idx) < p.frames:
        idx = idx[np.linspace(0, len(idx) - 1, p.frames).round().astype(int)]
    return frames[idx]


@register_stage
class VideoCleaner(ModalityCleaner):
    """Crawled video bytes -> a normalised H.264 clip, K sampled frames and the audio track; rejects
    broken, tiny, huge, over-long, black or frozen clips.

    A one-frame clip (a still image read as video) has no motion: with ``frozen_motion`` above 0 it
    is rejected ``video_blank`` "frozen", as is any clip whose frames do not change."""

    name = "cleanup.video"
    version = 1
    modality = "video"
    Params = VideoParams
    reads = ("{modality}", "audio")
    writes = ("{modality}", FRAMES, "audio", "meta", "dropped")
    reasons: ClassVar[dict[str, str]] = {
        "video_corrupt": "empty, garbage, undecodable, truncated (an exception mid-file, or clearly shorter "
                         "than the header's duration), or no decodable frame",
        "video_no_stream": "a container without a video stream (an audio-only file)",
        "video_too_large_bytes": "raw bytes longer than max_raw_bytes; checked before opening",
        "video_too_large_pixels": "header width*height above max_pixels; checked before decoding a frame",
        "video_too_small": "shorter side below min_side (header, then decoded)",
        "video_too_short": "duration below min_duration_s (header when it has one, then decoded)",
        "video_too_long": "duration above max_duration_s (header when it has one, then decoded; decoding stops there)",
        "video_blank": "mean luminance below blank_luma (black) or mean frame-to-frame change below "
                       "frozen_motion (frozen; a one-frame clip counts as frozen)",
    }

    @classmethod
    def derives(cls, params: dict[str, Any]) -> dict[str, str]:
        """With ``audio_track``, a row without audio gets its clip's track as ``audio``."""
        return {"audio": "video"} if cls.Params.model_validate(params).audio_track else {}

    def clean(self, value: Any) -> Cleaned:
        p: VideoParams = self.params
        if not isinstance(value, (bytes, bytearray, memoryview)) or len(value) == 0:
            raise Reject("video_corrupt", "empty or not bytes")
        if len(value) > p.max_raw_bytes:
            raise Reject("video_too_large_bytes", f"{len(value)} bytes > max_raw_bytes {p.max_raw_bytes}")
        data = bytes(value)
        # decode_clip turns every FFmpeg error into video_corrupt itself
        clip = decode_clip(data, fps=p.fps, max_side=p.max_side, max_frames=int(p.max_duration_s * p.fps) + 2,
                           max_duration_s=p.max_duration_s, audio_rate=p.audio_rate if p.audio_track else 0,
                           max_audio_samples=int(p.max_duration_s * p.audio_rate),
                           check=lambda header: check_header(header, p))
        head = clip.probe
        duration = check_decoded(clip, head, p)
        gray = gray_small(clip.frames)
        differences = gray_differences(gray)
        luma = float(gray.mean())
        motion = float(differences.mean()) if len(differences) else 0.0
        if luma < p.blank_luma:
            raise Reject("video_blank", f"black: mean luma {luma:.3f} < blank_luma {p.blank_luma}")
        if motion < p.frozen_motion:
            raise Reject("video_blank", f"frozen: mean frame change {motion:.5f} over {len(clip.frames)} frames "
                                        f"< frozen_motion {p.frozen_motion}")
        picked = pick_frames(clip.frames, differences, p)
        audio = clip.audio
        audible = audio is not None and audio.size > 0 and float(np.max(np.abs(audio))) >= SILENT_TRACK_PEAK
        h, w = clip.frames.shape[1:3]
        meta = {
            "duration_s": round(duration, 3), "fps": p.fps, "width": w, "height": h, "frames": len(picked),
            "luma": round(luma, 4), "motion": round(motion, 5), "src_fps": clip.meta.get("src_fps", head.fps),
            "src_width": head.width, "src_height": head.height, "src_codec": head.codec,
            "src_duration_s": round(head.duration_s, 3),
            "audio_track": "none" if audio is None else "audible" if audible else "silent",
        }
        # reproducible: the same input cleans to the same bytes in every process (content hashes hold)
        out = CleanClip(encode_mp4(clip.frames, p.fps, crf=p.crf, preset=p.preset, reproducible=True), frames_to_bytes(picked),
                        audio if audible else None, clip.sample_rate)
        return Cleaned(out, meta)

    def process(self, batch: Batch) -> Batch:
        """The base loop and policy, then each cleaned clip spread over its columns."""
        if FRAMES not in batch:
            batch[FRAMES] = object_column([None] * len(batch[self.modality]))
        batch = super().process(batch)
        videos = batch[self.modality]
        for i, value in enumerate(videos):
            if not isinstance(value, CleanClip):
                continue
            videos[i], batch[FRAMES][i] = value.video, value.frames
            # A row's own audio wins; a muted track is never attached (cleanup.audio would reject it).
            if value.audio is not None and batch["audio"][i] is None:
                batch["audio"][i] = encode_flac(value.audio, value.sample_rate)
                update_meta(batch, i, audio_from_video=True)
        return batch

    def bad_modality(self, batch: Batch, i: int, reason: str, detail: str) -> None:
        batch[FRAMES][i] = None
        super().bad_modality(batch, i, reason, detail)
