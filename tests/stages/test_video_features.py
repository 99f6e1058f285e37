"""features.video: the weight-free "framestats" encoder, the stages (they read ``video_frames``) and
the pretrained encoders, loaded offline from tiny random models saved in the test."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import stages.features.video  # noqa: F401  (registers the video encoders and stages)
from stages.base import object_column
from stages.features import ENCODERS, MissingWeights, feature_dim, get_encoder, plan_feature_stages
from stages.registry import get_stage
from stages.video import FRAMES, encode_mp4, frames_to_bytes

SIDE = 48


def moving_square(axis: str, rng: np.random.Generator, n: int = 8) -> np.ndarray:
    """A square of random colour and size crossing a noisy frame along ``axis``, either way."""
    frames = rng.integers(0, 40, (n, SIDE, SIDE, 3)).astype(np.uint8)
    size = int(rng.integers(6, 12))
    across = int(rng.integers(0, SIDE - size))
    path = np.linspace(int(rng.integers(0, 8)), SIDE - size - int(rng.integers(0, 8)), n).round().astype(int)
    if rng.random() < 0.5:
        path = path[::-1]
    for t, along in enumerate(path):
        y, x = (across, along) if axis == "x" else (along, across)
        frames[t, y:y + size, x:x + size] = rng.integers(120, 255, 3)
    return frames


def clips(count: int = 3, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [frames_to_bytes(moving_square("xy"[k % 2], rng, n=int(rng.integers(3, 12)))) for k in range(count)]


def make_batch(frames: list[bytes | None]) -> dict[str, np.ndarray]:
    """As cleanup.video leaves it: the mp4 in ``video`` (not read by the encoders), frames beside it."""
    n = len(frames)
    video = [None if f is None else encode_mp4(np.zeros((2, 32, 32, 3), np.uint8), 8) for f in frames]
    batch = {m: object_column([None] * n) for m in ("image", "text", "audio")}
    batch["video"], batch[FRAMES] = object_column(video), object_column(frames)
    batch["id"] = object_column([f"r{i}" for i in range(n)])
    batch["redo"] = object_column(["image,text,audio,video"] * n)
    for col in ("reject_stage", "reject_reason", "reject_detail"):
        batch[col] = object_column([""] * n)
    batch["meta"] = object_column(["{}"] * n)
    return batch


def nearest_centroid_accuracy(x: np.ndarray, y: np.ndarray) -> float:
    """Centroids from the even rows of each class, scored on the odd ones."""
    train = np.arange(len(y)) // 2 % 2 == 0
    classes = np.unique(y)
    centroids = np.stack([x[train & (y == c)].mean(axis=0) for c in classes])
    nearest = np.linalg.norm(x[~train, None] - centroids[None], axis=2).argmin(axis=1)
    return float((classes[nearest] == y[~train]).mean())


# -- framestats ---------------------------------------------------------------------------------
def test_registered():
    assert {"framestats", "torchvision_video", "hf_video"} <= set(ENCODERS["video"])
    for name in ("features.video", "features.video.prep"):
        stage = get_stage(name)
        assert stage.modality == "video" and FRAMES in stage.columns("reads")


@pytest.mark.parametrize("options,dim", [
    ({}, 2 * (4 * 9 + 8 * 3 * 3) + 7 + 4 + 16),
    ({"grid": 3, "orientation_bins": 8, "hsv_bins": [4, 2, 2], "direction_bins": 6, "motion_grid": 2},
     2 * (9 * 8 + 16) + 7 + 6 + 4),
])
def test_framestats_dims(options, dim):
    assert feature_dim("video", "framestats", options) == dim
    enc = get_encoder("video", "framestats")(options)
    out = enc.embed(enc.preprocess(clips()))
    assert out.shape == (3, dim) and out.dtype == np.float32 and np.isfinite(out).all()


def test_framestats_separates_motion_along_x_from_along_y():
    """Same squares, colours and noise in both classes: only the direction of motion differs."""
    rng = np.random.default_rng(1)
    axes = np.array(list("xy" * 8))
    values = [frames_to_bytes(moving_square(a, rng)) for a in axes]
    enc = get_encoder("video", "framestats")({})
    x = enc.embed(enc.preprocess(values))
    assert nearest_centroid_accuracy(x, axes) == 1.0
    np.testing.assert_array_equal(x, enc.embed(enc.preprocess(values)))   # deterministic


def test_one_frame_clip_has_no_motion():
    enc = get_encoder("video", "framestats")({"motion_grid": 2})
    (out,) = enc.embed(enc.preprocess([frames_to_bytes(moving_square("x", np.random.default_rng(2), n=1))]))
    assert np.isfinite(out).all() and not out[-(7 + 4 + 4):].any()


def test_stage_encodes_live_rows_from_their_frames():
    frames = clips(5)
    frames[1] = None                                     # no video
    batch = make_batch(frames)
    batch["reject_reason"][2] = "too_small"              # rejected earlier
    batch["redo"][3] = "text"                            # video unchanged: not recomputed
    batch[FRAMES][4] = b"not npy"                        # broken frames: this row is rejected
    out = get_stage("features.video")({"encoder": "framestats"})(batch)
    assert out["has_video"].tolist() == [True, False, False, False, False]
    assert out["reject_reason"].tolist() == ["", "", "too_small", "", "video_preprocess_error"]
    assert out["video_emb"].shape == (5, 243) and not out["video_emb"][1:].any()
    assert isinstance(out["video"][0], bytes)            # the mp4 is left as it was


def test_prep_then_features_equals_features_alone():
    params = {"encoder": "framestats", "options": {"batch_size": 2}}
    values = clips(3) + [None]
    direct = get_stage("features.video")(params)(make_batch(values))
    prepped = get_stage("features.video.prep")(params)(make_batch(values))
    assert prepped["video_prep"][3] is None and isinstance(prepped["video_prep"][0], np.ndarray)
    split = get_stage("features.video")(params)(prepped)
    assert "video_prep" not in split
    np.testing.assert_array_equal(split["video_emb"], direct["video_emb"])
    assert split["has_video"].tolist() == [True, True, True, False]


# -- pretrained ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mc3_pth(tmp_path_factory) -> str:
    """mc3_18: the smallest of the ResNet3D family (r3d_18's 512-d features, a tenth of its compute)."""
    import torchvision

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tv") / "mc3_18.pth"
    torch.save(torchvision.models.get_model("mc3_18", weights=None).state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def videomae_dir(tmp_path_factory) -> str:
    from transformers import VideoMAEConfig, VideoMAEImageProcessor, VideoMAEModel

    path = tmp_path_factory.mktemp("videomae")
    torch.manual_seed(0)
    config = VideoMAEConfig(image_size=32, patch_size=8, num_frames=4, tubelet_size=2, hidden_size=24,
                            num_hidden_layers=2, num_attention_heads=2, intermediate_size=37)
    VideoMAEModel(config).save_pretrained(path)
    VideoMAEImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def xclip_dir(tmp_path_factory) -> str:
    from transformers import VideoMAEImageProcessor, XCLIPConfig, XCLIPModel

    path = tmp_path_factory.mktemp("xclip")
    torch.manual_seed(0)
    text = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20, vocab_size=50,
                max_position_embeddings=16)
    vision = dict(hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=30, image_size=32,
                  patch_size=8, num_frames=4, mit_hidden_size=12, mit_intermediate_size=20, mit_num_hidden_layers=1,
                  mit_num_attention_heads=2)
    XCLIPModel(XCLIPConfig(text_config=text, vision_config=vision, projection_dim=12, prompt_layers=1,
                           prompt_num_attention_heads=2)).save_pretrained(path)
    VideoMAEImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return str(path)


CASES = {   # encoder, options from the fixtures, width
    "mc3_18": ("torchvision_video", lambda d: {"arch": "mc3_18", "weights": d["mc3"], "crop_size": 32,
                                               "resize_size": 36, "clip_len": 8}, 512),
    "videomae": ("hf_video", lambda d: {"model": d["videomae"]}, 24),
    "xclip": ("hf_video", lambda d: {"model": d["xclip"]}, 12),   # get_video_features: projection_dim
}


@pytest.fixture(scope="module")
def dirs(mc3_pth, videomae_dir, xclip_dir) -> dict[str, str]:
    return {"mc3": mc3_pth, "videomae": videomae_dir, "xclip": xclip_dir}


@pytest.mark.parametrize("case", list(CASES))
def test_pretrained_batch_equals_one_by_one_and_instances_agree(case, dirs):
    name, make_options, dim = CASES[case]
    options = make_options(dirs) | {"precision": "fp32"}
    values = clips(3)                                     # 3 to 11 frames: resampled to the model's length
    enc = get_encoder("video", name)(options)
    assert enc.dim == dim == feature_dim("video", name, options)
    together = enc.embed(enc.preprocess(values))
    assert together.shape == (3, dim) and together.dtype == np.float32
    alone = np.concatenate([enc.embed(enc.preprocess([v])) for v in values])
    np.testing.assert_allclose(together, alone, rtol=1e-4, atol=1e-5)
    again = get_encoder("video", name)(options)
    np.testing.assert_array_equal(again.embed(again.preprocess(values)), together)
    assert np.abs(together - together[:1]).max() > 1e-4   # not a constant output


def test_torchvision_clip_shape_follows_the_params(mc3_pth):
    enc = get_encoder("video", "torchvision_video")(
        {"arch": "mc3_18", "weights": mc3_pth, "crop_size": 24, "resize_size": 30, "clip_len": 5}, inference=False)
    assert enc.model is None                              # a prep actor loads no model
    (clip,) = enc.preprocess(clips(1))
    assert clip.shape == (5, 3, 24, 24) and clip.dtype == np.uint8


def test_pretrained_split_matches_single_stage(mc3_pth):
    options = {"arch": "mc3_18", "weights": mc3_pth, "crop_size": 32, "resize_size": 36, "clip_len": 4,
               "precision": "fp32", "batch_size": 2}
    plan = plan_feature_stages("video", "torchvision_video", options)
    assert [name for name, _ in plan] == ["features.video.prep", "features.video"]
    values = clips(3) + [None]
    prep = get_stage(plan[0][0])(plan[0][1])
    assert prep.encoder.model is None
    split = get_stage(plan[1][0])(plan[1][1])(prep(make_batch(values)))
    direct = get_stage("features.video")(plan[1][1])(make_batch(values))
    np.testing.assert_allclose(split["video_emb"], direct["video_emb"], rtol=1e-4, atol=1e-5)
    assert split["has_video"].tolist() == [True, True, True, False]


def test_missing_weights_name_the_path(tmp_path, mc3_pth):
    missing = tmp_path / "nope.pth"
    with pytest.raises(MissingWeights, match=str(missing)):
        get_encoder("video", "torchvision_video")({"arch": "r3d_18", "weights": str(missing)})
    with pytest.raises(ValueError, match=str(missing)):   # plan building: a config error
        get_stage("features.video").fingerprint({"encoder": "torchvision_video", "options": {"weights": str(missing)}})
    with pytest.raises(ValueError, match="does not hold r2plus1d_18 weights"):
        get_encoder("video", "torchvision_video")({"arch": "r2plus1d_18", "weights": mc3_pth})
    with pytest.raises(ValueError, match="unknown torchvision video model"):
        get_encoder("video", "torchvision_video")({"arch": "resnet18", "weights": mc3_pth})
    no_model = tmp_path / "no-model"
    with pytest.raises(MissingWeights, match=str(no_model)) as err:
        get_encoder("video", "hf_video")({"model": str(no_model)})
    assert "stages.features.video.params.model" in str(err.value)


def test_hf_model_dir_without_video_processor(tmp_path, videomae_dir):
    import shutil

    for name in ("config.json", "model.safetensors"):
        shutil.copy(f"{videomae_dir}/{name}", tmp_path)
    with pytest.raises(MissingWeights, match="no video processor"):
        get_encoder("video", "hf_video")({"model": str(tmp_path)})
