"""cleanup.image: bombs, corrupt bytes, orientation, colour modes, quality filters, one encoding."""
from __future__ import annotations

import io
import json
import struct
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image, ImageFile

from stages.cleanup import image as image_mod
from stages.cleanup.image import ImageCleaner
from stages.media import decode_image, image_format
from stages.registry import STAGES
from tests.stages.helpers import make_batch, reason_of


def scene(h: int = 240, w: int = 320, seed: int = 0) -> np.ndarray:
    """A sharp synthetic photo: coloured rectangles and text on grey."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 190, np.uint8)
    for _ in range(25):
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        dx, dy = int(rng.integers(w // 20, w // 3)), int(rng.integers(h // 20, h // 3))
        cv2.rectangle(img, (x, y), (x + dx, y + dy), rng.integers(0, 255, 3).tolist(), -1)
    cv2.putText(img, "otter", (w // 4, h // 2), cv2.FONT_HERSHEY_SIMPLEX, w / 300, (0, 0, 0), 2)
    return img


def encode(pixels: np.ndarray, fmt: str = "PNG", mode: str | None = None, **kwargs) -> bytes:
    im = Image.fromarray(pixels)
    if mode:
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR declares width x height: a decompression bomb's header, no pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")



def test_registered():
    assert STAGES["cleanup.image"] is ImageCleaner


def test_sharp_image_is_cleaned_to_jpg_by_default():
    out = ImageCleaner().clean(encode(scene()))
    assert image_format(out.value) == "jpg" and out.value[:3] == b"\xff\xd8\xff"
    assert decode_image(out.value).shape == (240, 320, 3)
    assert out.meta["width"] == 320 and out.meta["height"] == 240
    assert out.meta["src_format"] == "PNG" and out.meta["format"] == "jpg"


def test_png_output_is_lossless():
    pixels = scene()
    out = ImageCleaner({"format": "png"}).clean(encode(pixels, "JPEG"))
    assert image_format(out.value) == "png"
    assert np.array_equal(decode_image(out.value), decode_image(ImageCleaner({"format": "png"}).clean(out.value).value))


@pytest.mark.parametrize("size", [(100_000, 100_000), (9_000, 9_000)])
def test_decompression_bomb_rejected_from_header(monkeypatch, size):
    def no_decode(*args, **kwargs):
        raise AssertionError("decoded pixels of an oversized image")

    monkeypatch.setattr(image_mod, "decode_pixels", no_decode)
    assert reason_of(ImageCleaner(), png_header_only(*size)) == "image_too_large_pixels"
    assert Image.MAX_IMAGE_PIXELS is not None   # PIL's own guard left on


def test_max_pixels_and_max_raw_bytes_are_configurable():
    data = encode(scene(200, 200))
    assert reason_of(ImageCleaner({"max_pixels": 10_000}), data) == "image_too_large_pixels"
    assert reason_of(ImageCleaner({"max_raw_bytes": len(data) - 1}), data) == "image_too_large_bytes"


def test_truncated_garbage_and_empty_are_corrupt():
    jpg = encode(scene(), "JPEG", quality=95)
    png = encode(scene())
    c = ImageCleaner()
    for cut in (len(jpg) - 2, len(jpg) // 2, 400):
        assert reason_of(c, jpg[:cut]) == "image_corrupt"
    assert reason_of(c, png[: len(png) // 2]) == "image_corrupt"
    assert reason_of(c, np.random.default_rng(1).bytes(4096)) == "image_corrupt"
    assert reason_of(c, b"") == "image_corrupt"
    assert reason_of(c, "not bytes") == "image_corrupt"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_refuses_to_run_when_truncated_loading_is_enabled(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        ImageCleaner()


def test_format_outside_input_formats():
    ico = encode(scene(64, 64), "ICO")
    assert reason_of(ImageCleaner(), ico) == "image_unsupported_format"
    assert reason_of(ImageCleaner({"input_formats": ["PNG"]}), encode(scene(), "JPEG")) == "image_unsupported_format"
    with pytest.raises(ValueError, match="input_formats"):
        ImageCleaner({"input_formats": ["JPG"]})


def test_exif_orientation_is_applied():
    pixels = np.zeros((100, 200, 3), np.uint8)
    pixels[:, :100] = (255, 0, 0)      # stored: red left half, blue right half
    pixels[:, 100:] = (0, 0, 255)
    pixels[::10] = 255                # some texture so it is not blank / blurry
    exif = Image.Exif()
    exif[0x0112] = 6                  # "rotate 90 degrees clockwise to display"
    cleaned = ImageCleaner({"format": "png", "blur_threshold": 0}).clean(encode(pixels, "JPEG", exif=exif))
    out = decode_image(cleaned.value)
    assert out.shape == (200, 100, 3)
    top, bottom = out[:90].reshape(-1, 3).mean(0), out[110:].reshape(-1, 3).mean(0)
    assert top[0] > top[2] and bottom[2] > bottom[0]    # displayed: red on top, blue below


def mode_image(mode: str) -> Image.Image:
    """scene() in a given PIL mode; high-depth modes carry the full 16-bit / float range."""
    grey = cv2.cvtColor(scene(), cv2.COLOR_RGB2GRAY).astype(np.float32)
    if mode == "F":
        return Image.fromarray(grey / 255)
    if mode in ("I;16", "I"):
        return Image.fromarray((grey * 257).astype(np.uint16)).convert(mode)
    return Image.fromarray(scene()).convert(mode)


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [("RGBA", "PNG"), ("LA", "PNG"), ("P", "PNG"), ("P", "GIF"), ("L", "PNG"), ("1", "PNG"), ("CMYK", "JPEG"),
     ("CMYK", "TIFF"), ("I;16", "PNG"), ("I", "TIFF"), ("F", "TIFF")],
)
def test_colour_modes_become_rgb(mode, fmt):
    buf = io.BytesIO()
    mode_image(mode).save(buf, fmt)
    out = decode_image(ImageCleaner({"format": "png", "blur_threshold": 0}).clean(buf.getvalue()).value)
    assert out.shape == (240, 320, 3) and out.dtype == np.uint8
    assert out.std() > 20   # 16-bit / float data scaled to 8 bits, not clipped to white or black


def test_palette_transparency_goes_onto_white():
    im = Image.fromarray(scene()).convert("P")
    im.putpixel((0, 0), 7)
    buf = io.BytesIO()
    im.save(buf, "PNG", transparency=7)
    out = decode_image(ImageCleaner({"format": "png"}).clean(buf.getvalue()).value)
    assert (out[0, 0] == 255).all()


def test_transparent_pixels_go_onto_white():
    rgba = np.zeros((100, 100, 4), np.uint8)
    rgba[..., :3] = scene(100, 100)
    rgba[:50, :, 3] = 255               # top opaque, bottom fully transparent
    out = decode_image(ImageCleaner({"format": "png", "blur_threshold": 0}).clean(encode(rgba)).value)
    assert (out[60:] == 255).all()


def test_small_and_bad_aspect():
    assert reason_of(ImageCleaner(), encode(scene(20, 40))) == "image_too_small"
    assert reason_of(ImageCleaner({"max_aspect": 3.0}), encode(scene(100, 400))) == "image_bad_aspect"
    assert ImageCleaner({"max_aspect": 4.0}).clean(encode(scene(100, 400))).meta["width"] == 400


def test_blank_and_near_uniform():
    rng = np.random.default_rng(0)
    flat = np.full((200, 200, 3), 128, np.uint8)
    noisy_flat = np.clip(flat + rng.normal(0, 1, flat.shape), 0, 255).astype(np.uint8)
    for pixels in (flat, noisy_flat, np.zeros_like(flat), np.full_like(flat, 255)):
        assert reason_of(ImageCleaner(), encode(pixels)) == "image_blank"


def test_blurry_rejected_sharp_kept_at_every_resolution():
    c = ImageCleaner()
    for h, w in ((240, 320), (600, 800), (1200, 1600)):
        sharp = scene(h, w)
        blurred = cv2.GaussianBlur(sharp, (0, 0), sigmaX=4 * w / 320)
        assert c.clean(encode(sharp, "JPEG", quality=95)).meta["sharpness"] > c.params.blur_threshold
        assert reason_of(c, encode(blurred, "JPEG", quality=95)) == "image_blurry"
    assert ImageCleaner({"blur_threshold": 0}).clean(encode(cv2.GaussianBlur(scene(), (0, 0), 6)))


def test_resize_to_max_side_keeps_aspect():
    out = ImageCleaner({"max_side": 200}).clean(encode(scene(600, 900), "JPEG"))
    assert decode_image(out.value).shape == (133, 200, 3)
    assert (out.meta["src_width"], out.meta["src_height"]) == (900, 600)
    small = ImageCleaner({"max_side": 2000}).clean(encode(scene(240, 320)))
    assert (small.meta["width"], small.meta["height"]) == (320, 240)   # never upscaled


def test_process_batch_routes_rejects_and_writes_meta():
    values = [encode(scene()), b"garbage", None, encode(np.zeros((64, 64, 3), np.uint8))]
    out = ImageCleaner()(make_batch(image=values))
    assert image_format(out["image"][0]) == "jpg"
    assert json.loads(out["meta"][0])["image_width"] == 320
    assert [out["reject_reason"][i] for i in range(4)] == ["", "image_corrupt", "", "image_blank"]
    assert out["reject_stage"][1] == "cleanup.image" and out["reject_detail"][1]


def test_embedded_icc_profile_applied_and_broken_profile_tolerated():
    from PIL import ImageCms

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    pixels = scene()
    c = ImageCleaner({"format": "png"})
    with_profile = decode_image(c.clean(encode(pixels, icc_profile=srgb)).value)
    assert np.abs(with_profile.astype(int) - pixels).mean() < 2
    broken = decode_image(c.clean(encode(pixels, icc_profile=b"not an icc profile")).value)
    assert np.array_equal(broken, pixels)


def test_blur_and_blank_scores_are_numpys_definitions():
    """OpenCV computes them faster (int16 Laplacian, meanStdDev); the values are numpy's, extremes included."""
    import cv2

    from stages.cleanup.image import grey_std, sharpness

    rng = np.random.default_rng(0)
    checker = np.indices((64, 80)).sum(axis=0) % 2 * 255   # the Laplacian's extremes, +-1020
    greys = [rng.integers(0, 256, (int(rng.integers(32, 300)), int(rng.integers(32, 300))), dtype=np.uint8) for _ in range(20)]
    greys += [cv2.GaussianBlur(g, (9, 9), 3) for g in greys[:5]] + [checker.astype(np.uint8), np.full((40, 40), 7, np.uint8)]
    for g in greys:
        np.testing.assert_allclose(sharpness(g), cv2.Laplacian(g, cv2.CV_64F).var(), rtol=1e-12, atol=1e-9)
        np.testing.assert_allclose(grey_std(g), g.std(), rtol=1e-12, atol=1e-9)
