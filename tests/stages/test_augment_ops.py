"""Each augmentation op alone: it changes what it should and keeps shapes, dtype and rates valid."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from stages.augment import replay
from stages.augment.audio import AudioAugmenter
from stages.augment.image import ImageAugmenter
from stages.augment.text import TextAugmenter, tokenize
from stages.media import decode_audio, decode_image, encode_flac, encode_image

H, W, SR = 36, 48, 8000


def only(op: str, **policy) -> dict:
    return {"ops": [op], op: {"p": 1.0, **policy}}


def run(stage, value, seed: int = 0):
    """One copy through the stage's own draw-and-apply path; checks replay on the way."""
    out, ops = stage.augment(value, np.random.default_rng(seed))
    assert replay(stage.modality, value, ops, stage.params.model_dump()) == out
    return out, ops


# -- image ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    y, x = np.mgrid[0:H, 0:W]
    img = np.stack([x * 5, y * 7, (x + y) * 3], axis=-1) % 200   # structured, left != right
    return (img + 50 * ((x + y) % 2)[..., None]).astype(np.uint8)   # plus fine detail to blur


@pytest.mark.parametrize("op", ["resized_crop", "hflip", "rotate", "color_jitter", "gaussian_noise", "gaussian_blur"])
@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_image_op_changes_pixels_keeps_shape_and_format(op, fmt, pixels):
    data = encode_image(pixels, fmt)
    out, ops = run(ImageAugmenter({**only(op), "device": "cpu"}), data)
    assert [rec["op"] for rec in ops] == [op]
    new = decode_image(out)
    assert new.shape == (H, W, 3) and new.dtype == np.uint8
    assert out[:4] == data[:4]                                  # same container format
    assert np.abs(new.astype(int) - decode_image(data).astype(int)).mean() > 1.0


def test_hflip_and_crop_are_exact(pixels):
    data = encode_image(pixels, "png")
    flipped, _ = run(ImageAugmenter({**only("hflip"), "device": "cpu"}), data)
    assert np.array_equal(decode_image(flipped), pixels[:, ::-1])
    _, ops = run(ImageAugmenter({**only("resized_crop", scale=(0.3, 0.5)), "device": "cpu"}), data)
    (rec,) = ops
    assert rec["size"] == [H, W]
    assert 0.25 * H * W <= rec["height"] * rec["width"] <= 0.55 * H * W
    assert rec["top"] + rec["height"] <= H and rec["left"] + rec["width"] <= W


def test_blur_smooths_and_noise_adds_variance(pixels):
    flat = encode_image(np.full((H, W, 3), 128, np.uint8), "png")
    noisy, ops = run(ImageAugmenter({**only("gaussian_noise", sigma=(0.05, 0.05)), "device": "cpu"}), flat)
    assert ops[0]["sigma"] == 0.05 and decode_image(noisy).std() == pytest.approx(0.05 * 255, rel=0.15)
    sharp = encode_image(pixels, "png")
    blurred, _ = run(ImageAugmenter({**only("gaussian_blur", sigma=(1.5, 1.5)), "device": "cpu"}), sharp)
    grad = lambda a: np.abs(np.diff(a.astype(int), axis=1)).mean()  # noqa: E731
    assert grad(decode_image(blurred)) < grad(pixels)


def test_tiny_image_survives_every_op():
    data = encode_image(np.random.default_rng(1).integers(0, 256, (3, 2, 3), dtype=np.uint8), "png")
    params = {op: {"p": 1.0} for op in ImageAugmenter.OPS} | {"gaussian_blur": {"p": 1.0, "sigma": (1.5, 1.5)}}
    out, _ = run(ImageAugmenter({**params, "device": "cpu"}), data)
    assert decode_image(out).shape == (3, 2, 3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_cuda_requested_without_gpu_fails_clearly(pixels):
    with pytest.raises(ValueError, match="cuda"):
        run(ImageAugmenter({**only("hflip"), "device": "cuda"}), encode_image(pixels, "png"))


@pytest.mark.gpu
def test_cuda_output_is_deterministic_and_valid(pixels):
    data = encode_image(pixels, "png")
    stage = ImageAugmenter({op: {"p": 1.0} for op in ImageAugmenter.OPS} | {"device": "cuda"})
    assert stage.decode(data, stage.params).is_cuda
    a, _ = run(stage, data, seed=5)
    b, _ = run(stage, data, seed=5)
    assert a == b and decode_image(a).shape == (H, W, 3)


# -- text -------------------------------------------------------------------------------------
TEXT = "Seven happy children quickly crossed the old wooden bridge near the quiet village today."


@pytest.fixture(scope="module")
def text_stage():
    def make(op: str, **policy) -> TextAugmenter:
        return TextAugmenter(only(op, **policy))

    return make


def tokens(text: str) -> list[str]:
    return tokenize(text)


def test_swap_keeps_the_tokens(text_stage):
    out, ops = run(text_stage("swap", alpha=0.3), TEXT)
    assert out != TEXT and sorted(tokens(out)) == sorted(tokens(TEXT))
    assert len(ops[0]["pairs"]) == int(0.3 * len(tokens(TEXT)))


def test_delete_drops_tokens_but_never_all(text_stage):
    out, ops = run(text_stage("delete", p_word=0.3), TEXT)
    assert len(tokens(out)) == len(tokens(TEXT)) - len(ops[0]["indices"]) > 0
    short, _ = run(text_stage("delete", p_word=0.99), "just two", seed=3)
    assert len(tokens(short)) == 1


@pytest.mark.parametrize("wordnet", ["debian", "absent"])
def test_insert_adds_tokens(text_stage, wordnet, tmp_path):
    stage = text_stage("insert", alpha=0.2) if wordnet == "debian" else TextAugmenter(
        {**only("insert", alpha=0.2), "wordnet_dir": str(tmp_path)})
    out, ops = run(stage, TEXT)
    added = [word for _, word in ops[0]["inserts"]]
    assert len(tokens(out)) >= len(tokens(TEXT)) + len(added)   # multi-word synonyms add more
    if stage.wordnet is None:
        assert ops[0]["source"] == "copy" and set(added) <= set(tokens(TEXT))


def test_synonym_replaces_words(text_stage):
    stage = text_stage("synonym", alpha=0.3)
    if stage.wordnet is None:
        pytest.skip("Debian wordnet-base is not installed at /usr/share/wordnet")
    out, ops = run(stage, TEXT)
    original = tokens(TEXT)
    assert out != TEXT and len(ops[0]["replacements"]) == int(0.3 * len(original))
    for i, word in ops[0]["replacements"]:
        assert word.lower() in stage.synonyms(original[i])


def test_empty_text_passes(text_stage):
    out, ops = run(text_stage("swap"), "")
    assert out == "" and ops == []


# -- audio ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip() -> bytes:
    t = np.arange(SR) / SR
    return encode_flac((0.5 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), SR)


def rms(wave: np.ndarray) -> float:
    return float(np.sqrt(np.mean(wave.astype(np.float64) ** 2)))


def audio(op: str, data: bytes, **policy) -> tuple[np.ndarray, list[dict], np.ndarray]:
    out, ops = run(AudioAugmenter(only(op, **policy)), data)
    wave, sr = decode_audio(out)
    assert sr == SR and wave.dtype == np.float32 and np.abs(wave).max() <= 1.0
    return wave, ops, decode_audio(data)[0]


def test_gain_scales_loudness(clip):
    wave, ops, orig = audio("gain", clip, db=(12.0, 12.0))   # 0.5 * 4 > 1: clipped, still valid
    assert ops[0]["db"] == 12.0 and rms(wave) > 1.5 * rms(orig)
    quiet, _, _ = audio("gain", clip, db=(-6.0, -6.0))
    assert rms(quiet) == pytest.approx(rms(orig) * 10 ** (-6 / 20), rel=0.01)


def test_noise_hits_the_target_snr(clip):
    wave, ops, orig = audio("noise", clip, snr_db=(10.0, 10.0))
    snr = 10 * np.log10(rms(orig) ** 2 / rms(wave - orig) ** 2)
    assert snr == pytest.approx(10.0, abs=0.5)


def test_shift_moves_the_signal(clip):
    wave, ops, orig = audio("shift", clip, max_fraction=0.2)
    k = ops[0]["samples"]
    assert k != 0 and len(wave) == len(orig)
    if k > 0:
        assert np.allclose(wave[k:], orig[:-k], atol=1e-4) and not wave[:k].any()
    else:
        assert np.allclose(wave[:k], orig[-k:], atol=1e-4) and not wave[k:].any()


def test_stretch_changes_duration_pitch_keeps_it(clip):
    wave, ops, orig = audio("stretch", clip, rate=(1.25, 1.25))
    assert len(wave) == pytest.approx(len(orig) / 1.25, rel=0.02)
    shifted, ops, orig = audio("pitch", clip, semitones=(2.0, 2.0))
    assert len(shifted) == len(orig)
    spectrum = lambda w: np.argmax(np.abs(np.fft.rfft(w))) * SR / len(w)  # noqa: E731
    assert spectrum(shifted) == pytest.approx(220 * 2 ** (2 / 12), rel=0.02)


def test_too_short_clip_skips_stft_ops():
    data = encode_flac(np.full(500, 0.1, np.float32), SR)
    out, ops = run(AudioAugmenter(only("stretch")), data)
    assert out == data and ops == []
