"""augment.video: each op alone, one parameter set for every frame, lineage and byte-identical
replay, and the stage over a batch (only copies change; ``video_frames`` follow the new clip)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from pydantic import ValidationError

from stages.augment import replay
from stages.augment.video import TensorClip, VideoAugmenter, decode_frames
from stages.base import StageContext, object_column
from stages.registry import STAGES
from stages.video import FRAMES, encode_mp4, frames_from_bytes, frames_to_bytes

T, H, W, FPS, K = 12, 48, 64, 8.0, 5
IMAGE_OPS = ["resized_crop", "hflip", "rotate", "color_jitter", "gaussian_blur", "gaussian_noise"]


def only(op: str, **policy) -> dict:
    return {"ops": [op], op: {"p": 1.0, **policy}}


def run(stage: VideoAugmenter, data: bytes, seed: int = 0) -> tuple[bytes, list[dict], np.ndarray]:
    """One copy through the stage's draw-and-apply path; checks replay on the way; decoded frames out."""
    out, ops = stage.augment(data, np.random.default_rng(seed))
    assert replay("video", data, ops, stage.params.model_dump()) == out
    return out, ops, decode_frames(out)[0]


def diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    """Left differs from right, and each frame from the next (a bar moves; the level steps up)."""
    y, x = np.mgrid[0:H, 0:W]
    out = []
    for t in range(T):
        img = np.stack([x * 3, y * 4, np.full((H, W), 20 * t)], axis=-1) % 256
        img[:, 4 * t:4 * t + 6] = 255
        out.append(img)
    return np.stack(out).astype(np.uint8)


@pytest.fixture(scope="module")
def clip(frames) -> bytes:
    return encode_mp4(frames, FPS)


@pytest.fixture(scope="module")
def source(clip) -> np.ndarray:
    return decode_frames(clip)[0]   # what the ops start from: the clip as decoded


# -- ops ----------------------------------------------------------------------------------------
def nearest(out: np.ndarray, source: np.ndarray) -> list[int]:
    """For each output frame, the index of the source frame it shows (every source frame differs)."""
    return [int(np.argmin([diff(frame, s) for s in source])) for frame in out]


def test_temporal_crop_keeps_a_contiguous_stretch(clip, source):
    _, ops, out = run(VideoAugmenter(only("temporal_crop", share=(0.5, 0.7))), clip, seed=1)
    (rec,) = ops
    assert rec["op"] == "temporal_crop" and round(0.5 * T) <= rec["length"] <= round(0.7 * T)
    assert nearest(out, source) == list(range(rec["start"], rec["start"] + rec["length"]))


@pytest.mark.parametrize("factor", [0.8, 1.25])
def test_frame_rate_drops_or_repeats_frames(clip, source, factor):
    out_bytes, ops, out = run(VideoAugmenter(only("frame_rate", factor=(factor, factor))), clip)
    assert ops == [{"op": "frame_rate", "factor": factor}]
    assert len(out) == round(T / factor)
    assert nearest(out, source) == np.minimum(np.floor(np.arange(len(out)) * factor), T - 1).astype(int).tolist()
    assert decode_frames(out_bytes)[1] == FPS                           # the rate stays; the speed changes


@pytest.mark.parametrize("op", IMAGE_OPS)
def test_image_op_changes_every_frame_keeps_shape_and_rate(clip, source, op):
    out_bytes, ops, out = run(VideoAugmenter(only(op)), clip)
    assert [rec["op"] for rec in ops] == [op]
    assert out.shape == source.shape and decode_frames(out_bytes)[1] == FPS
    assert min(diff(a, b) for a, b in zip(out, source)) > 1.0


def test_hflip_flips_every_frame(clip, source):
    _, _, out = run(VideoAugmenter(only("hflip")), clip)
    assert diff(out, source[:, :, ::-1]) < 3.0 < diff(out, source)


@pytest.mark.parametrize("op,policy", [("resized_crop", {}), ("hflip", {}), ("rotate", {}), ("color_jitter", {}),
                                       ("gaussian_blur", {"sigma": (1.0, 1.5)})])
def test_one_parameter_set_for_all_frames(frames, op, policy):
    """A still clip stays still, exactly (before encoding): every frame got the same crop, flip,
    angle, colour change or blur."""
    import torch

    still = TensorClip(torch.from_numpy(np.repeat(frames[:1], T, axis=0)).permute(0, 3, 1, 2), FPS)
    stage = VideoAugmenter(only(op, **policy))
    rec = stage.OPS[op].draw(np.random.default_rng(3), getattr(stage.params, op), still, stage)
    out = stage.OPS[op].apply(still, {"op": op, **rec}).frames
    assert out.shape == still.frames.shape and not torch.equal(out[0], still.frames[0])
    assert all(torch.equal(out[0], later) for later in out[1:])


def test_every_op_at_once_replays_byte_identical(clip):
    stage = VideoAugmenter({op: {"p": 1.0} for op in VideoAugmenter.OPS})
    for seed in range(3):
        out, ops, _ = run(stage, clip, seed=seed)
        assert [rec["op"] for rec in ops] == stage.params.ops
        assert out == stage.augment(clip, np.random.default_rng(seed))[0]   # and again


def test_one_frame_clip_skips_temporal_ops(frames):
    still = encode_mp4(frames[:1], FPS)
    out, ops, _ = run(VideoAugmenter({**only("temporal_crop"), "ops": ["temporal_crop", "frame_rate"],
                                      "frame_rate": {"p": 1.0}}), still)
    assert ops == [] and out == still


def test_unknown_op_is_a_config_error():
    with pytest.raises(ValidationError, match="unknown ops"):
        VideoAugmenter({"ops": ["hflip", "reverse"]})


def test_registered_with_its_columns():
    assert STAGES["augment.video"] is VideoAugmenter
    assert FRAMES in VideoAugmenter.columns("reads") and FRAMES in VideoAugmenter.columns("writes")


def test_importing_the_stage_does_not_import_torch():
    code = "import sys, stages.augment.video; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


# -- the stage over a batch ---------------------------------------------------------------------
def make_batch(clip: bytes, frames: np.ndarray) -> dict[str, np.ndarray]:
    """Rows: an original, two copies, a copy without video, a rejected copy."""
    picked = frames_to_bytes(frames[np.linspace(0, T - 1, K).round().astype(int)])
    aug = [0, 1, 2, 1, 1]
    has = [True, True, True, False, True]
    n = len(aug)
    col = lambda v: object_column([v] * n)  # noqa: E731
    batch = {
        "id": col("row0"), "split": col("train"), "aug": np.array(aug, dtype=np.int32), "aug_params": col("{}"),
        "redo": col("video"), "meta": col(json.dumps({"video_duration_s": T / FPS, "video_frames": K})),
        "reject_stage": col(""), "reject_reason": col(""), "reject_detail": col(""),
        "video": object_column([clip if h else None for h in has]),
        FRAMES: object_column([picked if h else None for h in has]),
    }
    batch["id"][3], batch["id"][4] = "row1", "row2"
    batch["reject_stage"][4], batch["reject_reason"][4] = "cleanup.text", "too_short"
    return batch


def test_only_live_copies_with_video_change(clip, frames):
    policy = {op: {"p": 1.0} for op in VideoAugmenter.OPS} | {"temporal_crop": {"p": 1.0, "share": (0.5, 0.6)}}
    batch = make_batch(clip, frames)
    original = {k: v.copy() for k, v in batch.items()}
    out = VideoAugmenter(policy, StageContext(seed=5))(batch)
    for i in (0, 3, 4):                                               # original, no video, rejected
        assert all(out[k][i] == original[k][i] for k in original), i
    for i in (1, 2):
        assert out["video"][i] != clip and out[FRAMES][i] != original[FRAMES][i]
        records = json.loads(out["aug_params"][i])["video"]
        assert replay("video", clip, records) == out["video"][i]
        all_frames, fps = decode_frames(out["video"][i])
        picked = frames_from_bytes(out[FRAMES][i])
        assert picked.shape == (K, H, W, 3)                           # K kept, from the new clip itself
        np.testing.assert_array_equal(picked, all_frames[np.linspace(0, len(all_frames) - 1, K).round().astype(int)])
        meta = json.loads(out["meta"][i])
        assert meta["video_frames"] == K and meta["video_duration_s"] == round(len(all_frames) / fps, 3) < T / FPS
    assert out["video"][1] != out["video"][2]                         # each copy draws its own parameters
    again = VideoAugmenter(policy, StageContext(seed=5))(make_batch(clip, frames))
    assert list(again["video"]) == list(out["video"]) and list(again[FRAMES]) == list(out[FRAMES])


def test_copy_no_op_fired_on_keeps_its_bytes(clip, frames):
    batch = make_batch(clip, frames)
    picked = batch[FRAMES][1]
    out = VideoAugmenter({op: {"p": 0.0} for op in VideoAugmenter.OPS})(batch)
    assert out["video"][1] is clip and out[FRAMES][1] is picked
    assert json.loads(out["aug_params"][1]) == {"video": []}
