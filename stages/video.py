"""Decoding, encoding and frame sampling for video, shared by the video stages (PyAV: its wheels
bundle FFmpeg, so nothing is installed on the system).

In flight a video row carries two columns: ``video``, the cleaned clip as H.264 mp4 bytes (one
resolution and frame rate, no audio: a clip's audio track becomes the row's ``audio``), and
``video_frames``, its K sampled frames as ``.npy`` bytes of a uint8 array (K, H, W, 3), RGB.
Dedup, augmentation and the encoders read the frames; the shards keep both.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable, Literal

import numpy as np

from stages.base import BudgetedBytes, Reject, check_deadline

FRAMES = "video_frames"     # batch column: the sampled frames of the row's clip (npy bytes)
# What PyAV / FFmpeg raise on damaged or hostile input (av.FFmpegError subclasses OSError / ValueError).
DECODE_ERRORS = (OSError, ValueError, EOFError, RuntimeError, IndexError, ZeroDivisionError, MemoryError)


@dataclass
class Probe:
    """What a container's header says (it may lie: decoding checks the real frames again)."""

    width: int
    height: int
    fps: float                 # average frame rate; 0 when the header does not say
    duration_s: float          # 0 when unknown
    has_audio: bool
    codec: str


@dataclass
class Clip:
    frames: np.ndarray                         # (T, H, W, 3) uint8 RGB at ``fps``
    fps: float
    audio: np.ndarray | None = None            # mono float32 at ``sample_rate`` (the audio track)
    sample_rate: int = 0
    meta: dict[str, float] = field(default_factory=dict)
    probe: Probe | None = None                 # the container's header


def codec_threads() -> int:
    """Threads for FFmpeg's decoders and x264: the CPUs Ray gave this actor (OMP_NUM_THREADS, as
    ``stages.base.match_library_threads`` does for OpenCV); 0 (FFmpeg's choice: every core) elsewhere."""
    threads = os.environ.get("OMP_NUM_THREADS", "")
    return int(threads) if threads.isdigit() else 0


def _av():
    import av   # imported where video is decoded, not by every process that imports the stages

    # PyAV's default log level (None) drops FFmpeg's messages in C. Any other level installs a
    # Python callback that frame-threaded decoders call without the GIL: a deadlock on damaged input.
    return av


def _why(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]


def probe(data: bytes) -> Probe:
    """The header of ``data``; ``video_corrupt`` when it is not a container, ``video_no_stream``
    when it has no video stream (an audio-only file)."""
    av = _av()
    try:
        with av.open(BudgetedBytes(data), mode="r") as container:
            return _probe(container)
    except Reject:
        raise
    except (*DECODE_ERRORS, av.FFmpegError) as exc:
        raise Reject("video_corrupt", _why(exc)) from None


def _probe(container) -> Probe:
    if not container.streams.video:
        raise Reject("video_no_stream", f"streams: {[s.type for s in container.streams] or 'none'}")
    stream = container.streams.video[0]
    if stream.codec_context is None:
        raise Reject("video_corrupt", "no decoder for the video stream's codec")
    rate = stream.average_rate or stream.guessed_rate or 0
    duration = 0.0
    if stream.duration and stream.time_base:
        duration = float(stream.duration * stream.time_base)
    elif container.duration:
        duration = container.duration / 1_000_000
    ctx = stream.codec_context
    return Probe(width=int(ctx.width or 0), height=int(ctx.height or 0), fps=float(rate),
                 duration_s=duration, has_audio=bool(container.streams.audio),
                 codec=str(ctx.name or ""))


def _target_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """Width and height scaled so the longer side is at most ``max_side``, both even (yuv420p)."""
    scale = min(1.0, max_side / max(width, height))
    return max(2, int(round(width * scale / 2)) * 2), max(2, int(round(height * scale / 2)) * 2)


def decode_clip(data: bytes, *, fps: float, max_side: int, max_frames: int, max_duration_s: float,
                audio_rate: int = 0, max_audio_samples: int = 0, check: Callable[[Probe], None] | None = None) -> Clip:
    """The clip resampled to ``fps`` (the latest decoded frame at each output tick: variable frame
    rates come out constant) and scaled to at most ``max_side``; with ``audio_rate``, its first
    audio track as mono float32 at that rate. Stops at ``max_duration_s`` / ``max_frames`` and
    checks the sample's deadline on every read and frame. ``check`` sees the header before any
    frame is decoded (and may raise ``Reject``): the file is opened once."""
    av = _av()
    frames: list[np.ndarray] = []
    waves: list[np.ndarray] = []
    audio_samples = 0
    try:
        with av.open(BudgetedBytes(data), mode="r") as container:
            info = _probe(container)
            if check is not None:
                check(info)
            vstream = container.streams.video[0]
            vstream.thread_type = "AUTO"
            vstream.thread_count = codec_threads()
            astream = container.streams.audio[0] if audio_rate and container.streams.audio else None
            resampler = av.AudioResampler(format="flt", layout="mono", rate=audio_rate) if astream else None
            size = None
            next_tick, step = 0.0, 1.0 / fps
            last = None
            streams = [vstream] + ([astream] if astream else [])
            origin: dict[int, float] = {}   # per stream: the first frame's time (ts files start late)
            done: set[int] = set()          # streams read up to max_duration_s / max_frames
            for packet in container.demux(*streams):
                check_deadline()
                index = packet.stream.index
                if index in done:           # demuxed, never decoded
                    continue
                for frame in packet.decode():
                    if frame.time is not None and frame.time - origin.setdefault(index, frame.time) > max_duration_s + step:
                        done.add(index)
                        continue
                    if isinstance(frame, av.AudioFrame):
                        if audio_samples >= max_audio_samples > 0:
                            done.add(index)
                            continue
                        for out in resampler.resample(frame):
                            wave = out.to_ndarray().reshape(-1)
                            waves.append(wave)
                            audio_samples += wave.size
                        continue
                    if size is None:
                        size = _target_size(frame.width, frame.height, max_side)
                    t = frame.time - origin[index] if frame.time is not None else len(frames) * step
                    picture = None
                    while t + 1e-6 >= next_tick and len(frames) < max_frames:
                        if picture is None:
                            picture = frame.reformat(width=size[0], height=size[1], format="rgb24").to_ndarray()
                        frames.append(picture)
                        next_tick += step
                    if len(frames) >= max_frames:
                        done.add(index)
                    last = frame
                if len(done) == len(streams):   # the rest of a long file is never read
                    break
            if last is not None and not frames:   # one frame only, or timestamps all before tick 0
                frames.append(last.reformat(width=size[0], height=size[1], format="rgb24").to_ndarray())
    except Reject:
        raise
    except (*DECODE_ERRORS, av.FFmpegError) as exc:
        if not frames:
            raise Reject("video_corrupt", _why(exc)) from None
        # a truncated tail: what decoded before the damage is the clip, recorded in meta
        info_meta = {"truncated": 1.0}
    else:
        info_meta = {}
    if not frames:
        raise Reject("video_corrupt", "no decodable frame")
    audio = np.concatenate(waves).astype(np.float32) if waves else None
    if audio is not None and max_audio_samples:
        audio = audio[:max_audio_samples]
    return Clip(frames=np.stack(frames), fps=fps, audio=audio, sample_rate=audio_rate if audio is not None else 0,
                meta={"src_width": float(info.width), "src_height": float(info.height),
                      "src_fps": round(info.fps, 3), **info_meta}, probe=info)


def encode_mp4(frames: np.ndarray | None, fps: float, *, crf: int = 28, preset: str = "veryfast",
               audio: np.ndarray | None = None, sample_rate: int = 0, reproducible: bool = False,
               container_format: str = "mp4") -> bytes:
    """(T, H, W, 3) uint8 RGB at ``fps`` -> H.264 mp4 bytes (yuv420p; odd sizes are cropped by one
    pixel); with ``audio`` (mono float32 at ``sample_rate``) an AAC track too, and with
    ``frames=None`` that track alone (tests, the demo's audio-only file).
    ``reproducible``: the same bytes from the same frames on every run, whatever the process's
    thread budget (cleaned clips, augment.video's replay); still scenes cost a few more bits."""
    av = _av()
    out = io.BytesIO()
    with av.open(out, mode="w", format=container_format) as container:
        stream = astream = None   # both streams exist before the first packet is muxed
        if frames is not None:
            frames = frames[:, : frames.shape[1] // 2 * 2, : frames.shape[2] // 2 * 2]
            stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
            options = {"crf": str(crf), "preset": preset, "threads": str(codec_threads())}
            if reproducible:
                # x264 writes its thread count into the stream, and its macroblock-tree pass (the AVX-512
                # code) reads uninitialised memory at some widths: the same frames came out as other bytes
                options |= {"threads": "1", "x264-params": "mbtree=0"}
            stream.options = options
        if audio is not None:
            astream = container.add_stream("aac", rate=sample_rate)
            astream.layout = "mono"
        if stream is not None:
            for picture in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(picture), format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        if astream is not None:
            wave = np.asarray(audio, dtype=np.float32)
            for start in range(0, wave.size, 1024):
                chunk = av.AudioFrame.from_ndarray(wave[None, start:start + 1024].copy(), format="fltp", layout="mono")
                chunk.sample_rate, chunk.pts = sample_rate, start
                for packet in astream.encode(chunk):
                    container.mux(packet)
            for packet in astream.encode():
                container.mux(packet)
    return out.getvalue()


def frames_to_bytes(frames: np.ndarray) -> bytes:
    """The ``video_frames`` cell: an ``.npy`` file (what ``webdataset`` and numpy read as is)."""
    out = io.BytesIO()
    np.save(out, np.ascontiguousarray(frames, dtype=np.uint8), allow_pickle=False)
    return out.getvalue()


def frames_from_bytes(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def gray_small(frames: np.ndarray, side: int = 32) -> np.ndarray:
    """Frames as float32 luminance (0..1) on a coarse grid, for motion and scene statistics."""
    t, h, w, _ = frames.shape
    ys = np.linspace(0, h - 1, min(side, h)).astype(int)
    xs = np.linspace(0, w - 1, min(side, w)).astype(int)
    small = frames[:, ys][:, :, xs].astype(np.float32)
    return (small @ np.array([0.299, 0.587, 0.114], np.float32)) / 255.0


def frame_differences(frames: np.ndarray) -> np.ndarray:
    """Mean absolute luminance change between consecutive frames, (T-1,), 0..1."""
    gray = gray_small(frames)
    return gray_differences(gray)


def gray_differences(gray: np.ndarray) -> np.ndarray:
    """``frame_differences`` of frames already made luminance by ``gray_small``."""
    return np.abs(np.diff(gray, axis=0)).mean(axis=(1, 2)) if len(gray) > 1 else np.zeros(0, np.float32)


def sample_indices(n: int, k: int, mode: Literal["uniform", "scene"] = "uniform",
                   differences: np.ndarray | None = None, scene_threshold: float = 0.08) -> np.ndarray:
    """Which of ``n`` frames to keep, ``k`` at most, in order.

    ``uniform``: evenly spaced over the clip. ``scene``: the first frame of every scene (a cut is a
    frame-to-frame change above ``scene_threshold``, PySceneDetect's ContentDetector idea on the
    differences this stage computes anyway) plus uniform fill; the largest cuts first when there
    are more scenes than ``k``."""
    if n <= k:
        return np.arange(n)
    uniform = np.linspace(0, n - 1, k).round().astype(int)
    if mode == "uniform" or differences is None or not len(differences):
        return uniform
    cuts = np.flatnonzero(differences > scene_threshold) + 1
    if len(cuts) > k - 1:
        cuts = np.sort(cuts[np.argsort(-differences[cuts - 1], kind="stable")[: k - 1]])
    chosen = [0, *cuts.tolist()]
    for i in uniform:   # fill with uniform picks farthest from those already chosen
        if len(chosen) >= k:
            break
        if i not in chosen:
            chosen.append(int(i))
    return np.array(sorted(set(chosen))[:k])
