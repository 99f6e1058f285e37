"""Fuzz: damaged, truncated and foreign files through cleanup.video, on batches built as the runner does.

Every row must end either cleaned (an H.264 mp4 at the configured size and rate, K frames, no
audio track) or rejected with a reason the stage declares; none may end as ``video_error`` (an
exception the cleaner did not anticipate) or hang.
"""
from __future__ import annotations

import io
import json

import av
import numpy as np
import pytest
from PIL import Image

from stages import video as shared
from stages.base import StageContext
from stages.cleanup.audio import AudioCleaner
from stages.cleanup.video import VideoCleaner
from stages.video import FRAMES, encode_mp4, frames_from_bytes
from tests.stages.test_cleanup_fuzz import corrupt_bytes, valid_audio
from tests.stages.test_cleanup_video import SR, audio_only, moving, tone, video_batch, write_video, y4m_header

N_MUTATED = 160
# Lowered so that a flipped size or timestamp field cannot make one row decode for long here.
PARAMS = {"max_pixels": 1_000_000, "max_duration_s": 5.0, "max_side": 32, "fps": 8, "frames": 4}
CONTEXT = {"decode_timeout_s": 5.0}


def python_log_callback() -> bool:
    """Whether decoding leaves PyAV's Python log callback installed (any level but None): FFmpeg's
    frame-threaded decoders call it from their own threads while the caller holds the GIL waiting
    for them, so damaged input deadlocks the worker; no timeout can stop it."""
    shared._av()
    return av.logging.get_level() is not None


hangs = pytest.mark.skipif(python_log_callback(), reason="would deadlock: see test_ffmpeg_logs_stay_in_c")


def test_ffmpeg_logs_stay_in_c():
    assert not python_log_callback(), "stages.video._av must not call av.logging.set_level (deadlocks)"


@pytest.fixture(scope="module")
def seeds() -> list[bytes]:
    frames = moving(18)   # 1.5 s at 12 fps
    times = np.concatenate([[0.0], np.cumsum(np.tile([0.05, 0.15, 0.1], 6)[:17])])
    return [
        encode_mp4(frames, 12.0),
        encode_mp4(frames, 12.0, audio=tone(1.5), sample_rate=SR),
        write_video(frames, "webm", "libvpx-vp9"),
        write_video(frames, times=times),                                            # VFR mkv
        write_video(frames, "mpegts"),
        write_video(frames, "mp4", options={"movflags": "frag_keyframe+empty_moov"}),  # fragmented
    ]


@pytest.fixture(scope="module")
def foreign() -> list[bytes]:
    png = io.BytesIO()
    Image.fromarray(moving(1)[0]).save(png, "PNG")
    return [audio_only("wav"), audio_only("m4a"), png.getvalue(), y4m_header(8000, 6000), y4m_header(30, 20),
            np.random.default_rng(5).bytes(4000), b"\x00" * 64, b"RIFF" + bytes(60)]


def assert_accounted(batch: dict, cleaner: VideoCleaner) -> dict[str, int]:
    """Every row cleaned (and valid) or rejected with a declared reason; the count per outcome."""
    p, outcomes = cleaner.params, {}
    for i in range(len(batch["id"])):
        reason = batch["reject_reason"][i]
        outcomes[reason or "clean"] = outcomes.get(reason or "clean", 0) + 1
        if reason:
            assert reason in cleaner.reject_reasons() and reason != "video_error", \
                f"row {i}: {reason!r}: {batch['reject_detail'][i]}"
            assert batch[FRAMES][i] is None
            continue
        with av.open(io.BytesIO(batch["video"][i])) as container:
            assert [s.type for s in container.streams] == ["video"]
            stream = container.streams.video[0]
            assert stream.codec_context.name == "h264" and float(stream.average_rate) == p.fps
            assert max(stream.codec_context.width, stream.codec_context.height) <= p.max_side
        frames = frames_from_bytes(batch[FRAMES][i])
        assert frames.dtype == np.uint8 and frames.ndim == 4 and frames.shape[0] == p.frames and frames.shape[3] == 3
    return outcomes


@hangs
def test_mutated_clips_end_cleaned_or_rejected(seeds, foreign):
    cleaner = VideoCleaner(PARAMS, StageContext(**CONTEXT))
    values = corrupt_bytes(seeds, N_MUTATED, seed=303, foreign=foreign)
    outcomes = assert_accounted(cleaner(video_batch(values)), cleaner)
    assert outcomes.get("clean", 0) >= len(seeds) and outcomes.get("video_corrupt", 0) > N_MUTATED // 4


@hangs
def test_truncation_at_many_offsets(seeds):
    """A cut anywhere is clean only when it lost next to nothing; cut early it is always a reject
    (mostly ``video_corrupt``; ``video_too_short`` for a stream stating no duration, as MPEG-TS)."""
    cleaner = VideoCleaner(PARAMS, StageContext(**CONTEXT))
    cuts = [(data, int(len(data) * f)) for data in seeds for f in np.linspace(0.0, 0.98, 16)]
    batch = cleaner(video_batch([data[:cut] for data, cut in cuts]))
    assert_accounted(batch, cleaner)
    early = [i for i, (data, cut) in enumerate(cuts) if cut <= len(data) * 0.6]
    assert all(batch["reject_reason"][i] for i in early)
    assert sum(batch["reject_reason"][i] == "video_corrupt" for i in early) > len(early) * 3 // 4


@hangs
def test_foreign_files_get_their_reasons(foreign):
    cleaner = VideoCleaner(PARAMS, StageContext(**CONTEXT))
    batch = cleaner(video_batch([b"", *foreign]))
    assert_accounted(batch, cleaner)
    assert list(batch["reject_reason"]) == [
        "video_corrupt", "video_no_stream", "video_no_stream", "video_too_short", "video_too_large_pixels",
        "video_too_small", "video_corrupt", "video_corrupt", "video_corrupt"]


@hangs
def test_video_then_audio_under_drop_modality(seeds, foreign):
    """The runner's order: the track a video hands over is cleaned by cleanup.audio like any audio."""
    rng = np.random.default_rng(17)
    n = 48
    videos = corrupt_bytes(seeds, n, seed=404, foreign=foreign)
    audios = [audio_only("wav") if rng.random() < 0.3 else None for _ in range(n)]
    context = StageContext(bad_modality="drop_modality", **CONTEXT)
    video_cleaner, audio_cleaner = VideoCleaner(PARAMS, context), AudioCleaner({}, context)
    batch = audio_cleaner(video_cleaner(video_batch(videos, audio=audios)))
    known = video_cleaner.reject_reasons() | audio_cleaner.reject_reasons()
    for i in range(n):
        dropped = json.loads(batch["dropped"][i])
        assert set(dropped.values()) <= set(known) and "video_error" not in dropped.values()
        if batch["reject_reason"][i]:
            assert batch["reject_reason"][i] == "no_modality"
            continue
        if "video" in dropped:
            assert batch["video"][i] is None and batch[FRAMES][i] is None
        if batch["audio"][i] is not None:
            assert valid_audio(batch["audio"][i], audio_cleaner.params)
