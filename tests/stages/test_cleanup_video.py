"""cleanup.video: every reject reason, normalisation (size, rate, K frames), frame sampling, the
audio track, the drop_modality policy, the decode budget, variable frame rates and other containers."""
from __future__ import annotations

import io
import json
from fractions import Fraction

import av
import numpy as np
import pytest
import soundfile as sf

from stages import base
from stages import video as video_lib
from stages.base import StageContext, object_column
from stages.cleanup.audio import AudioCleaner
from stages.cleanup.video import VideoCleaner
from stages.registry import STAGES
from stages.video import FRAMES, Probe, decode_clip, encode_mp4, frames_from_bytes, probe
from tests.stages.helpers import Clock, make_batch, reason_of

SR = 16_000


# -- tiny clips ---------------------------------------------------------------------------------
def moving(n: int, h: int = 48, w: int = 64, background: tuple[int, int, int] = (90, 110, 70),
           seed: int = 0) -> np.ndarray:
    """n frames: a textured background and a box that moves two pixels a frame."""
    rng = np.random.default_rng(seed)
    base_frame = np.clip(np.array(background) + rng.integers(-20, 20, (h, w, 1)), 0, 255).astype(np.uint8)
    frames = np.repeat(base_frame[None], n, axis=0)
    for t in range(n):
        x = (2 * t) % (w - 12)
        frames[t, h // 4: h // 4 + 16, x: x + 12] = (230, 60, 40)
    return frames


def tone(seconds: float, sr: int = SR, freq: float = 440.0) -> np.ndarray:
    return (0.3 * np.sin(2 * np.pi * freq * np.arange(int(seconds * sr)) / sr)).astype(np.float32)


def write_video(frames: np.ndarray, fmt: str = "matroska", codec: str = "libx264", fps: float = 12.0,
                times: np.ndarray | None = None, options: dict | None = None) -> bytes:
    """Frames written with PyAV directly (containers and codecs encode_mp4 does not make); with
    ``times`` (seconds), frames at those timestamps: a variable frame rate."""
    out = io.BytesIO()
    with av.open(out, mode="w", format=fmt, options=options or {}) as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        if times is not None:
            stream.time_base = Fraction(1, 1000)
        for i, picture in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
            if times is not None:
                frame.pts, frame.time_base = round(times[i] * 1000), Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out.getvalue()


def audio_only(fmt: str) -> bytes:
    if fmt == "wav":
        buf = io.BytesIO()
        sf.write(buf, tone(1.0), SR, format="WAV")
        return buf.getvalue()
    return encode_mp4(None, 0, audio=tone(1.0), sample_rate=SR, container_format="ipod")   # .m4a


def y4m_header(width: int, height: int) -> bytes:
    """A raw-video container whose header claims ``width`` x ``height`` (one partial frame follows)."""
    return f"YUV4MPEG2 W{width} H{height} F12:1 Ip A1:1 C420jpeg\nFRAME\n".encode() + bytes(4096)


def video_batch(videos: list, audio: list | None = None, text: list | None = None) -> dict:
    """A runner-shaped batch with ``video`` and ``video_frames`` columns."""
    n = len(videos)
    batch = make_batch(audio=list(audio or [None] * n), text=list(text or [None] * n))
    batch["video"] = object_column(list(videos))
    batch[FRAMES] = object_column([None] * n)
    batch["redo"] = object_column(["image,text,audio,video"] * n)
    return batch


def rejects(batch: dict) -> dict[int, str]:
    return {i: batch["reject_reason"][i] for i in range(len(batch["id"])) if batch["reject_reason"][i]}


def meta(batch: dict, i: int) -> dict:
    return json.loads(batch["meta"][i])


def header_says(monkeypatch, **fields) -> None:
    """The header cleanup.video reads reports ``fields`` instead of the truth (headers lie)."""
    real = video_lib._probe

    def lying(container) -> Probe:
        head = real(container)
        for key, value in fields.items():
            setattr(head, key, value)
        return head

    monkeypatch.setattr(video_lib, "_probe", lying)


@pytest.fixture(scope="module")
def clip() -> bytes:
    return encode_mp4(moving(24), 12.0)              # 64x48, 2 s at 12 fps


@pytest.fixture(scope="module")
def clip_with_audio() -> bytes:
    return encode_mp4(moving(24), 12.0, audio=tone(2.0), sample_rate=SR)


# -- normalisation --------------------------------------------------------------------------------
def test_registered_with_its_columns():
    assert STAGES["cleanup.video"] is VideoCleaner
    assert {"video", FRAMES, "audio"} <= VideoCleaner.columns("writes")
    assert {"video_error", "decode_timeout", "video_corrupt"} <= set(VideoCleaner.reject_reasons())


def test_normalises_size_rate_and_frames(clip):
    cleaner = VideoCleaner({"max_side": 32, "fps": 8, "frames": 4})
    batch = cleaner(video_batch([clip]))
    assert rejects(batch) == {}
    head = probe(batch["video"][0])
    assert (head.codec, head.width, head.height, head.fps, head.has_audio) == ("h264", 32, 24, 8.0, False)
    assert head.duration_s == pytest.approx(2.0, abs=0.13)
    frames = np.load(io.BytesIO(batch[FRAMES][0]), allow_pickle=False)
    assert frames.shape == (4, 24, 32, 3) and frames.dtype == np.uint8
    m = meta(batch, 0)
    assert (m["video_width"], m["video_height"], m["video_fps"], m["video_frames"]) == (32, 24, 8.0, 4)
    assert (m["video_src_width"], m["video_src_height"], m["video_src_fps"]) == (64, 48, 12.0)
    assert m["video_duration_s"] == pytest.approx(2.0) and m["video_motion"] > 0.001
    assert "audio_from_video" not in m and batch["audio"][0] is None


def test_small_clips_are_not_upscaled_and_short_ones_repeat_frames(clip):
    out = VideoCleaner({"max_side": 128, "fps": 8, "frames": 24}).clean(clip)
    frames = frames_from_bytes(out.value.frames)
    assert frames.shape == (24, 48, 64, 3)                         # 16 ticks, repeated to K
    assert len({f.tobytes() for f in frames}) == 16


# -- reasons --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("make", "params", "reason"), [
    (lambda c: b"", {}, "video_corrupt"),
    (lambda c: "not bytes", {}, "video_corrupt"),
    (lambda c: np.random.default_rng(0).bytes(5000), {}, "video_corrupt"),
    (lambda c: c[: len(c) // 2], {}, "video_corrupt"),                       # mp4 cut before its moov
    (lambda c: audio_only("wav"), {}, "video_no_stream"),
    (lambda c: audio_only("m4a"), {}, "video_no_stream"),
    (lambda c: c, {"max_raw_bytes": 1000}, "video_too_large_bytes"),
    (lambda c: y4m_header(8000, 6000), {}, "video_too_large_pixels"),
    (lambda c: c, {"min_side": 64}, "video_too_small"),
    (lambda c: c, {"min_duration_s": 3.0, "max_duration_s": 10.0}, "video_too_short"),
    (lambda c: c, {"max_duration_s": 1.5, "min_duration_s": 0.5}, "video_too_long"),
    (lambda c: encode_mp4(np.zeros((16, 48, 64, 3), np.uint8), 8.0), {}, "video_blank"),
    (lambda c: encode_mp4(np.repeat(moving(1), 16, axis=0), 8.0), {}, "video_blank"),
])
def test_each_reason(clip, make, params, reason):
    assert reason_of(VideoCleaner(params), make(clip)) == reason


def test_header_checks_come_before_decoding(monkeypatch, clip):
    # the first decoded frame is sized by _target_size: the header check must come before it
    monkeypatch.setattr(video_lib, "_target_size", lambda *a, **k: pytest.fail("decoded a frame"))
    assert reason_of(VideoCleaner(), y4m_header(8000, 6000)) == "video_too_large_pixels"
    assert reason_of(VideoCleaner({"max_duration_s": 1.0, "min_duration_s": 0.5}), clip) == "video_too_long"
    assert reason_of(VideoCleaner({"min_side": 50}), clip) == "video_too_small"


@pytest.mark.parametrize(("lie", "params", "reason"), [
    ({"duration_s": 0.0}, {"max_duration_s": 1.0, "min_duration_s": 0.5}, "video_too_long"),
    ({"duration_s": 0.0}, {"min_duration_s": 2.5, "max_duration_s": 10.0}, "video_too_short"),
    ({"width": 640, "height": 480}, {"min_side": 56, "max_side": 256}, "video_too_small"),
    ({"duration_s": 6.0}, {}, "video_corrupt"),           # far shorter than the header says: truncated
])
def test_decoded_clip_is_checked_again_when_the_header_lies(monkeypatch, clip, lie, params, reason):
    header_says(monkeypatch, **lie)
    with pytest.raises(base.Reject) as info:
        VideoCleaner(params).clean(clip)
    assert info.value.reason == reason and not info.value.detail.startswith("header")


def test_blank_details_say_black_or_frozen(clip):
    black = encode_mp4(np.full((16, 48, 64, 3), 3, np.uint8), 8.0)
    frozen = encode_mp4(np.repeat(moving(1), 16, axis=0), 8.0)
    still = encode_mp4(moving(1), 8.0)                          # one frame: judged frozen
    for data, word, params in ((black, "black", {}), (frozen, "frozen", {}), (still, "frozen", {"min_duration_s": 0})):
        with pytest.raises(base.Reject) as info:
            VideoCleaner(params).clean(data)
        assert info.value.reason == "video_blank" and info.value.detail.startswith(word)
    assert VideoCleaner({"frozen_motion": 0, "min_duration_s": 0}).clean(still).meta["motion"] == 0.0


def test_a_truncated_webm_that_decodes_its_head_is_corrupt():
    webm = write_video(moving(24), "webm", "libvpx-vp9")
    with pytest.raises(base.Reject) as info:
        VideoCleaner().clean(webm[: len(webm) * 2 // 3])
    assert info.value.reason == "video_corrupt" and "truncated" in info.value.detail


# -- sampling -------------------------------------------------------------------------------------
def test_scene_sampling_keeps_the_first_frame_of_each_scene():
    cuts = [0, 5, 16]                                     # three scenes of 5, 11 and 8 frames at 8 fps
    scenes = [moving(b - a, background=bg, seed=k) for k, (a, b, bg) in
              enumerate(zip(cuts, [5, 16, 24], [(40, 40, 160), (200, 200, 60), (60, 160, 60)]))]
    data = encode_mp4(np.concatenate(scenes), 8.0, crf=18)
    reference = decode_clip(data, fps=8, max_side=256, max_frames=100, max_duration_s=60).frames

    def picked(sampling: str) -> list[int]:
        frames = frames_from_bytes(VideoCleaner({"frames": 4, "sampling": sampling}).clean(data).value.frames)
        return [int(np.argmin([np.abs(f.astype(int) - r).sum() for r in reference])) for f in frames]

    assert picked("uniform") == [0, 8, 15, 23]
    scene = picked("scene")
    assert set(cuts) <= set(scene) and len(scene) == 4 and scene == sorted(scene)


# -- the audio track ------------------------------------------------------------------------------
def test_a_row_without_audio_takes_the_clips_track(clip_with_audio):
    own = audio_only("wav")
    cleaner = VideoCleaner({"audio_rate": 8000})
    batch = cleaner(video_batch([clip_with_audio, clip_with_audio], audio=[None, own]))
    assert rejects(batch) == {}
    info = sf.info(io.BytesIO(batch["audio"][0]))
    assert (info.format, info.samplerate, info.channels) == ("FLAC", 8000, 1)
    assert info.duration == pytest.approx(2.0, abs=0.1)
    assert meta(batch, 0)["audio_from_video"] is True and meta(batch, 0)["video_audio_track"] == "audible"
    assert batch["audio"][1] is own and "audio_from_video" not in meta(batch, 1)
    assert not probe(batch["video"][0]).has_audio                  # the cleaned clip carries no track
    batch = AudioCleaner()(batch)                                  # cleanup.audio cleans it like any audio
    assert rejects(batch) == {} and sf.info(io.BytesIO(batch["audio"][0])).samplerate == SR


def test_no_track_is_taken_when_off_or_muted(clip_with_audio):
    batch = VideoCleaner({"audio_track": False})(video_batch([clip_with_audio]))
    assert rejects(batch) == {} and batch["audio"][0] is None
    muted = encode_mp4(moving(24), 12.0, audio=np.zeros(2 * SR, np.float32), sample_rate=SR)
    batch = VideoCleaner()(video_batch([muted]))
    assert batch["audio"][0] is None and meta(batch, 0)["video_audio_track"] == "silent"


# -- policy and budget ----------------------------------------------------------------------------
def test_drop_modality_clears_both_video_columns(clip):
    videos = [b"garbage", b"garbage", clip]
    batch = video_batch(videos, text=["a caption", None, None])
    batch = VideoCleaner({}, StageContext(bad_modality="drop_modality"))(batch)
    assert batch["video"][0] is None and batch[FRAMES][0] is None and batch["reject_reason"][0] == ""
    assert json.loads(batch["dropped"][0]) == {"video": "video_corrupt"}
    assert rejects(batch) == {1: "no_modality"}
    assert batch[FRAMES][2] is not None

    batch = VideoCleaner()(video_batch(videos))                     # reject_sample: the row goes
    assert rejects(batch) == {0: "video_corrupt", 1: "video_corrupt"} and batch[FRAMES][0] is None


def test_a_slow_clip_is_stopped_mid_file_and_the_next_one_is_cleaned(monkeypatch, clip):
    noise = np.random.default_rng(0).integers(0, 256, (48, 48, 64, 3), dtype=np.uint8)
    slow = encode_mp4(noise, 12.0, crf=10)                          # 48 incompressible packets
    cleaner = VideoCleaner({}, StageContext(decode_timeout_s=10))
    clock = Clock(step=1.0)
    monkeypatch.setattr(base.time, "monotonic", clock)
    batch = cleaner(video_batch([slow]))
    assert rejects(batch) == {0: "decode_timeout"} and "decode_timeout_s 10" in batch["reject_detail"][0]
    assert clock.readings < 20                                      # stopped mid-file
    monkeypatch.setattr(base.time, "monotonic", Clock(step=1e-4))
    batch = cleaner(video_batch([slow, clip]))
    assert rejects(batch) == {}


# -- containers and timing ------------------------------------------------------------------------
def test_variable_frame_rate_comes_out_constant():
    gaps = [0.05, 0.3, 0.05, 0.05, 0.4, 0.1, 0.1, 0.2, 0.05, 0.25, 0.1, 0.15, 0.05, 0.3]
    times = np.concatenate([[0.0], np.cumsum(gaps)])                # 15 irregular frames over 2.15 s
    vfr = write_video(moving(len(times)), times=times)
    out = VideoCleaner({"fps": 8}).clean(vfr)
    with av.open(io.BytesIO(out.value.video)) as container:
        stamps = [frame.time for frame in container.decode(video=0)]
    assert np.allclose(np.diff(stamps), 1 / 8) and len(stamps) == out.meta["duration_s"] * 8 == 18  # ticks 0..2.125


def test_webm_vp9_decodes():
    webm = write_video(moving(24), "webm", "libvpx-vp9")
    out = VideoCleaner({"fps": 8}).clean(webm)
    assert out.meta["src_codec"] == "vp9" and probe(out.value.video).codec == "h264"
    assert frames_from_bytes(out.value.frames).shape == (8, 48, 64, 3)


def test_a_clip_that_starts_late_is_timed_from_its_first_frame():
    late = write_video(moving(24), "mpegts", times=20.0 + np.arange(24) / 12)   # as cut from a broadcast
    assert VideoCleaner({"max_duration_s": 10}).clean(late).meta["duration_s"] == pytest.approx(2.0, abs=0.2)


def test_decoding_stops_at_max_duration(monkeypatch):
    long_clip = encode_mp4(moving(240), 24.0)                       # 10 s
    header_says(monkeypatch, duration_s=0.0)                        # a header without a duration
    checks = []
    monkeypatch.setattr(video_lib, "check_deadline", lambda: checks.append(1) or base.check_deadline())
    assert reason_of(VideoCleaner({"max_duration_s": 1.0, "min_duration_s": 0.5}), long_clip) == "video_too_long"
    assert len(checks) < 240 / 4                                    # one check per packet: far from all 240
